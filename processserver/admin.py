"""Admin requests of the configuration service: protect, status, machines (status built in status.py,
unprotect and forget in unprotect.py, recovery in recovery.py). Admin identity only."""

from __future__ import annotations

import functools
import logging
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import Link
from standby.plumbing.serve import Handler, serve_request
from standby.proto.enums import ErrorCode, GoodbyeCode, ReplicaFormat
from standby.proto.errors import RemoteProtocolError
from standby.proto.messages import Request
from standby.proto.states import FAILED_OVER

from .hub import Hub, no_resync
from .protect import protect
from .recovery import RecoveryAdmin, protected_disks
from .registry import DiskRow
from .roundtrip import RoundTrips
from .status import deployment_status
from .unprotect import forget, unprotect
from .vcenteradmin import VCenterAdmin

log = logging.getLogger("standby.ps.admin")
SUFFIX = {ReplicaFormat.RAW: ".img"}


class AdminSession:
    def __init__(self, ps: Hub, link: Link) -> None:
        self.ps = ps
        self.link = link
        self.recovery = RecoveryAdmin(ps)
        self.trips = RoundTrips(ps, self.recovery)
        self.vcenters = VCenterAdmin(ps)

    def handlers(self) -> dict[str, Handler]:
        """The requests an admin may send here (proto.requests says which, with their arguments)."""
        return {
            "status": self.status,
            "machines": self.machines,
            "protect": self.protect,
            "pause": self.pause,
            "resume": self.resume,
            "resync": self.resync,
            "points": self.recovery.points,
            "failover": self.recovery.failover,
            "commit": self.recovery.commit,
            "test_failover": self.recovery.test_failover,
            "test_failover_cleanup": self.recovery.test_failover_cleanup,
            "app_point": self.recovery.app_point,
            "unprotect": functools.partial(unprotect, self.ps),
            "forget": functools.partial(forget, self.ps),
            "reprotect": self.trips.reprotect,
            "failback": self.trips.failback,
            "reverse": self.trips.reverse,
            "vcenter_add": self.vcenters.add,
            "vcenter_list": self.vcenters.listing,
            "vcenter_remove": self.vcenters.remove,
            "vcenter_vms": self.vcenters.vms,
            "mt_check": self.vcenters.mt_check,
        }

    async def run(self) -> None:
        handlers = self.handlers()
        while True:
            msg = await self.link.recv()
            if not isinstance(msg, Request):
                raise RemoteProtocolError(GoodbyeCode.UNEXPECTED_MESSAGE, f"admin sent {type(msg).__name__}")
            await serve_request(self.link, msg, "admin", "ps", handlers.get(msg.op))

    async def machines(self) -> dict[str, Any]:
        return {"machines": self.ps.registry.machines()}

    async def protect(
        self,
        machine: str,
        mt: str,
        format: str = ReplicaFormat.VMDK,
        replica_dir: str | None = None,
        replicas: dict[str, str] | None = None,
        existing: bool = False,
        datastore: str | None = None,
    ) -> dict[str, Any]:
        aside = self.ps.trips.retired(machine)
        if aside is not None:
            raise RequestFailed(ErrorCode.REFUSED, f"{machine} is set aside: {aside}")
        return await protect(self.ps, machine, mt, format, replica_dir, replicas, existing, datastore)

    def _machine_disks(self, machine: str) -> list[DiskRow]:
        return protected_disks(self.ps, machine)

    async def pause(self, machine: str) -> dict[str, Any]:
        """Stop applying for a machine after each disk's next recovery point (for inspection and tests)."""
        for d in self._machine_disks(machine):
            self.ps.registry.update_disk(d.id, paused=1)
            st = self.ps.open_stream(d)
            if not st.pause:
                st.pause, st.paused_at = True, 0
        log.info("applying for %s pauses at the next point of each disk", machine)
        return {}

    async def resume(self, machine: str) -> dict[str, Any]:
        if any(d.replication in FAILED_OVER for d in self._machine_disks(machine)):
            raise RequestFailed(ErrorCode.REFUSED,
                                f"{machine} is failed over: replication does not resume (replicate it back with "
                                f"standby reprotect {machine}, after standby commit)")
        for d in self._machine_disks(machine):
            self.ps.registry.update_disk(d.id, paused=0)
            st = self.ps.open_stream(d)
            st.pause, st.paused_at = False, 0
            st.resumed.set()
        log.info("applying for %s resumed", machine)
        return {}

    async def resync(self, machine: str, full: bool = False, disk: str | None = None) -> dict[str, Any]:
        disks = [d for d in self._machine_disks(machine) if disk is None or d.name == disk]
        if not disks:
            raise RequestFailed(ErrorCode.UNKNOWN_DISK, f"machine {machine!r} has no protected disk {disk!r}")
        for d in disks:
            if d.replication in FAILED_OVER:
                raise RequestFailed(ErrorCode.REFUSED, no_resync(d))
        for d in disks:
            st = self.ps.open_stream(d)
            if st.quarantined_from is not None:
                # The cached records from the refused one on are never applied: set them aside (kept in
                # quarantine/), let the master target skip them, and repair the replica by the resync.
                n = st.cache.set_aside_from(st.quarantined_from)
                for s in [s for s in st.records if s >= st.quarantined_from]:
                    del st.records[s]
                log.warning("disk %s/%s: %d cached record(s) from sequence %d set aside (quarantine)", d.machine,
                            d.name, n, st.quarantined_from)
                self.ps.after_loss(st, d)
                self.ps.skip_lost(st, d)
                st.quarantined_from = None
                st.health.clear("quarantine")
            if d.resync_request:
                continue
            self.ps.request_resync(d, "full" if full else "checksum", "requested by the operator")
        return {"disks": [d.name for d in disks]}

    async def status(self, machine: str | None = None) -> dict[str, Any]:
        return deployment_status(self.ps, machine)
