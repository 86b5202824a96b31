"""An agent's session: it registers its disks, reports on them, asks for resyncs, and sends each disk's
records in order, which a disk writer per disk (diskwriter.py) stores and acknowledges once durable."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import Link, LinkClosed
from standby.plumbing.serve import Handler, serve_request
from standby.proto.enums import ErrorCode, GoodbyeCode
from standby.proto.errors import RemoteProtocolError
from standby.proto.messages import Batch, Marker, Reply, Request
from standby.proto.requests import BadRequest, MarkerMeta
from standby.proto.states import FAILED_OVER, Replication

from .diskwriter import DiskWriter
from .health import ALERT
from .hub import Hub, no_resync
from .registry import DiskRow

log = logging.getLogger("standby.ps")

# How long a resync hash query waits for the master target to apply what is cached before it.
DRAIN_TIMEOUT = 600.0
OPEN_WAIT = 30.0  # how long a hash query waits for the master target to open a newly protected disk



def pending_resync(row: DiskRow) -> dict[str, Any] | None:
    """The resync asked for the disk, if any. None for a failed-over disk, whose resync_begin is refused
    (a request stored before the failover was dropped with it; one from an older registry is ignored)."""
    if not row.resync_request or row.replication in FAILED_OVER:
        return None
    return json.loads(row.resync_request)

class AgentSession:
    """An agent: registers its disks, receives each disk's batches in order and acks once durable."""

    def __init__(self, ps: Hub, link: Link, machine: str) -> None:
        self.ps = ps
        self.link = link
        self.machine = machine
        self.writers: dict[int, DiskWriter] = {}
        self.spawned: set[asyncio.Task[Any]] = set()

    def handlers(self) -> dict[str, Handler]:
        """The requests an agent may send here (proto.requests says which, with their arguments)."""
        return {
            "disk_open": self.disk_open,
            "disk_key": self.disk_key,
            "disk_report": self.disk_report,
            "resync_begin": self.resync_begin,
            "resync_hashes": self.resync_hashes,
            "about": functools.partial(self.ps.about, self.machine),
        }

    async def run(self) -> None:
        self.ps.agent_sessions[self.machine] = self
        handlers = self.handlers()
        try:
            while True:
                msg = await self.link.recv()
                if isinstance(msg, Reply):
                    self.link.deliver(msg)  # the answer to a wake (ignored) or to a request (app_point)
                elif isinstance(msg, Request):
                    await self.serve(msg, handlers.get(msg.op))
                elif isinstance(msg, Batch | Marker):
                    await self.enqueue(msg, self.link.conn.last_frame)
                else:
                    raise RemoteProtocolError(GoodbyeCode.UNEXPECTED_MESSAGE, f"agent sent {type(msg).__name__}")
        finally:
            if self.ps.agent_sessions.get(self.machine) is self:
                del self.ps.agent_sessions[self.machine]
            tasks = [*(w.task for w in self.writers.values()), *self.spawned]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def serve(self, msg: Request, handler: Handler | None) -> None:
        if msg.op == "resync_hashes":
            # Slow (the master target hashes its whole replica): answered in its own task so this session
            # keeps receiving batches and requests meanwhile.
            self.spawned.add(self.ps.spawn(serve_request(self.link, msg, "agent", "ps", handler), "resync_hashes"))
        else:
            # In order, but the answer is sent from its own task: a read loop never waits on a write
            # (plumbing.serve).
            await serve_request(self.link, msg, "agent", "ps", handler, self.spawned)

    def own_row(self, disk_id: int) -> DiskRow:
        row = self.ps.registry.disk(disk_id)
        if row is None or row.machine != self.machine:
            # Promise 7: each identity may touch only its own disks.
            raise RequestFailed(ErrorCode.FORBIDDEN, f"disk {disk_id} does not belong to machine {self.machine!r}")
        return row

    # -- requests -----------------------------------------------------------------------------------
    async def disk_open(self, name: str, path: str, size: int, uid: str) -> dict[str, Any]:
        reg = self.ps.registry
        row = reg.disk_by_name(self.machine, name)
        if row is None:
            row = reg.add_disk(self.machine, name, uid, path, size)
            log.info("machine %s: new disk %s (%s, %d bytes)", self.machine, name, path, size)
        elif row.uid != uid:
            raise RequestFailed(ErrorCode.BAD_INPUT,
                                f"disk {name}: the agent's identity for it changed (its state was lost)")
        elif size < row.size:
            # Records for the old end may still be queued; shrinking replicas is not built: stop, say so.
            msg = f"disk {name} shrank from {row.size} to {size} bytes: not supported (replication stopped)"
            self.ps.open_stream(row).health.set("shrunk", msg)
            raise RequestFailed(ErrorCode.SIZE_MISMATCH, msg)
        elif row.size != size:
            # Promise 3: the replica no longer matches; its master target resizes it and a checksum resync
            # repairs the contents (the old part mostly compares equal).
            log.warning("machine %s: disk %s changed size from %d to %d bytes", self.machine, name, row.size, size)
            reg.update_disk(row.id, size=size)
            if row.mt is not None:
                self.ps.request_resync(row, "checksum", f"disk size changed from {row.size} to {size} bytes")
                mt = self.ps.mt_sessions.get(row.mt)
                await self.ps.wake(mt.link if mt else None)
            row = reg.disk(row.id) or row
        st = self.ps.open_stream(row)
        st.health.clear("shrunk")
        result: dict[str, Any] = {
            "disk": row.id,
            "replication": row.replication.value,
            "protected": row.mt is not None,
            "generation": st.generation,
            "next_sequence": st.received_seq + 1,
            "cursor": st.cursor,
            "initial_complete": st.initial_complete,
            "key_needed": row.mt is not None and row.wrapped_key is None,
            "seed": bool(row.seed),
            "resync": pending_resync(row),
        }
        if result["key_needed"]:
            mt = reg.machine(row.mt or "")
            result["mt_cert"] = mt["cert_pem"] if mt else None
        return result

    async def disk_key(self, disk: int, wrapped_key: str) -> dict[str, Any]:
        row = self.own_row(disk)
        if row.wrapped_key is not None:
            raise RequestFailed(ErrorCode.BAD_INPUT, f"disk {row.name} already has a data key")
        self.ps.registry.update_disk(disk, wrapped_key=base64.b64decode(wrapped_key))
        mt = self.ps.mt_sessions.get(row.mt or "")
        await self.ps.wake(mt.link if mt else None)
        return {}

    async def disk_report(self, disk: int, report: dict[str, Any]) -> dict[str, Any]:
        """What the agent knows (dirty bytes, tracker, resync progress), for status; the answer carries a
        resync the operator (or the system) asked for."""
        row = self.own_row(disk)
        st = self.ps.open_stream(row)
        st.agent_report, st.agent_report_at = report, time.time()
        lost, failed = report.get("tracking_lost"), report.get("error")  # validated: text or None
        st.health.update("tracking", lost and f"change tracking: {lost}", ALERT)
        st.health.update("agent", failed and f"agent: {failed}")
        return {"resync": pending_resync(row)}

    async def resync_begin(self, disk: int, generation: int, mode: str, reason: str) -> dict[str, Any]:
        row = self.own_row(disk)
        st = self.ps.open_stream(row)
        if mode not in ("checksum", "full"):
            raise RequestFailed(ErrorCode.BAD_INPUT, f"unknown resync mode {mode!r}")
        if row.replication in FAILED_OVER:
            raise RequestFailed(ErrorCode.REFUSED, no_resync(row))
        # A resync that broke off after some of its records were stored left its generation here: a
        # retry starts the next one.
        generation = max(generation, st.generation + 1)
        log.warning("disk %s/%s: %s resync, generation %d: %s", row.machine, row.name, mode, generation, reason)
        # Before the initial copy was all received, a resync only restarts it: replication stays Initial.
        self.ps.registry.move(
            row,
            Replication.RESYNC if st.initial_complete else row.replication,
            reason,
            resync_request=None,
            resync_mode=mode,
            resync_reason=reason,
            resync_started_at=time.time(),
            resync_done_at=None,
        )
        return {"generation": generation}

    async def resync_hashes(self, disk: int, generation: int, query: dict[str, Any]) -> dict[str, Any]:
        """Relay a hash query to the disk's master target once it has applied everything cached before
        (it must hash the replica the agent's earlier batches made)."""
        row = self.own_row(disk)
        st = self.ps.open_stream(row)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while st.cache.after(st.applied_seq):  # records lost in between cannot be waited for
            if time.monotonic() > deadline:
                raise RequestFailed(ErrorCode.UNREACHABLE, "the master target did not apply the backlog in time")
            if st.pause:
                raise RequestFailed(ErrorCode.UNREACHABLE, f"applying for {row.machine} is paused: resume it to resync")
            await asyncio.sleep(0.05)
        mt = self.ps.mt_sessions.get(row.mt or "")
        if mt is None:
            raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {row.mt} is not connected")
        # A disk protected a moment ago (seeding, reprotect) is opened by the master target when it learns
        # of it: ask once it pulls the disk, not before (it would answer "not open" and the agent wait 10 s).
        opened = time.monotonic() + OPEN_WAIT
        while not mt.sending(disk) and time.monotonic() < opened:
            await asyncio.sleep(0.05)
        try:
            return await mt.link.request(
                "resync_hashes", timeout=None, disk=disk, generation=generation, query=query, size=row.size
            )
        except RequestFailed as exc:
            raise RequestFailed(exc.code, str(exc)) from None
        except LinkClosed as exc:
            raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {row.mt} went away: {exc}") from None

    # -- records ------------------------------------------------------------------------------------
    async def enqueue(self, msg: Batch | Marker, frame: bytes | bytearray) -> None:
        if isinstance(msg, Marker):
            try:
                MarkerMeta.from_marker(msg.meta)  # never stored: a bad time would poison start-up (finding 5)
            except BadRequest as exc:
                st = self.ps.streams.get(msg.disk)
                if st is not None and st.machine == self.machine:
                    st.health.set("agent-record", f"the agent sent an invalid record (sequence {msg.sequence}): "
                                                  f"{exc}; it was refused, nothing stored")
                log.warning("%s: refused marker %d of disk %d: %s", self.link.name, msg.sequence, msg.disk, exc)
                raise RemoteProtocolError(GoodbyeCode.BAD_MARKER, str(exc)) from None
        w = self.writers.get(msg.disk)
        if w is None:
            row = self.ps.registry.disk(msg.disk)
            if row is None or row.machine != self.machine:
                log.warning("%s: refused: sent data for disk %d, not its own", self.link.name, msg.disk)
                await self.link.close(GoodbyeCode.FORBIDDEN, f"disk {msg.disk} does not belong to {self.machine!r}")
                raise LinkClosed("forbidden")
            if row.mt is None or row.wrapped_key is None:
                raise RemoteProtocolError(GoodbyeCode.NOT_PROTECTED, f"disk {row.name} is not protected yet")
            w = self.writers[msg.disk] = DiskWriter(self.ps, self.link, self.ps.open_stream(row))
        await w.put(msg, frame)
