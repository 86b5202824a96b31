"""A disk's retention journal on the retention volume: the files, the write order, rollback (promise 5).

Layout: ``<retention dir>/<disk uid>/seg-<first sequence>.jrn``, segment files of journal records
(mastertarget.journal_codec; how the segments are indexed: mastertarget.segments). Each applied *group*
of records (batches up to and including a marker, or the batches queued when it ran) leaves:

    UNDO…  (sequence = the group's first)  old contents of every range the group overwrites, in one or more
           UNDO records ("parts", each at most UNDO_PART bytes of contents, so every record stays within
           the frame limit whatever the group's size) — appended, then fsynced once, *before* the replica
           is written;
    END    (sequence = the group's last)   {generation, kind, first, time, consistency, tag} — appended and
           fsynced *after* the replica is synced.

A group without batches (an idle epoch's point) has only its END. So at any instant the journal ends
either with an END (the replica holds exactly the ended groups) or with UNDO parts without their
END, an *open* group (the replica may hold part of that group): `open()` hands those parts back and `rollback_pending`
writes them over the replica, syncs, and cuts them off. (A crash while the parts were being appended
leaves some of them: the replica was not touched yet, and rolling them back is harmless.) Applying an
undo record is idempotent (absolute writes of old contents), so a crash during rollback just rolls back
again.

The replica always holds the newest state; the state after group g is reached by applying the UNDO
records of every group after g, newest first. A group ends at every marker, so every recovery point is a group
boundary. Segments rotate at group boundaries; pruning deletes whole segments that only older points
needed. The files themselves — numbered segments, appends with fsync, a new segment's directory fsync,
cuts, deletion — are a plumbing.segmentlog.SegmentLog (as the process server's cache's are); what a
group, its end and a prunable segment are stays here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from standby.plumbing.segmentlog import SegmentLog
from standby.proto.frames import HEADER_SIZE
from standby.proto.point import Point

from .journal_codec import (
    GROUP_END_TYPE,
    UNDO_TYPE,
    JournalError,
    UndoRecord,
    decode_undo,
    encode_group_end,
    encode_undo,
    scan,
    undo_opener,
    undo_sealer,
    undo_table,
)
from .retention import Span
from .segments import Group, Pending, Segment, read_segment

log = logging.getLogger("standby.mt.history")
SEGMENT_MAX = 64 << 20  # a new segment file after this many bytes (at a group boundary)
PIECE_MAX = 8 << 20  # old contents are read and sealed in pieces of at most this many bytes
# Old contents per UNDO record. A sealed record of incompressible contents is a little larger than its
# contents (an extent-table entry and an AEAD tag per run); 16 MiB keeps it well under the 32 MiB frame
# limit (proto.frames.MAX_PAYLOAD) — a group's old contents may be far larger (a zeroed range of GiBs).
UNDO_PART = 16 << 20


def merge_ranges(ranges: list[tuple[int, int]], piece: int = PIECE_MAX) -> list[tuple[int, int]]:
    """The union of (offset, length) ranges as sorted, non-overlapping (offset, length) pieces of at most
    `piece` bytes: what a group overwrites, each byte once."""
    out: list[tuple[int, int]] = []
    cur_a = cur_b = -1
    for a, n in sorted(ranges):
        b = a + n
        if a <= cur_b:
            cur_b = max(cur_b, b)
            continue
        if cur_b > cur_a:
            out.append((cur_a, cur_b - cur_a))
        cur_a, cur_b = a, b
    if cur_b > cur_a:
        out.append((cur_a, cur_b - cur_a))
    return [(a + i, min(piece, n - i)) for a, n in out for i in range(0, n, piece)]


class DiskJournal:
    """The retention journal of one replica. Not thread-safe: the disk's worker serialises use."""

    def __init__(self, directory: Path, disk: int, key: bytes, uid: bytes, segment_max: int = SEGMENT_MAX) -> None:
        self.dir = Path(directory)
        self.segment_max = segment_max
        self.disk = disk
        self.key = key
        self.uid = uid
        self.sealer = undo_sealer(key, uid)
        self.opener = undo_opener(key, uid)
        self.segments: list[Segment] = []
        self.log = SegmentLog(self.dir, ".jrn")  # the files; appends go to the last segment
        # The group being applied: its first sequence and the (offset, size) of its UNDO parts.
        self._open_undo: tuple[int, list[tuple[int, int]]] | None = None

    # -- start-up -----------------------------------------------------------------------------------
    def open(self) -> Pending | None:
        """Read every segment. Returns the open group's UNDO at the end, if any (the caller rolls it back
        with `rollback_pending`). A torn last record is cut off; damage anywhere else is refused."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        paths = self.log.paths()
        pending: Pending | None = None
        for i, path in enumerate(paths):
            last_segment = i == len(paths) - 1
            seg, undo = read_segment(path, self.disk, last_segment, self.log)
            if undo is not None:
                recs = [self._decode_part(path, undo[0], at, size) for at, size in undo[1]]
                pending = Pending(path, undo[1][0][0], recs)
            if not seg.groups and pending is None and not last_segment:
                self.log.delete([path])  # created just before a crash, never written: nothing needs it
                continue
            self.segments.append(seg)
        return pending

    def _decode_part(self, path: Path, first: int, at: int, size: int) -> UndoRecord:
        with open(path, "rb") as f:
            f.seek(at + HEADER_SIZE)
            body = f.read(size - HEADER_SIZE)
        return decode_undo(self.disk, first, body, self.opener)

    def rollback_pending(self, pending: Pending, write: Callable[[int, bytes | None, int], None],
                         sync: Callable[[], None]) -> None:
        """Put the old contents of an open group back, sync, then forget its UNDO parts."""
        for rec in pending.records:  # the parts cover disjoint ranges: any order
            apply_undo(rec, write)
        sync()
        self.log.cut(pending.segment, pending.offset)
        self.segments[-1].size = pending.offset
        log.warning("disk %d: rolled back the open group from sequence %d", self.disk, pending.record.sequence)

    # -- appending ----------------------------------------------------------------------------------
    @property
    def groups(self) -> Iterator[Group]:
        for s in self.segments:
            yield from s.groups

    @property
    def last_seq(self) -> int:
        for s in reversed(self.segments):
            if s.groups:
                return s.groups[-1].last
        return 0

    @property
    def open_undo(self) -> bool:
        """A group's UNDO parts are written and its END is not (it is being applied, or it failed)."""
        return self._open_undo is not None

    @property
    def empty(self) -> bool:
        return not any(s.groups for s in self.segments)

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def _append(self, data: bytes, first: int, sync: bool = True) -> int:
        """Append one record to the last segment (a new one first if it is full, never inside a group)
        and fsync it unless told not to; returns the record's offset."""
        inside = self._open_undo is not None and bool(self._open_undo[1])  # a group's parts stay together
        if not self.segments or (self.segments[-1].size >= self.segment_max and not inside):
            self._new_segment(first)
        seg = self.segments[-1]
        self.log.resume(seg.path)
        # On an error (ENOSPC, EIO) the log cuts the partial record off, so no later append buries it.
        at = self.log.append([data], sync)
        seg.size = at + len(data)
        return at

    def _new_segment(self, first: int) -> None:
        """A new last segment: created (it must not exist yet) and its directory fsynced."""
        self.segments.append(Segment(self.log.path(first), 0))
        self.log.start(first, exclusive=True)

    def write_undo(self, first: int, generation: int, pieces: list[tuple[int, bytes]]) -> None:
        """Record the old contents `pieces` of a group (sequences from `first`) before it is written:
        synced. Split into parts of at most UNDO_PART bytes."""
        self._begin_undo(first)
        parts: list[list[tuple[int, bytes]]] = [[]]
        size = 0
        for off, data in pieces:
            if parts[-1] and size + len(data) > UNDO_PART:
                parts.append([])
                size = 0
            parts[-1].append((off, data))
            size += len(data)
        for part in parts:
            self._undo_part(first, generation, part)
        self._sync()

    def write_undo_ranges(self, first: int, generation: int, ranges: list[tuple[int, int]],
                          read: Callable[[int, int], bytes],
                          prefetch: Callable[[list[tuple[int, int]]], None] | None = None) -> None:
        """Record what a group is about to overwrite — the union of (offset, length) `ranges`, each byte
        once, read with `read` — part by part (memory stays ~UNDO_PART whatever the group covers), then
        one fsync. The replica may be written after this returns.

        `prefetch(ranges)` (the replica's) asks for a part's ranges all at once before they are read one
        by one, so the disk sees them together rather than one small random read at a time; the next part
        is asked for while this one is sealed. The pieces are sealed in the sealing pool as they are read."""
        self._begin_undo(first)
        parts = undo_parts(merge_ranges(ranges))
        if prefetch is not None and parts:
            prefetch(parts[0])
        for i, part in enumerate(parts):
            nxt = parts[i + 1] if prefetch is not None and i + 1 < len(parts) else []
            self._undo_part(first, generation, read_pieces(read, part, prefetch, nxt))
        self._sync()

    def discard_undo(self) -> None:
        """The UNDO parts of the open group could not all be written (ENOSPC, EIO) and the replica was not
        touched: cut them off, so the group can be tried again from scratch."""
        if self._open_undo is None:
            return
        _, parts = self._open_undo
        self._open_undo = None
        if parts:
            seg = self.segments[-1]
            self.close()
            self.log.cut(seg.path, parts[0][0])
            seg.size = parts[0][0]

    def _begin_undo(self, first: int) -> None:
        if self._open_undo is not None:
            raise JournalError(f"undo of {first} while the undo of {self._open_undo[0]} is open")
        self._open_undo = (first, [])

    def _undo_part(self, first: int, generation: int, pieces: Iterable[tuple[int, bytes]]) -> None:
        assert self._open_undo is not None
        rec = encode_undo(self.disk, first, generation, pieces, self.sealer)
        at = self._append(rec, first, sync=False)
        self._open_undo[1].append((at, len(rec)))

    def _sync(self) -> None:
        self.log.sync()

    def end_group(self, first: int, last: int, meta: dict[str, Any]) -> Group:
        """Record that the group first..last is in the replica (after its sync): synced."""
        meta = {**meta, "first": first}
        rec = encode_group_end(self.disk, last, meta)
        undo = self._open_undo
        if undo is not None and undo[0] != first:
            raise JournalError(f"end of group {first}..{last} while the undo of {undo[0]} is open")
        self._append(rec, first)
        seg = self.segments[-1]
        g = Group(first, last, meta, seg.path)
        if undo is not None:
            # The parts sit in this segment: rotation waits for a group boundary.
            g.parts = list(undo[1])
        self._open_undo = None
        seg.groups.append(g)
        return g

    def abort(self, write: Callable[[int, bytes | None, int], None], sync: Callable[[], None]) -> None:
        """The group whose UNDO is open failed half-way (an I/O error writing the replica): put the old
        contents back now, so the journal and the replica agree again before anything else happens."""
        if self._open_undo is None:
            return
        first, parts = self._open_undo
        seg = self.segments[-1]
        self.close()
        if not parts:
            self._open_undo = None
            return
        recs = [self._decode_part(seg.path, first, at, size) for at, size in parts]
        self.rollback_pending(Pending(seg.path, parts[0][0], recs), write, sync)
        self._open_undo = None

    def close(self) -> None:
        self.log.close()

    # -- reading ------------------------------------------------------------------------------------
    def undo_records(self, g: Group) -> Iterator[UndoRecord]:
        """The group's UNDO parts, opened one at a time (each verified before it is returned)."""
        for at, size in g.parts:
            yield self.undo_part(g, at, size)

    def undo_part(self, g: Group, at: int, size: int, wanted: list[tuple[int, int]] | None = None) -> UndoRecord:
        """One of the group's UNDO parts (at `at`, `size` bytes), verified and opened (only the extents
        meeting `wanted`, see decode_undo). Thread-safe: a rollback opens the next parts in the sealing
        pool while it writes this one."""
        fd = os.open(g.segment, os.O_RDONLY)
        try:
            data = os.pread(fd, size, at)
        finally:
            os.close(fd)
        s = scan(data)
        if s.problem or s.torn or len(s.records) != 1 or s.records[0][0] != UNDO_TYPE:
            raise JournalError(f"retention journal {g.segment}: undo record of {g.first} at {at} is damaged")
        _, disk, seq, payload = s.records[0]
        return decode_undo(disk, seq, payload, self.opener, wanted)

    def read_undo(self, g: Group) -> UndoRecord | None:
        """All of the group's old contents as one record (tests and small groups; rollbacks go part by
        part with `undo_records`)."""
        recs = list(self.undo_records(g))
        if not recs:
            return None
        return UndoRecord(recs[0].disk, recs[0].sequence, recs[0].generation,
                          tuple(e for r in recs for e in r.extents), tuple(n for r in recs for n in r.lengths))

    def undo_ranges(self, g: Group) -> list[tuple[int, int]]:
        """The (offset, length) ranges `g`'s undo records cover, from their extent tables only."""
        out: list[tuple[int, int]] = []
        with open(g.segment, "rb") as f:
            for at, size in g.parts:
                need = 256
                while True:
                    f.seek(at + HEADER_SIZE)
                    got = undo_table(g.first, f.read(min(need, size - HEADER_SIZE)), self.opener)
                    if isinstance(got, list):
                        out += got
                        break
                    if got > size - HEADER_SIZE:
                        raise JournalError(f"retention journal {g.segment}: undo record of {g.first} is truncated")
                    need = got
        return out

    def groups_after(self, seq: int) -> list[Group]:
        return [g for g in self.groups if g.last > seq]

    def points(self) -> list[Group]:
        return [g for g in self.groups if g.is_point]

    def retention_points(self) -> list[Span]:
        """The points as retention planning sees them, oldest first: each (a proto.point.Point) with the undo
        bytes of the batches from it up to the next point."""
        out: list[Span] = []
        pending = 0
        for g in reversed(list(self.groups)):
            pending += g.undo_bytes
            if g.is_point:
                out.append(Span(Point.from_group(g), pending))
                pending = 0
        out.reverse()
        return out

    def history_bytes(self) -> dict[int, int]:
        """For each point, the undo bytes between it and the replica's newest state (what going back costs)."""
        out: dict[int, int] = {}
        total = 0
        for g in reversed(list(self.groups)):
            if g.is_point:
                out[g.last] = total
            total += g.undo_bytes
        return out

    def find_point(self, seq: int) -> Group | None:
        return next((g for g in self.groups if g.last == seq and g.is_point), None)

    # -- pruning and cutting ------------------------------------------------------------------------
    def freeable_before(self, seq: int) -> int:
        """What `drop_before(seq)` would free, in bytes."""
        freed = 0
        for seg in self.segments[:-1]:
            if not seg.groups or seg.groups[-1].last >= seq:
                break
            freed += seg.size
        return freed

    def drop_before(self, seq: int) -> int:
        """Delete the segments whose groups all end before `seq` (the oldest point kept): what only older
        points needed. Never the last segment. Returns the bytes freed."""
        freed = 0
        while len(self.segments) > 1 and self.segments[0].groups and self.segments[0].groups[-1].last < seq:
            seg = self.segments.pop(0)
            freed += seg.size
            self.log.delete([seg.path])
        if freed:
            self.log.sync_dir()
        return freed

    def drop_all(self) -> int:
        """Delete every segment (no open group): all history goes, the replica stays as it is. The last
        resort of a retention volume too small for the churn between two points. Returns the bytes freed."""
        if self._open_undo is not None:
            return 0
        self.close()
        freed = 0
        for seg in self.segments:
            freed += seg.size
        self.log.delete([seg.path for seg in self.segments])
        self.segments = []
        self.log.sync_dir()
        return freed

    def truncate_after(self, seq: int) -> None:
        """Forget every group after `seq` (a committed failover discards newer history)."""
        self.close()
        self._open_undo = None
        while self.segments:
            seg = self.segments[-1]
            later = [g for g in seg.groups if g.last > seq]
            keep = [g for g in seg.groups if g.last <= seq]
            if not keep and len(self.segments) > 1 and (later or not seg.groups):
                # Wholly newer (or empty: opened by a group that was rolled back): the file goes.
                self.segments.pop()
                self.log.delete([seg.path])
                continue
            if not later:
                break
            # The segment now ends where the first later group began: its UNDO, or its END alone.
            first = later[0]
            end = first.undo_at if first.undo_at >= 0 else self._end_offset(seg, first)
            self.log.cut(seg.path, end)
            seg.size, seg.groups = end, keep
            break
        self.log.sync_dir()

    def _end_offset(self, seg: Segment, g: Group) -> int:
        data = seg.path.read_bytes()
        s = scan(data)
        for n, (ftype, _, seq, _) in enumerate(s.records):
            if ftype == GROUP_END_TYPE and seq == g.last:
                return s.offsets[n]
        raise JournalError(f"retention journal {seg.path}: end of group {g.last} not found")


def apply_undo(rec: UndoRecord, write: Callable[[int, bytes | None, int], None]) -> int:
    """Write an undo record's old contents through `write(offset, data or None for zeros, length)`.
    Returns the bytes written."""
    n = 0
    for (offset, data), length in zip(rec.extents, rec.lengths, strict=True):
        write(offset, data, length)
        n += length
    return n


def old_contents(read: Callable[[int, int], bytes], ranges: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    """Read what a group is about to overwrite, each byte once."""
    return [(a, read(a, n)) for a, n in merge_ranges(ranges)]


def undo_parts(pieces: list[tuple[int, int]], limit: int = UNDO_PART) -> list[list[tuple[int, int]]]:
    """Sorted (offset, length) pieces cut into the ranges of UNDO parts of at most `limit` bytes each."""
    parts: list[list[tuple[int, int]]] = []
    size = 0
    for a, n in pieces:
        if not parts or (parts[-1] and size + n > limit):
            parts.append([])
            size = 0
        parts[-1].append((a, n))
        size += n
    return parts


def read_pieces(read: Callable[[int, int], bytes], ranges: list[tuple[int, int]],
                prefetch: Callable[[list[tuple[int, int]]], None] | None = None,
                after: list[tuple[int, int]] | None = None) -> Iterator[tuple[int, bytes]]:
    """(offset, contents) of `ranges`, read as they are asked for; once all are read, `prefetch(after)`
    (the next ranges to read, while these are being sealed)."""
    for a, n in ranges:
        yield a, read(a, n)
    if prefetch is not None and after:
        prefetch(after)
