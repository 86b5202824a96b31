"""Admin requests of the configuration service: protect, status, machines (status built in status.py,
unprotect and forget in unprotect.py, recovery in recovery.py). Admin identity only."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import PurePosixPath
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import Link, LinkClosed
from standby.plumbing.serve import Handler, serve_request
from standby.proto.enums import ErrorCode, GoodbyeCode, ReplicaFormat
from standby.proto.errors import RemoteProtocolError
from standby.proto.messages import Request
from standby.proto.states import FAILED_OVER, Replication

from .hub import Hub, no_resync
from .recovery import RecoveryAdmin, protected_disks
from .registry import DiskRow
from .status import deployment_status
from .unprotect import forget, unprotect

log = logging.getLogger("standby.ps.admin")
SUFFIX = {ReplicaFormat.RAW: ".img"}


class AdminSession:
    def __init__(self, ps: Hub, link: Link) -> None:
        self.ps = ps
        self.link = link
        self.recovery = RecoveryAdmin(ps)

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
    ) -> dict[str, Any]:
        reg = self.ps.registry
        replicas = dict(replicas or {})
        m = reg.machine(machine)
        if m is None or m["role"] != "agent":
            known = ", ".join(x["name"] for x in reg.machines() if x["role"] == "agent") or "none"
            raise RequestFailed(ErrorCode.UNKNOWN_MACHINE, f"unknown machine {machine!r} (enrolled machines: {known})")
        t = reg.machine(mt)
        if t is None or t["role"] != "mt":
            known = ", ".join(x["name"] for x in reg.machines() if x["role"] == "mt") or "none"
            raise RequestFailed(ErrorCode.UNKNOWN_MACHINE,
                                f"unknown master target {mt!r} (enrolled master targets: {known})")
        if format not in set(ReplicaFormat):
            raise RequestFailed(ErrorCode.BAD_INPUT,
                                f"unknown replica format {format!r} (one of: {', '.join(ReplicaFormat)})")
        disks = reg.disks(machine=machine)
        if not disks:
            raise RequestFailed(ErrorCode.BAD_INPUT,
                                f"machine {machine!r} has not reported any disks yet: is its agent running?")
        unknown = set(replicas) - {d.name for d in disks}
        if unknown:
            raise RequestFailed(ErrorCode.UNKNOWN_DISK, f"machine {machine!r} has no disk {', '.join(sorted(unknown))}")
        plan: list[tuple[DiskRow, str]] = []
        for d in disks:
            if d.mt is not None:
                raise RequestFailed(ErrorCode.BAD_INPUT, f"disk {machine}/{d.name} is already protected (to {d.mt})")
            path = replicas.get(d.name)
            if path is None:
                if replica_dir is None or format == ReplicaFormat.DEVICE:
                    raise RequestFailed(
                        ErrorCode.BAD_INPUT,
                        f"no replica given for disk {d.name} (use --replica {d.name}=PATH"
                        + ("" if format == ReplicaFormat.DEVICE else " or --replica-dir")
                        + ")",
                    )
                path = str(PurePosixPath(replica_dir) / f"{machine}-{d.name}{SUFFIX.get(format, '.vmdk')}")
            plan.append((d, path))
        if len({p for _, p in plan}) != len(plan):
            raise RequestFailed(ErrorCode.BAD_INPUT, "two disks would share one replica path")
        session = self.ps.mt_sessions.get(mt)
        if session is None:
            raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {mt!r} is not connected: start it and retry")
        for d, path in plan:
            try:
                await session.check_replica(path, format, d.size, existing)
            except RequestFailed as exc:
                raise RequestFailed(exc.code, f"disk {d.name}: {exc}") from None
            except (TimeoutError, LinkClosed) as exc:
                raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {mt!r} did not answer: {exc}") from None
        for d, path in plan:
            reg.move(
                d,
                Replication.INITIAL,
                f"protected to {mt}:{path} ({format}{', compared with the existing replica' if existing else ''})",
                mt=mt,
                replica_path=path,
                replica_format=format,
                protected_at=time.time(),
                error=None,
                seed=int(existing),
            )
        agent = self.ps.agent_sessions.get(machine)
        await self.ps.wake(agent.link if agent else None)
        return {"disks": [{"disk": d.name, "replica": p} for d, p in plan]}

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
                                f"{machine} is failed over: replication does not resume (reprotect is not built)")
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
