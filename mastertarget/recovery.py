"""Going back to a recovery point: failover in place (with the way forward kept until commit) and test
failover into a separate copy. Runs in worker threads; the daemon serialises per disk.

**Rolling back** over the groups newer than a point is, in effect, applying their undo records newest
first; it is done with each block written once: the oldest of those records that covers a block holds
its contents at the point (planned from the records' extent tables, `oldest_cover`).

**Failover** rolls the replica back in place in steps. Before a backward step writes, what it will
overwrite is saved as a redo step (REDO records, synced) — so the operator can move to a *newer* point
again (redo steps replayed newest first) until `commit` discards everything newer. `failover.json`
says where the replica is (`at`), where it is going (`target`) and the step under way; a crash resumes
that step at start-up (a redo step is never captured twice, and replaying either kind is idempotent).

**Test failover** copies the replica while replication goes on, then rolls the copy back over every
group newer than the point, *including those written during the copy*: any block the copy caught
half-way through replication was written after its group's undo record was synced, so the roll-back
gives that block's contents at the point, whatever version was copied.
"""

from __future__ import annotations

import bisect
import errno
import heapq
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from standby.plumbing.durable import load_record, save_json, truncate_synced
from standby.proto.frames import encode_frame

from .journal import PIECE_MAX, UNDO_PART, DiskJournal, apply_undo, read_pieces
from .journal_codec import (
    MOVE_TYPE,
    REDO_TYPE,
    JournalError,
    UndoRecord,
    decode_undo,
    encode_undo,
    redo_opener,
    redo_sealer,
    scan,
    sealing_pool,
)
from .replicas import Replica, create_replica
from .replicas.raw import FileReplica
from .segments import Group, walk_records

log = logging.getLogger("standby.mt.recovery")
COPY_CHUNK = 8 << 20

Writer = Callable[[int, bytes | memoryview | None, int], None]
_T = TypeVar("_T")
_R = TypeVar("_R")


def replica_writer(replica: Replica) -> Writer:
    def write(offset: int, data: bytes | memoryview | None, length: int) -> None:
        if data is None:
            replica.write_zeroes(offset, length)
        else:
            replica.write(offset, data)

    return write


@dataclass
class FailoverState:
    latest: int  # the newest state the replica held when the failover began
    at: int  # the state it holds now (a group boundary)
    target: int  # where it is going (== at once settled)
    point_time: float = 0.0
    started_at: float = 0.0
    committed: bool = False
    step: dict[str, int] | None = None  # the step under way: {"op": 0 undo / 1 redo, "src", "dst"}

    @classmethod
    def load(cls, directory: Path) -> FailoverState | None:
        p = directory / "failover.json"
        return load_record(cls, p) if p.exists() else None

    def save(self, directory: Path) -> None:
        save_json(directory / "failover.json", asdict(self), 0o600)


UNDO_STEP, REDO_STEP = 0, 1
# Bytes of saved contents per REDO record: bounds memory, and keeps a record of incompressible contents
# within the frame limit (proto.frames.MAX_PAYLOAD, 32 MiB) with room for its tables and tags.
REDO_PART = UNDO_PART


@dataclass
class Move:
    """One backward step in the redo log: the contents at `src` of everything rolling back to `dst`
    overwrote, in `parts` REDO records after a MOVE record at `offset`."""

    src: int
    dst: int
    parts: int
    offset: int
    records: list[tuple[int, int]]  # (offset, size) of each REDO record present

    @property
    def complete(self) -> bool:
        return len(self.records) == self.parts


class RedoLog:
    """The way forward during a failover: a stack of backward steps, newest last (`redo.jrn`)."""

    def __init__(self, journal: DiskJournal) -> None:
        self.path = journal.dir / "redo.jrn"
        self.disk = journal.disk
        self.sealer = redo_sealer(journal.key, journal.uid)
        self.opener = redo_opener(journal.key, journal.uid)
        self.moves: list[Move] = []
        if not self.path.exists():
            return
        walk = walk_records(self.path, small=1 << 16)
        if walk.problem:
            raise JournalError(f"redo log {self.path} is damaged: {walk.problem}")
        if walk.torn:
            truncate_synced(self.path, walk.good_end)
        for ftype, _, _, at, size, payload in walk.records:
            if ftype == MOVE_TYPE and payload is not None:
                try:
                    meta = json.loads(payload)
                    src, dst, parts = (meta[k] for k in ("src", "dst", "parts"))
                    if not all(type(v) is int and 0 <= v < 2**63 for v in (src, dst, parts)):
                        raise ValueError("src, dst and parts must be sequences")
                except (ValueError, TypeError, KeyError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                    raise JournalError(f"redo log {self.path}: bad step record at {at}: {exc}") from None
                self.moves.append(Move(src, dst, parts, at, []))
            elif ftype == REDO_TYPE and self.moves:
                self.moves[-1].records.append((at, size))
            else:
                raise JournalError(f"redo log {self.path}: unexpected record at {at}")

    def push(self, src: int, dst: int, chunks: list[list[tuple[int, int]]], read: Callable[[int, int], bytes],
             prefetch: Callable[[list[tuple[int, int]]], None] | None = None) -> None:
        """Append one step — a MOVE record, then the current contents of `chunks` (lists of (offset,
        length)), one REDO record per chunk — and fsync once: all before the replica is touched.

        Chunks are read READ_AHEAD at a time by reader threads while the one before is sealed in the
        sealing pool: a long rollback's pieces are small and scattered, and read one at a time they kept
        the disk at one request in flight and were half of the step's time (bench/retention.py).
        `prefetch` asks for each chunk's ranges at once as its reader starts on it."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            at = os.fstat(fd).st_size
            meta = json.dumps({"src": src, "dst": dst, "parts": len(chunks)}).encode()
            head = encode_frame(MOVE_TYPE, self.disk, src, meta)
            os.write(fd, head)
            move = Move(src, dst, len(chunks), at, [])
            pos = at + len(head)

            def contents(ranges: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
                if prefetch is not None:
                    prefetch(ranges)
                return list(read_pieces(read, ranges))

            with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="redo-read") as readers:
                for i, pieces in enumerate(ahead(contents, chunks, READ_AHEAD, readers)):
                    rec = encode_undo(self.disk, src, i, pieces, self.sealer, REDO_TYPE)
                    view = memoryview(rec)
                    while view:
                        view = view[os.write(fd, view) :]
                    move.records.append((pos, len(rec)))
                    pos += len(rec)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.moves.append(move)

    def read(self, move: Move) -> Iterator[UndoRecord]:
        with open(self.path, "rb") as f:
            for at, size in move.records:
                f.seek(at)
                s = scan(f.read(size))
                if s.problem or s.torn or len(s.records) != 1:
                    raise JournalError(f"redo log {self.path}: record at {at} is damaged")
                _, disk, seq, payload = s.records[0]
                yield decode_undo(disk, seq, payload, self.opener)

    def pop(self) -> None:
        """Forget the newest step (its contents are back in the replica, synced)."""
        move = self.moves.pop()
        truncate_synced(self.path, move.offset)

    def drop_incomplete(self) -> None:
        """A step whose REDO records were not all written (a crash while appending): the replica was not
        touched for it yet (records are synced before any write), so it is simply forgotten."""
        if self.moves and not self.moves[-1].complete:
            self.pop()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.moves.clear()


def oldest_cover(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Given (start, end, rank) spans, the disjoint pieces (start, end, rank) where each covered byte gets
    the smallest rank covering it — adjacent pieces of one rank merged. A sweep over the span ends."""
    spans = sorted(spans)
    cuts = sorted({x for a, b, _ in spans for x in (a, b)})
    heap: list[tuple[int, int]] = []  # (rank, end)
    out: list[tuple[int, int, int]] = []
    i = 0
    for x, y in zip(cuts, cuts[1:], strict=False):
        while i < len(spans) and spans[i][0] <= x:
            heapq.heappush(heap, (spans[i][2], spans[i][1]))
            i += 1
        while heap and heap[0][1] <= x:
            heapq.heappop(heap)
        if not heap:
            continue
        rank = heap[0][0]
        if out and out[-1][2] == rank and out[-1][1] == x:
            out[-1] = (out[-1][0], y, rank)
        else:
            out.append((x, y, rank))
    return out


def _put(write: Writer, rec: UndoRecord, pieces: list[tuple[int, int]]) -> int:
    """Write the parts of `rec` that lie in `pieces` (sorted, disjoint, each inside `rec`'s extents)."""
    starts = [off for off, _ in rec.extents]
    n = 0
    for a, b in pieces:
        k = max(bisect.bisect_right(starts, a) - 1, 0)
        while a < b and k < len(rec.extents):
            off, data = rec.extents[k]
            end = off + rec.lengths[k]
            lo, hi = max(a, off), min(b, end)
            if lo < hi:
                write(lo, None if data is None else memoryview(data)[lo - off : hi - off], hi - lo)
                n += hi - lo
                a = hi
            k += 1
    return n


def _undo_step(journal: DiskJournal, replica: Replica, redo: RedoLog, src: int, dst: int) -> int:
    """Roll the replica back from `src` to `dst`, each block written once: the oldest undo record
    newer than `dst` that covers a block holds its contents at `dst`. What is overwritten is saved
    (synced) as one redo step first."""
    groups = [g for g in journal.groups if dst < g.last <= src and g.undo_at >= 0]
    pieces = _rollback_plan(journal, groups)
    if not (redo.moves and redo.moves[-1].src == src and redo.moves[-1].dst == dst):
        chunks: list[list[tuple[int, int]]] = [[]] if pieces else []
        size = 0
        for a, b, _ in pieces:
            for x in range(a, b, PIECE_MAX):
                y = min(b, x + PIECE_MAX)
                if size + (y - x) > REDO_PART and chunks[-1]:
                    chunks.append([])
                    size = 0
                chunks[-1].append((x, y - x))
                size += y - x
        redo.push(src, dst, chunks, replica.read, replica.prefetch)
    n = _roll_back(journal, groups, pieces, replica_writer(replica))
    replica.sync()
    return n


def _rollback_plan(journal: DiskJournal, groups: list[Group]) -> list[tuple[int, int, int]]:
    """Rolling back `groups` (oldest first): for each block, the oldest of them whose undo record covers
    it holds its contents before them all. (start, end, index into `groups`) pieces, from the records'
    extent tables only."""
    spans = [(off, off + n, rank) for rank, g in enumerate(groups) for off, n in journal.undo_ranges(g)]
    return oldest_cover(spans)


def _roll_back(journal: DiskJournal, groups: list[Group], pieces: list[tuple[int, int, int]], write: Writer) -> int:
    """Write the planned pieces, each block once, each undo record opened once and only where it is
    written. Records are read in journal order and opened (decrypted, decompressed) in the sealing pool a
    few ahead of the one being written, so the writes and the opening overlap."""
    by_rank: dict[int, list[tuple[int, int]]] = {}
    for a, b, rank in pieces:
        by_rank.setdefault(rank, []).append((a, b))
    # The parts of a group cover disjoint ranges: each writes its share.
    work = [(groups[rank], at, size, ranges) for rank, ranges in sorted(by_rank.items())
            for at, size in groups[rank].parts]
    n = 0
    for rec, (_, _, _, ranges) in zip(ahead(lambda w: journal.undo_part(*w), work), work, strict=True):
        n += _put(write, rec, ranges)
    return n


OPEN_AHEAD = 4  # undo records opened ahead of the one being written (each at most UNDO_PART of contents)
READ_AHEAD = 2  # REDO chunks read at once ahead of the one being sealed (each at most REDO_PART)


def ahead(fn: Callable[[_T], _R], items: list[_T], depth: int = OPEN_AHEAD,
          pool: Executor | None = None) -> Iterator[_R]:
    """fn(item) for each of `items`, in order, computed in `pool` (the sealing pool by default) up to
    `depth` items ahead. `fn` must not wait for work of the same pool."""
    pool = pool or sealing_pool()
    pending: deque[Future[_R]] = deque()
    it = iter(items)
    try:
        for item in itertools.islice(it, depth):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(it, 1):
                pending.append(pool.submit(fn, item))
            yield result
    finally:
        for f in pending:
            f.cancel()


def _redo_step(replica: Replica, redo: RedoLog) -> int:
    """Put back what the newest backward step overwrote: the replica is at that step's `src` again."""
    write = replica_writer(replica)
    n = 0
    for rec in redo.read(redo.moves[-1]):
        n += apply_undo(rec, write)
    replica.sync()
    redo.pop()
    return n


def move(journal: DiskJournal, replica: Replica, fo: FailoverState, target: int) -> int:
    """Move the replica from `fo.at` to the state after group `target` (<= fo.latest); returns the bytes
    written. Forward means replaying redo steps (newest first) until at or past the target, backward one
    undo step. Each step is recorded in `fo` before it starts and when it is done, so a crash resumes it
    (`resume`): replaying a step is idempotent."""
    if target > fo.latest:
        raise JournalError(f"sequence {target} is newer than the replica's newest state {fo.latest}")
    redo = RedoLog(journal)
    n = resume(journal, replica, fo, redo)
    fo.target = target
    fo.save(journal.dir)
    while fo.at < target:
        if not redo.moves or redo.moves[-1].dst != fo.at:
            raise JournalError(f"no redo step from {fo.at}: cannot move forward to {target}")
        top = redo.moves[-1]
        n += _step(journal, replica, fo, redo, REDO_STEP, fo.at, top.src)
    if fo.at > target:
        n += _step(journal, replica, fo, redo, UNDO_STEP, fo.at, target)
    return n


def _step(journal: DiskJournal, replica: Replica, fo: FailoverState, redo: RedoLog, op: int, src: int,
          dst: int) -> int:
    fo.step = {"op": op, "src": src, "dst": dst}
    fo.save(journal.dir)
    if op == UNDO_STEP:
        n = _undo_step(journal, replica, redo, src, dst)
    elif redo.moves and redo.moves[-1].src == dst and redo.moves[-1].dst == src:
        n = _redo_step(replica, redo)
    else:
        n = 0  # popped before a crash: the replica was synced at `dst` already
    fo.at, fo.step = dst, None
    fo.save(journal.dir)
    return n


def resume(journal: DiskJournal, replica: Replica, fo: FailoverState, redo: RedoLog | None = None) -> int:
    """Finish a step a crash interrupted (start-up, or the next move)."""
    redo = redo or RedoLog(journal)
    redo.drop_incomplete()
    if fo.step is None:
        return 0
    st = fo.step
    return _step(journal, replica, fo, redo, int(st["op"]), int(st["src"]), int(st["dst"]))


def commit(journal: DiskJournal, fo: FailoverState) -> None:
    """Make the failover final: history newer than the point is discarded, the way forward too."""
    journal.truncate_after(fo.at)
    RedoLog(journal).remove()
    fo.committed = True
    fo.latest = fo.target = fo.at
    fo.save(journal.dir)


# -- test failover ----------------------------------------------------------------------------------
def copy_replica(src: Replica, fmt: str, dest: Path, read_locked: Callable[[int, int], bytes]) -> Replica:
    """A new replica at `dest` with `src`'s contents as they are now (replication may be writing
    meanwhile: the undo records fix that up). Flat files copy only their data ranges in the kernel;
    other formats copy through `read_locked` (which serialises with applying), skipping zeros."""
    dest_fmt = "raw" if fmt == "device" else fmt
    out = create_replica(dest_fmt, dest, src.size)
    try:
        if isinstance(src, FileReplica) and isinstance(out, FileReplica):
            _copy_data_ranges(src.data_path, out.data_path, src.size)
        else:
            for off in range(0, src.size, COPY_CHUNK):
                data = read_locked(off, min(COPY_CHUNK, src.size - off))
                if data.count(0) != len(data):
                    out.write(off, data)
        out.sync()
    except BaseException:
        out.close()
        for f in {dest, *out.data_files()}:
            f.unlink(missing_ok=True)
        raise
    return out


def _copy_data_ranges(src: Path, dest: Path, size: int) -> None:
    """Copy the allocated ranges of `src` into `dest` (same offsets) with copy_file_range."""
    fin = os.open(src, os.O_RDONLY)
    fout = os.open(dest, os.O_WRONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole from here
                raise
            end = min(os.lseek(fin, start, os.SEEK_HOLE), size)
            off = start
            while off < end:
                n = os.copy_file_range(fin, fout, min(end - off, 1 << 30), off, off)
                if n <= 0:
                    raise OSError(errno.EIO, f"copy_file_range stopped at {off}")
                off += n
            pos = end
    finally:
        os.close(fin)
        os.close(fout)


def undo_into(journal: DiskJournal, groups: list[Group], out: Replica) -> int:
    """Roll `out` back over `groups` (all newer than the point, oldest first): the same as applying their
    undo records newest first, with each block written once."""
    with_undo = [g for g in groups if g.undo_at >= 0]
    n = _roll_back(journal, with_undo, _rollback_plan(journal, with_undo), replica_writer(out))
    out.sync()
    return n


def test_failover_path(replica_path: str, fmt: str, disk: int, directory: Path | None) -> Path:
    """Where a disk's test-failover copy goes: beside the replica (or in `directory`), named -test."""
    p = Path(replica_path)
    base = directory if directory is not None else p.parent
    if fmt == "device":
        return base / f"test-failover-disk{disk}.img"
    return base / f"{p.stem}-test{p.suffix}"


def elapsed(t0: float) -> float:
    return round(time.monotonic() - t0, 3)
