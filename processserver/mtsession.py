"""A master target's session: it learns its assigned disks, pulls each disk's records in order (a sender
per disk forwards them from the cache, at most WINDOW ahead of its acks) and acks each once applied
and journaled, after which the cache releases it (promise 1)."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from typing import Any

from standby.plumbing import failpoints
from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import Link, LinkClosed
from standby.plumbing.serve import Handler, serve_request
from standby.plumbing.service import host_id
from standby.plumbing.supervise import describe, supervise
from standby.proto.enums import ErrorCode, GoodbyeCode, MarkerKind, RejectCode
from standby.proto.errors import RemoteProtocolError
from standby.proto.messages import WINDOW, Ack, Reject, Reply, Request
from standby.proto.states import FAILED_OVER, IllegalTransition, Replication

from .health import ALERT
from .hub import Hub
from .registry import DiskRow
from .streams import DiskStream

log = logging.getLogger("standby.ps")



def replica_gap(applied_seq: int, received_seq: int, nxt: int, passed: int) -> int | None:
    """Where a master target whose replica is at `applied_seq` must skip to, or None if it can go on.

    `nxt` is the first sequence the cache holds after `applied_seq` (`received_seq + 1` if none). The
    records the replica needs next are gone when that is not `applied_seq + 1` while more was received:
    the replica is older than the cache (restored or lost), or cached records were damaged and set aside.
    Promise 3: never guess — skip to what the cache holds (never below `passed`, what the process server
    already counts as applied) and have the disk resynced."""
    if applied_seq < received_seq and nxt != applied_seq + 1:
        return max(nxt - 1, passed)
    return None


class MTSession:
    """A master target: learns its assigned disks, pulls their records in order, acks once applied."""

    def __init__(self, ps: Hub, link: Link, name: str) -> None:
        self.ps = ps
        self.link = link
        self.name = name
        self.senders: dict[int, asyncio.Task[None]] = {}
        self.replies: set[asyncio.Task[Any]] = set()  # answers being sent (plumbing.serve)
        self.inflight: dict[int, int] = {}
        self.acked = asyncio.Event()

    def handlers(self) -> dict[str, Handler]:
        """The requests a master target may send here (proto.requests says which, with their arguments)."""
        return {"subscribe": self.subscribe, "pull": self.pull, "mt_report": self.mt_report,
                "about": functools.partial(self.ps.about, self.name)}

    async def run(self) -> None:
        old = self.ps.mt_sessions.get(self.name)
        if old is not None:
            await old.link.close(GoodbyeCode.REPLACED, "a newer connection from this master target replaced this one")
        self.ps.mt_sessions[self.name] = self
        handlers = self.handlers()
        try:
            while True:
                msg = await self.link.recv()
                if isinstance(msg, Reply):
                    self.link.deliver(msg)
                elif isinstance(msg, Request):
                    await serve_request(self.link, msg, "mt", "ps", handlers.get(msg.op), self.replies)
                elif isinstance(msg, Ack):
                    log.debug("disk %d: %s acked sequence %d", msg.disk, self.name, msg.sequence)
                    self.on_ack(msg)
                elif isinstance(msg, Reject):
                    self.on_reject(msg)
                else:
                    raise RemoteProtocolError(
                        GoodbyeCode.UNEXPECTED_MESSAGE, f"master target sent {type(msg).__name__}"
                    )
        finally:
            if self.ps.mt_sessions.get(self.name) is self:
                del self.ps.mt_sessions[self.name]
            for t in [*self.senders.values(), *self.replies]:
                t.cancel()
            await asyncio.gather(*self.senders.values(), *self.replies, return_exceptions=True)
            self.link.fail_pending(LinkClosed("master target disconnected"))

    def assigned(self, disk_id: int) -> DiskRow:
        row = self.ps.registry.disk(disk_id)
        if row is None or row.mt != self.name:
            raise RequestFailed(ErrorCode.FORBIDDEN, f"disk {disk_id} is not assigned to master target {self.name!r}")
        return row

    # -- requests -----------------------------------------------------------------------------------
    async def subscribe(self) -> dict[str, Any]:
        disks = []
        for row in self.ps.registry.disks(mt=self.name):
            if row.wrapped_key is None:
                continue  # the agent has not delivered the wrapped data key yet
            if self.ps.vmdisks.left_mt(row.machine, row.name):
                continue  # a committed replica that vSphere took from the master target's VM (vmsteps.hand_over)
            disks.append(
                {
                    "disk": row.id,
                    "machine": row.machine,
                    "name": row.name,
                    "uid": row.uid,
                    "size": row.size,
                    "replica_path": row.replica_path,
                    "replica_format": row.replica_format,
                    "wrapped_key": base64.b64encode(row.wrapped_key).decode(),
                    "seed": bool(row.seed),
                }
            )
        # The master target refuses a retention volume that is this cache (same host, overlapping paths).
        return {"disks": disks, "cache_dir": str(self.ps.cfg.cache_dir.absolute()), "host": host_id()}

    async def mt_report(self, disks: dict[str, Any]) -> dict[str, Any]:
        """The master target's periodic word on each disk's history, for status."""
        for disk, rep in disks.items():
            row = self.ps.registry.disk(int(disk))
            if row is not None and row.mt == self.name and isinstance(rep, dict):
                st = self.ps.open_stream(row)
                st.mt_report = rep
                alert, failed = rep.get("alert"), rep.get("error")  # validated: text or None
                st.health.update("retention", alert, ALERT)
                st.health.update("mt-replica", failed and f"master target {self.name}: {failed}")
        return {}

    async def pull(self, disk: int, applied_seq: int) -> dict[str, Any]:
        row = self.assigned(disk)
        if row.replication in FAILED_OVER:
            raise RequestFailed(ErrorCode.REFUSED, f"disk {row.machine}/{row.name} is failed over: nothing is applied")
        st = self.ps.open_stream(row)
        skip = 0
        entries = st.cache.after(applied_seq)
        nxt = entries[0].sequence if entries else st.received_seq + 1
        skip_to = replica_gap(applied_seq, st.received_seq, nxt, st.applied_seq)
        if skip_to is not None:
            log.error("disk %s/%s: the replica is at sequence %d but the cache holds from %d: records %d..%d "
                      "are lost", row.machine, row.name, applied_seq, nxt, applied_seq + 1, skip_to)
            known = st.lost is not None and st.lost[0] <= applied_seq + 1 and skip_to <= st.lost[1]
            if not known:  # lost records already passed over had their resync asked for (skip_lost)
                gap = f"sequence gap: the replica was at {applied_seq}, records up to {skip_to} are lost"
                self.ps.request_resync(row, "checksum", gap)
            row = self.ps.registry.disk(disk) or row  # skipped records must not count as points
            skip = applied_seq = skip_to
            for s in [s for s in st.records if s <= skip_to]:
                st.records.pop(s)
        if st.quarantined_from is not None:
            raise RequestFailed(ErrorCode.REFUSED, st.health.active["quarantine"].text if st.health.has("quarantine")
                          else f"disk {row.name} is quarantined")
        self.set_applied(st, row, applied_seq, release=False)
        self.stop_sender(disk)
        st.health.clear("mt-replica")  # the master target has the replica open again
        self.inflight[disk] = applied_seq
        self.senders[disk] = asyncio.get_running_loop().create_task(self.run_sender(st, applied_seq))
        return {"received_seq": st.received_seq, "skip_to": skip}

    async def check_replica(self, path: str, fmt: str, size: int, existing: bool = False) -> None:
        await self.link.request("check_replica", path=path, format=fmt, size=size, existing=existing, timeout=30)

    async def find_device(self, name: str, size: int, wait: float) -> str:
        """The path of the block device the master target's guest shows for a disk just attached to its VM
        in vSphere (by-id `name`, `size` bytes, used by nobody), waiting up to `wait` seconds for it to
        show; RequestFailed (missing, bad-input, size-mismatch, in-use, replica-exists) if not."""
        # The master target waits up to `wait`; the answer may then take a round trip more.
        res = await self.link.request("find_device", name=name, size=size, wait=wait, timeout=wait + 30)
        return str(res["path"])

    # -- senders ------------------------------------------------------------------------------------
    def sending(self, disk: int) -> bool:
        t = self.senders.get(disk)
        return t is not None and not t.done()

    def stop_sender(self, disk: int) -> None:
        t = self.senders.pop(disk, None)
        if t is not None:
            t.cancel()

    async def run_sender(self, st: DiskStream, after: int) -> None:
        """The disk's sender under supervision: after a failure (a bug, or the cache unreadable) the
        reason is in status and it starts again from what the master target acknowledged."""
        start = [after]

        def failed(exc: BaseException) -> None:
            st.health.set("ps-sender", f"sending to master target {self.name} failed: {describe(exc)} (retrying)")
            start[0] = st.applied_seq

        def recovered() -> None:
            st.health.clear("ps-sender")

        await supervise(f"sender of disk {st.id}", lambda: self.sender(st, start[0]), on_failure=failed,
                        on_recovery=recovered, passthrough=(LinkClosed, ConnectionError))

    async def sender(self, st: DiskStream, after: int) -> None:
        """Send records after `after` in order, at most WINDOW ahead of the acks."""
        sent = after
        try:
            while True:
                entries = st.cache.after(sent)
                if not entries:
                    st.new_data.clear()
                    if not st.cache.after(sent):
                        await st.new_data.wait()
                    continue
                for e in entries:
                    while e.sequence - st.applied_seq > WINDOW:
                        self.acked.clear()
                        await self.acked.wait()
                    while st.pause and st.paused_at and st.paused_at < e.sequence:
                        st.resumed.clear()
                        await st.resumed.wait()  # paused after a point: hold everything newer
                    failpoints.hit("ps.sender")
                    record = await asyncio.to_thread(st.cache.read, e)
                    await self.link.send_frame(record)  # a verified frame, forwarded byte for byte
                    st.health.clear("ps-sender")
                    sent = e.sequence
                    info = st.records.get(sent)
                    if st.pause and not st.paused_at and info is not None and info.marker == MarkerKind.POINT:
                        st.paused_at = sent
                        log.info("disk %d: applying paused after point %d", st.id, sent)
                    log.debug("disk %d: sent sequence %d to %s", st.id, sent, self.name)
        except (ConnectionError, LinkClosed) as exc:
            log.info("%s: sender for disk %d stopped: %s", self.link.name, st.id, exc)

    # -- acknowledgements ---------------------------------------------------------------------------
    def store_applied(self, row: DiskRow, done: str | None, fields: dict[str, Any]) -> None:
        """Store what was applied; a completed copy makes the replica up to date (replication Delta) unless
        the disk has moved on meanwhile (failed over: an acknowledgement that arrives late changes nothing)."""
        if done is None:
            self.ps.registry.update_disk(row.id, **fields)
            return
        try:
            self.ps.registry.move(row, Replication.DELTA, done, **fields)
            self.ps.copy_done(row.machine)
        except IllegalTransition:
            log.warning("disk %s: %s, but replication is %s: it stays so", row.label, done, row.replication.value)
            self.ps.registry.update_disk(row.id, **fields)

    def set_applied(self, st: DiskStream, row: DiskRow, seq: int, release: bool = True) -> None:
        st.applied_seq = seq
        fields: dict[str, Any] = {"applied_seq": seq}
        # Promise 4: a point counts only while the replica is a faithful copy — not while a resync is asked
        # for (records skipped, disk grown) or running.
        faithful = row.resync_request is None and row.replication is Replication.DELTA
        done: str | None = None  # the copy that completed: initial replication or a resync
        for s in [s for s in st.records if s <= seq]:
            marker, cursor, nbytes, t = st.records.pop(s)
            if cursor:
                fields["applied_cursor"] = cursor
            if nbytes:
                self.ps.registry.add_counters(st.id, bytes_applied=nbytes)
                st.apply_rate.add(nbytes)
            if marker == MarkerKind.POINT and faithful:
                st.point_times.append(t)
                fields["last_point_at"], fields["last_point_seq"] = t, s
            if marker == MarkerKind.INITIAL_COMPLETE:
                done = "initial replication complete"
                faithful = row.resync_request is None
                fields["synced_at"] = time.time()
            if marker == MarkerKind.RESYNC_COMPLETE:
                done = "resync complete"
                st.health.clear("cache-damage")  # what was lost is repaired
                faithful = row.resync_request is None
                fields["resync_done_at"] = time.time()
                if row.synced_at is None:
                    fields["synced_at"] = time.time()
        self.store_applied(row, done, fields)
        if release:
            st.cache.release(seq)

    def on_ack(self, ack: Ack) -> None:
        st = self.ps.streams.get(ack.disk)
        row = self.ps.registry.disk(ack.disk)
        if st is None or row is None or row.mt != self.name:
            raise RemoteProtocolError(GoodbyeCode.FORBIDDEN, f"ack for disk {ack.disk}, which is not assigned here")
        if ack.sequence <= st.applied_seq:
            return  # a repeated ack (a record sent twice around a reject or a restart): already counted
        if ack.sequence != st.applied_seq + 1:
            raise RemoteProtocolError(
                GoodbyeCode.BAD_ACK, f"ack for sequence {ack.sequence}, expected {st.applied_seq + 1}"
            )
        self.set_applied(st, row, ack.sequence)
        self.ps.skip_lost(st, row)
        st.progress_at = time.monotonic()
        st.health.clear("mt-reject")
        st.health.clear("stalled")
        self.acked.set()

    def on_reject(self, rej: Reject) -> None:
        row = self.ps.registry.disk(rej.disk)
        st = self.ps.streams.get(rej.disk)
        if st is None or row is None or row.mt != self.name:
            return
        self.stop_sender(rej.disk)
        if rej.sequence == 0:  # about the disk, not a record: the replica cannot be opened or used
            st.health.set("mt-replica", f"master target {self.name}: {rej.reason}")
        elif rej.code in (RejectCode.AUTHENTICATION_FAILED, RejectCode.BAD_MARKER):
            # Promise 6: nothing of it was written. Retrying the same cached record cannot help: quarantine
            # the disk until the operator has it resynced (which sets the cached records aside).
            st.quarantined_from = rej.sequence
            st.health.set("quarantine", f"quarantined: master target {self.name} rejected sequence {rej.sequence}: "
                          f"{rej.reason}. The process server's cached copy was altered or damaged; nothing of it "
                          f"was written. Run: standby resync {row.machine} (sets the cached records aside and "
                          "repairs the replica)")
        else:
            st.health.set("mt-reject", f"master target {self.name} rejected sequence {rej.sequence}: {rej.reason} "
                          "(retried; see the master target's log)")
