"""Admin requests of the configuration service: protect, status, machines (unprotect and forget in
unprotect.py, recovery in recovery.py). Admin identity only."""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import PurePosixPath
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import Link, LinkClosed
from standby.plumbing.serve import Handler, serve_request
from standby.proto.enums import ErrorCode, GoodbyeCode, MarkerKind, ReplicaFormat
from standby.proto.errors import RemoteProtocolError
from standby.proto.messages import Request
from standby.proto.states import FAILED_OVER, Replication, disk_state

from .health import ALERT, ERROR
from .hub import Hub, no_resync
from .recovery import RecoveryAdmin, protected_disks
from .registry import DiskRow
from .streams import DiskStream
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
        now = time.monotonic()
        wall = time.time()
        out = []
        for d in self.ps.registry.disks(machine=machine):
            st = self.ps.streams.get(d.id)
            rate = st.apply_rate.value(now) if st else 0.0
            done = d.size if d.replication is Replication.DELTA else d.applied_cursor
            remaining = max(d.size - done, 0)
            out.append(
                {
                    "machine": d.machine,
                    "disk": d.name,
                    "path": d.path,
                    "size": d.size,
                    "replication": d.replication.value,
                    "disk_state": disk_state(d.replication).value,
                    "mt": d.mt,
                    "replica": d.replica_path,
                    "format": d.replica_format,
                    "progress": (done / d.size) if d.size else 1.0,
                    "bytes_done": done,
                    "received_cursor": d.cursor,
                    "rate": rate,
                    "receive_rate": st.receive_rate.value(now) if st else 0.0,
                    "eta_seconds": (remaining / rate) if rate > 0 and remaining else (0.0 if not remaining else None),
                    "bytes_received": d.bytes_logical,
                    "bytes_data": d.bytes_data,
                    "bytes_wire": d.bytes_wire,
                    "bytes_applied": d.bytes_applied,
                    "compression_ratio": (d.bytes_data / d.bytes_wire) if d.bytes_wire else None,
                    "received_seq": d.received_seq,
                    "applied_seq": d.applied_seq,
                    "backlog_records": st.backlog_records if st else 0,
                    "cache_bytes": st.cache.bytes if st else 0,
                    "refused_records": st.refused_records if st else 0,  # BUSY answers (back-pressure)
                    "error": "; ".join(st.health.texts(ERROR)) or None if st else None,
                    "problems": [p.as_dict() for p in st.health.active.values()] if st else [],
                    "cleared": st.health.recent(wall) if st else [],
                    "synced_at": d.synced_at,
                    **self._continuous(d, st, wall),
                }
            )
        return {
            "disks": out,
            "cache_bytes": self.ps.cache_bytes,
            "cache_quota": self.ps.cfg.cache_quota,
            "master_targets": sorted(self.ps.mt_sessions),
            "rpo_threshold": self.ps.cfg.rpo_threshold,
        }

    def applying(self, d: DiskRow, st: DiskStream | None) -> str:
        """What applying this disk is doing now — never `running` unless a master target is connected and
        pulling this disk with nothing wrong known (promise 9)."""
        if d.mt is None or st is None:
            return "-"
        if d.replication in FAILED_OVER:
            return "failed-over"
        if st.quarantined_from is not None:
            return "quarantined"
        if st.pause:
            return "paused" if st.paused_at and st.applied_seq >= st.paused_at else "pausing"
        mt = self.ps.mt_sessions.get(d.mt)
        if mt is None:
            return "stopped"
        if st.health.has("stalled"):
            return "stalled"
        if st.health.has("mt-replica") or st.health.has("mt-reject"):
            return "failed"
        if not mt.sending(d.id):
            return "stopped"
        return "running"

    def _continuous(self, d: DiskRow, st: DiskStream | None, wall: float) -> dict[str, Any]:
        """Delta replication health of one disk: RPO, points, the agent's dirty bytes, cache backlog,
        resync progress and reason, alerts."""
        # Failed over, nothing replicates: no RPO (it would only rise while the replica is the machine).
        rpo = wall - d.last_point_at if d.last_point_at and d.replication not in FAILED_OVER else None
        rep = dict(st.agent_report) if st else {}
        fresh = st is not None and wall - st.agent_report_at < 30
        backlog = sum(v.nbytes for v in st.records.values()) if st else 0
        alerts = st.health.texts(ALERT) if st else []
        hist = st.mt_report if st else {}
        return {
            "history_points": hist.get("points"),
            "history_oldest": hist.get("oldest_point"),
            "journal_bytes": hist.get("journal_bytes"),
            "failover": hist.get("failed_over"),
            "rpo_seconds": rpo,
            "last_point_time": d.last_point_at,
            # `latest` also counts points still in the cache (DESIGN §6): what a failover to latest reaches.
            "latest_point_time": max([v.time for v in st.records.values() if v.marker == MarkerKind.POINT]
                                     + [d.last_point_at or 0.0]) or None if st else d.last_point_at,
            "last_point_seq": d.last_point_seq,
            "points_last_minute": st.points_since(wall - 60) if st else 0,
            "dirty_bytes": rep.get("dirty_bytes") if fresh else None,
            "tracker": rep.get("tracker") if fresh else None,
            "tracker_cpu_seconds": rep.get("tracker_cpu_seconds") if fresh else None,
            "epochs": rep.get("epochs") if fresh else None,
            "inconsistent_epochs": rep.get("inconsistent_epochs") if fresh else None,
            "agent_points": rep.get("points") if fresh else None,  # made by this agent run (restarts reset it)
            "backlog_bytes": backlog,
            "resync": rep.get("resync") if fresh else None,
            "resync_requested": json.loads(d.resync_request) if d.resync_request else None,
            "last_resync": {
                "mode": d.resync_mode,
                "reason": d.resync_reason,
                "started_at": d.resync_started_at,
                "done_at": d.resync_done_at,
            }
            if d.resync_reason
            else None,
            "applying": self.applying(d, st),
            "paused_at_seq": st.paused_at if st and st.pause else None,
            "alerts": alerts,
        }
