"""One disk's worker: the queue of records the process server sends for it and the task that applies
them in order, a group at a time — verify, journal the old contents, write, sync, end the group in the
journal, ack (promise 1, 2 and 5 on this side).

Failure handling: a record that fails authentication or cannot be written (file system full, I/O
error) is REJECTed with the reason — which the process server shows in status — and is *not* acked,
so it stays in the cache. The master target pulls the disk again after RETRY_DELAY.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Protocol

from standby.plumbing import failpoints
from standby.plumbing.link import Link
from standby.proto.enums import MarkerKind, RejectCode
from standby.proto.errors import EnvelopeError
from standby.proto.messages import Ack, Batch, Marker, Reject
from standby.proto.point import Point
from standby.proto.states import DiskState, Replication

from .apply import Applier, BadMarker
from .disk import ApplyStats, RetentionMarks
from .diskstate import ReplicaState
from .journal import DiskJournal, merge_ranges, undo_parts
from .journal_codec import JournalError
from .recovery import replica_writer
from .replicas import Replica, ReplicaError, open_replica
from .replicas.resize import resize_replica

log = logging.getLogger("standby.mt")
RETRY_DELAY = 5.0
# Records applied under one sync at most (the process server sends at most proto.messages.WINDOW ahead anyway).
GROUP_MAX = 8

Record = Batch | Marker
Verified = tuple[Record, list[bytes | memoryview | None] | None]  # a record and, for a batch, its extents' plaintexts


class WorkerHost(Protocol):
    """What a disk's worker needs of the master target around it."""

    group_bytes: int  # old contents of one group at most (a group may still be one batch larger)

    @property
    def disks_dir(self) -> Path: ...

    async def make_room(self, w: DiskWorker, need: int) -> None:
        """Room on the retention volume for `need` bytes of old contents (takes other disks' locks)."""


def record_bytes(m: Record) -> int:
    """How much old contents applying `m` can save in the journal (its extents' lengths, zeros included)."""
    return m.logical_bytes if isinstance(m, Batch) else 0


class DiskWorker:
    """One replica: a queue of records from the process server and the task that applies them."""

    def __init__(self, host: WorkerHost, state: ReplicaState, applier: Applier, journal: DiskJournal) -> None:
        self.host = host
        self.state = state
        self.applier = applier
        self.journal = journal
        self.queue: asyncio.Queue[Record] = asyncio.Queue()
        self.carry: Record | None = None  # taken from the queue, starts the next group
        self.blocked_until = 0.0  # after a reject: ignore records until the disk is pulled again
        self.task: asyncio.Task[None] | None = None
        self.inflight: asyncio.Future[None] | None = None
        self.key = b""
        self.lock = asyncio.Lock()  # applying and hashing the replica never overlap
        self.tree: tuple[int, list[bytes]] | None = None  # (generation, levels) of the last resync hashing
        self.halted = state.state == Replication.FAILED_OVER  # records are no longer applied
        self.pins = 0  # test failovers reading the journal: no pruning meanwhile
        self.retention = RetentionMarks()
        self.failover_problem: str | None = None  # why the last failover move broke off
        self.error: str | None = None  # why applying this disk failed (status shows it until it works again)
        self.stats = ApplyStats()  # the daemon's for this disk (kept across workers): the metrics read it

    @property
    def replica(self) -> Replica:
        return self.applier.replica

    def journal_on(self) -> bool:
        """Groups are journaled from the first up-to-date state on (the initial copy is not: no point yet)."""
        return self.state.state == DiskState.UP_TO_DATE or not self.journal.empty

    def halt(self) -> None:
        """Stop applying (failover): whatever is queued stays unacknowledged in the process server."""
        self.halted = True
        while not self.queue.empty():
            self.queue.get_nowait()

    async def run(self, link: Link) -> None:
        """Apply records in order, a group at a time: whatever is queued (up to GROUP_MAX) is verified in
        worker threads in parallel, written, synced once, recorded once and then acked, so
        the cost of the syncs is shared when the master target is behind."""
        while True:
            group = await self.next_group()
            if self.halted:
                continue
            ready = await self.in_order(link, group)
            if ready:
                failpoints.hit("mt.apply")
                if self.journal_on():
                    # Room for this group's old contents first (pruning takes other disks' locks: never
                    # while holding ours).
                    await self.host.make_room(self, sum(record_bytes(m) for m in ready))
                async with self.lock:
                    await self.apply_group(link, ready)

    async def next_group(self) -> list[Record]:
        """The next group: what is queued, up to GROUP_MAX records. A group ends at a marker: every
        recovery point is a group boundary in the retention journal. It also ends before its old contents
        would pass `group_bytes`: they must fit in the room the retention volume has (a small volume gets
        small groups), and they are read into memory."""
        group = [self.carry or await self.queue.get()]
        self.carry = None
        size = record_bytes(group[0])
        while not isinstance(group[-1], Marker) and not self.queue.empty() and len(group) < GROUP_MAX:
            nxt = self.queue.get_nowait()
            if size + record_bytes(nxt) > self.host.group_bytes:
                self.carry = nxt
                break
            group.append(nxt)
            size += record_bytes(nxt)
        return group

    async def in_order(self, link: Link, group: list[Record]) -> list[Record]:
        """The records of `group` that continue the applied sequence; those already applied are acked
        again, and one out of order makes the disk be pulled again (promise 2: never apply out of order)."""
        st = self.state
        ready: list[Record] = []
        for msg in group:
            if msg.sequence <= st.applied_seq:
                await link.send(Ack(st.disk, msg.sequence, msg.generation))  # already applied: say so again
                continue
            if self.blocked_until:
                # Sent before our reject reached the process server; it resends from applied_seq + 1.
                log.debug("disk %d: dropping sequence %d (applied %d)", st.disk, msg.sequence, st.applied_seq)
                continue
            expect = (ready[-1].sequence if ready else st.applied_seq) + 1
            if msg.sequence != expect:
                # Pull again from what we hold (after a short delay).
                log.warning("disk %d: sequence %d arrived when %d was due; pulling again", st.disk, msg.sequence,
                            expect)
                self.blocked_until = asyncio.get_running_loop().time() + 1.0
                continue
            ready.append(msg)
        return ready

    async def apply_group(self, link: Link, msgs: list[Record]) -> None:
        """Verify every record (in worker threads, in parallel), apply and ack those before the first that
        fails as one group, then reject the one that failed (promise 6: it is never written)."""
        t0 = time.monotonic()
        if self.journal_on():
            # The disk reads the old contents the journal will need while the batches are verified.
            _, (good, failure) = await asyncio.gather(asyncio.to_thread(self.prefetch_old_contents, msgs),
                                                      self.verify(msgs))
        else:
            good, failure = await self.verify(msgs)
        if good and not await self.apply_verified(link, good):
            return
        if good:
            self.stats.applied(len(good), sum(record_bytes(m) for m, _ in good), time.monotonic() - t0)
        if failure is not None:
            await self.reject_unverified(link, *failure)

    async def verify(self, msgs: list[Record]) -> tuple[list[Verified], tuple[Record, BaseException] | None]:
        """The records that passed verification up to the first that did not, and that one with its error."""

        def check(m: Record) -> list[bytes | memoryview | None] | None:
            if isinstance(m, Batch):
                return self.applier.verify_batch(m)
            self.applier.verify_marker(m)
            return None

        results = await asyncio.gather(*(asyncio.to_thread(check, m) for m in msgs), return_exceptions=True)
        good: list[Verified] = []
        for m, r in zip(msgs, results, strict=True):
            if isinstance(r, BaseException):
                return good, (m, r)
            good.append((m, r))
        return good, None

    async def apply_verified(self, link: Link, good: list[Verified]) -> bool:
        """Write a group of verified records (old contents to the journal first), record it and ack it.
        False: it failed, was rolled back and rejected."""
        st = self.state
        batches = [(m, p) for m, p in good if isinstance(m, Batch) and p is not None]
        journal = self.journal if self.journal_on() else None
        first, last = good[0][0].sequence, good[-1][0].sequence
        try:
            # Shielded: a cancelled session must not close the replica under a thread still writing it;
            # stop_workers waits for `inflight` before closing.
            self.inflight = asyncio.ensure_future(asyncio.to_thread(self.write, journal, first, batches))
            await asyncio.shield(self.inflight)
            await self.record([m for m, _ in good], journal)
        except (OSError, ReplicaError, JournalError) as exc:
            await asyncio.to_thread(self.roll_back_open_group)
            reason = str(exc) if isinstance(exc, JournalError) else (
                f"cannot write replica {st.path}: {exc.strerror if isinstance(exc, OSError) else exc}")
            await self.reject(link, first, RejectCode.WRITE_FAILED, reason)
            return False
        except Exception as exc:  # a bug: logged with its traceback; the disk is failed, others go on
            log.exception("disk %d: applying sequences %d..%d failed unexpectedly", st.disk, first, last)
            await asyncio.to_thread(self.roll_back_open_group)
            await self.reject(link, first, RejectCode.FAILED, f"applying failed unexpectedly: {exc!r}")
            return False
        if self.error is not None:
            log.info("disk %s/%s: applying works again", st.machine, st.name)
            self.error = None
        for m, _ in good:
            await link.send(Ack(st.disk, m.sequence, m.generation))
        return True

    async def record(self, msgs: list[Record], journal: DiskJournal | None) -> None:
        """After the group is in the replica (synced): the state it leaves — up to date, a new point, the
        generation, the applied sequence —, its END in the journal, then the state file if needed."""
        st = self.state
        point, changed = self.advance(msgs)
        first, last = msgs[0].sequence, msgs[-1].sequence
        st.applied_seq = last
        if st.error is not None:
            st.error, changed = None, True
        if journal is not None:
            c = msgs[-1]
            meta = dict(c.meta) if isinstance(c, Marker) else {"generation": c.generation, "kind": MarkerKind.BATCH}
            if meta.get("kind") == MarkerKind.POINT and point is None:
                meta["kind"] = MarkerKind.BATCH  # applied, but not a point (see `advance`)
            try:
                await asyncio.to_thread(journal.end_group, first, last, meta)
            except OSError as exc:
                raise JournalError(f"cannot write the retention journal in {journal.dir}: "
                                   f"{exc.strerror or exc}") from exc
        if point is not None:
            st.last_point, changed = point.to_wire(), True
        if changed or journal is None:
            # With the journal, its END records applied_seq durably; the state file only changes.
            await asyncio.to_thread(st.save, self.host.disks_dir)

    def advance(self, msgs: list[Record]) -> tuple[Point | None, bool]:
        """The markers of an applied group move the replica's state on: (the point the group ends at, if
        it is one; whether the state file must change)."""
        st = self.state
        point: Point | None = None
        changed = False
        for m in msgs:
            kind = m.meta.get("kind") if isinstance(m, Marker) else None
            if kind in (MarkerKind.INITIAL_COMPLETE, MarkerKind.RESYNC_COMPLETE):
                st.move(DiskState.UP_TO_DATE, f"{kind} applied")
                changed = True
            elif kind == MarkerKind.POINT and isinstance(m, Marker):
                if st.state == DiskState.UP_TO_DATE:
                    point = Point.from_marker(m)
                else:  # records were skipped or the disk grew: not a copy of the source until resynced
                    log.info("disk %d: point %d not recorded: the replica awaits a resync", st.disk, m.sequence)
            changed = changed or m.generation > st.generation
            st.generation = max(st.generation, m.generation)
        return point, changed

    async def reject_unverified(self, link: Link, m: Record, exc: BaseException) -> None:
        st = self.state
        if isinstance(exc, EnvelopeError):
            await self.reject(link, m.sequence, RejectCode.AUTHENTICATION_FAILED, str(exc))
        elif isinstance(exc, BadMarker):
            await self.reject(link, m.sequence, RejectCode.BAD_MARKER, str(exc))
        else:
            log.error("disk %d: verifying sequence %d failed unexpectedly", st.disk, m.sequence,
                      exc_info=(type(exc), exc, exc.__traceback__))
            await self.reject(link, m.sequence, RejectCode.FAILED, f"verifying failed unexpectedly: {exc!r}")

    def prefetch_old_contents(self, msgs: list[Record]) -> None:
        """Worker thread: ask the replica for the old contents journaling `msgs` will read first (their first
        UNDO part), so the disk reads them while the batches are verified. Advice only, taken from extent
        tables not verified yet: ranges outside the replica are left out, and nothing is read here."""
        size = self.replica.size
        ranges = [(e.offset, e.length) for m in msgs if isinstance(m, Batch) for e in m.extents
                  if 0 <= e.offset and e.offset + e.length <= size]
        parts = undo_parts(merge_ranges(ranges))
        if parts:
            self.replica.prefetch(parts[0])

    def write(
        self, journal: DiskJournal | None, first: int, batches: list[tuple[Batch, list[bytes | memoryview | None]]]
    ) -> None:
        """Worker thread: old contents to the journal (synced), then the batches into the replica (synced).
        If the replica write fails half-way, the old contents go back at once."""
        rep = self.applier.replica
        if journal is None or not batches:
            self.applier.write_group(batches)
            return
        if journal.open_undo:  # a failed group whose roll-back failed too: first things first
            journal.abort(replica_writer(rep), rep.sync)
        ranges = [(e.offset, e.length) for b, _ in batches for e in b.extents]
        try:
            journal.write_undo_ranges(first, batches[0][0].generation, ranges, rep.read, rep.prefetch)
        except OSError as exc:
            journal.discard_undo()  # nothing was written to the replica yet: the group is retried whole
            raise JournalError(f"cannot write the retention journal in {journal.dir}: {exc.strerror or exc}") from exc
        except BaseException:
            journal.discard_undo()
            raise
        try:
            self.applier.write_group(batches)
        except Exception:
            try:
                journal.abort(replica_writer(rep), rep.sync)
            except (OSError, ReplicaError, JournalError) as exc:
                log.critical("disk %d: cannot roll back a failed group: %s (start-up will)", self.state.disk, exc)
            raise

    def roll_back_open_group(self) -> None:
        """Worker thread: a group that failed after its UNDO parts were written (the replica write, the
        END append or the state file) is rolled back now, so the journal and the replica agree and the
        group can be applied again whole. If that fails too, the next attempt (or start-up) does it."""
        if not self.journal.open_undo:
            return
        rep = self.applier.replica
        try:
            self.journal.abort(replica_writer(rep), rep.sync)
        except (OSError, ReplicaError, JournalError) as exc:
            log.critical("disk %d: cannot roll back a failed group yet: %s (retried)", self.state.disk, exc)

    async def reject(self, link: Link, seq: int, code: RejectCode, reason: str) -> None:
        log.error("disk %s/%s sequence %d rejected: %s", self.state.machine, self.state.name, seq, reason)
        self.state.error = reason
        self.blocked_until = asyncio.get_running_loop().time() + RETRY_DELAY
        await link.send(Reject(self.state.disk, seq, code, reason))

    async def resize(self, link: Link, size: int) -> None:
        """The source disk changed size: resize the replica (between two applied groups) to match."""
        st = self.state
        async with self.lock:
            if st.size == size:
                return
            try:
                await asyncio.to_thread(self.applier.replica.close)
                await asyncio.to_thread(resize_replica, st.format, Path(st.path), size)
                replica = await asyncio.to_thread(open_replica, st.format, Path(st.path), size)
            except (ReplicaError, OSError) as exc:
                msg = f"cannot resize replica {st.path} from {st.size} to {size} bytes: {exc}"
                log.error("disk %s/%s: %s", st.machine, st.name, msg)
                st.error = msg
                self.blocked_until = asyncio.get_running_loop().time() + RETRY_DELAY * 6
                await link.send(Reject(st.disk, 0, RejectCode.REPLICA_ERROR, msg))
                return
            log.warning("disk %s/%s: replica %s resized from %d to %d bytes", st.machine, st.name, st.path, st.size,
                        size)
            self.applier.replica = replica
            st.size, self.tree = size, None
            st.move(DiskState.INCONSISTENT, f"resized to {size} bytes: a resync repairs it")
            await asyncio.to_thread(st.save, self.host.disks_dir)
