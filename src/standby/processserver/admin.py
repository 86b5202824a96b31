"""Admin requests of the configuration service: protect, status, machines. Admin identity only."""

from __future__ import annotations

import logging
import time
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from standby.plumbing.link import Link, LinkClosed, RequestFailed
from standby.proto.errors import RemoteProtocolError
from standby.proto.messages import Reply, Request

from .registry import DiskRow

if TYPE_CHECKING:
    from .server import ProcessServer

log = logging.getLogger("standby.ps.admin")
FORMATS = ("vmdk", "vmdk-thick", "vmdk-monolithic-flat", "vmdk-sparse", "raw", "device")
SUFFIX = {"raw": ".img"}


class AdminSession:
    def __init__(self, ps: ProcessServer, link: Link) -> None:
        self.ps = ps
        self.link = link

    async def run(self) -> None:
        from .server import reply_to

        handlers = {"status": self.status, "machines": self.machines, "protect": self.protect}
        while True:
            msg = await self.link.recv()
            if not isinstance(msg, Request):
                raise RemoteProtocolError("unexpected-message", f"admin sent {type(msg).__name__}")
            handler = handlers.get(msg.op)
            if handler is None:
                await self.link.send(Reply(msg.id, False, {}, "bad-input", f"unknown request {msg.op!r}"))
            else:
                await reply_to(self.link, msg, handler)

    async def machines(self) -> dict[str, Any]:
        return {"machines": self.ps.registry.machines()}

    async def protect(
        self,
        machine: str,
        mt: str,
        format: str = "vmdk",
        replica_dir: str | None = None,
        replicas: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        from .server import Failure

        reg = self.ps.registry
        replicas = dict(replicas or {})
        m = reg.machine(machine)
        if m is None or m["role"] != "agent":
            known = ", ".join(x["name"] for x in reg.machines() if x["role"] == "agent") or "none"
            raise Failure("unknown-machine", f"unknown machine {machine!r} (enrolled machines: {known})")
        t = reg.machine(mt)
        if t is None or t["role"] != "mt":
            known = ", ".join(x["name"] for x in reg.machines() if x["role"] == "mt") or "none"
            raise Failure("unknown-machine", f"unknown master target {mt!r} (enrolled master targets: {known})")
        if format not in FORMATS:
            raise Failure("bad-input", f"unknown replica format {format!r} (one of: {', '.join(FORMATS)})")
        disks = reg.disks(machine=machine)
        if not disks:
            raise Failure("bad-input", f"machine {machine!r} has not reported any disks yet: is its agent running?")
        unknown = set(replicas) - {d.name for d in disks}
        if unknown:
            raise Failure("unknown-disk", f"machine {machine!r} has no disk {', '.join(sorted(unknown))}")
        plan: list[tuple[DiskRow, str]] = []
        for d in disks:
            if d.mt is not None:
                raise Failure("bad-input", f"disk {machine}/{d.name} is already protected (to {d.mt})")
            path = replicas.get(d.name)
            if path is None:
                if replica_dir is None or format == "device":
                    raise Failure(
                        "bad-input",
                        f"no replica given for disk {d.name} (use --replica {d.name}=PATH"
                        + ("" if format == "device" else " or --replica-dir")
                        + ")",
                    )
                path = str(PurePosixPath(replica_dir) / f"{machine}-{d.name}{SUFFIX.get(format, '.vmdk')}")
            plan.append((d, path))
        if len({p for _, p in plan}) != len(plan):
            raise Failure("bad-input", "two disks would share one replica path")
        session = self.ps.mt_sessions.get(mt)
        if session is None:
            raise Failure("unreachable", f"master target {mt!r} is not connected: start it and retry")
        for d, path in plan:
            try:
                await session.check_replica(path, format, d.size)
            except RequestFailed as exc:
                raise Failure(exc.code, f"disk {d.name}: {exc}") from None
            except (TimeoutError, LinkClosed) as exc:
                raise Failure("unreachable", f"master target {mt!r} did not answer: {exc}") from None
        for d, path in plan:
            reg.update_disk(
                d.id,
                mt=mt,
                replica_path=path,
                replica_format=format,
                state="initial-replication",
                protected_at=time.time(),
                error=None,
            )
            log.info("protect %s/%s -> %s:%s (%s)", machine, d.name, mt, path, format)
        agent = self.ps.agent_sessions.get(machine)
        await self.ps.wake(agent.link if agent else None)
        return {"disks": [{"disk": d.name, "replica": p} for d, p in plan]}

    async def status(self, machine: str | None = None) -> dict[str, Any]:
        now = time.monotonic()
        out = []
        for d in self.ps.registry.disks(machine=machine):
            st = self.ps.streams.get(d.id)
            rate = st.apply_rate.value(now) if st else 0.0
            done = d.size if d.state == "up-to-date" else d.applied_cursor
            remaining = max(d.size - done, 0)
            out.append(
                {
                    "machine": d.machine,
                    "disk": d.name,
                    "path": d.path,
                    "size": d.size,
                    "state": d.state,
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
                    "error": (st.last_error if st and st.last_error else d.error),
                    "synced_at": d.synced_at,
                }
            )
        return {
            "disks": out,
            "cache_bytes": self.ps.cache_bytes,
            "cache_quota": self.ps.cfg.cache_quota,
            "master_targets": sorted(self.ps.mt_sessions),
        }
