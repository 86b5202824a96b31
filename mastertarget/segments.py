"""How a disk's retention journal (mastertarget.journal) knows its segment files: each segment indexed
as the groups it holds (`Group`: first and last sequence, the meta of its end, where its UNDO parts are), read at
start-up by walking the record headers only (`walk_records`, `read_segment`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.plumbing.segmentlog import SegmentLog
from standby.proto.enums import MarkerKind
from standby.proto.errors import ProtocolError
from standby.proto.frames import HEADER_SIZE, check_payload, classify_tail, decode_header
from standby.proto.point import meta_time

from .journal_codec import GROUP_END_TYPE, UNDO_TYPE, JournalError, UndoRecord, decode_group_end

log = logging.getLogger("standby.mt.history")


@dataclass(slots=True)
class Group:
    """One applied group of records as the journal knows it."""

    first: int
    last: int
    meta: dict[str, Any]
    segment: Path
    parts: list[tuple[int, int]] = field(default_factory=list)  # (offset, size) of its UNDO records in `segment`

    @property
    def undo_at(self) -> int:
        """Offset of the group's first UNDO record (-1: the group wrote nothing)."""
        return self.parts[0][0] if self.parts else -1

    @property
    def undo_bytes(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def is_point(self) -> bool:
        return self.meta.get("kind") == MarkerKind.POINT

    @property
    def time(self) -> float:
        return meta_time(self.meta)

    @property
    def consistency(self) -> str:
        return str(self.meta.get("consistency", ""))


@dataclass(slots=True)
class Pending:
    """UNDO parts whose END never came (an open group): the replica may hold part of their group. `offset` is where
    the first part starts (the segment is cut there after the rollback)."""

    segment: Path
    offset: int
    records: list[UndoRecord]

    @property
    def record(self) -> UndoRecord:
        return self.records[0]


@dataclass
class Segment:
    path: Path
    size: int
    groups: list[Group] = field(default_factory=list)


@dataclass(slots=True)
class Walk:
    records: list[tuple[int, int, int, int, int, bytes | None]]  # type, disk, sequence, offset, size, payload
    good_end: int
    torn: bool
    problem: str | None


def walk_records(path: Path, small: int = 1 << 16) -> Walk:
    """Walk a journal file by its record headers without reading large payloads (start-up must not read
    a whole retention window). Payloads up to `small` bytes, and the last record's, are read and
    checked; the others are checked when they are used (an undo record when a point is restored).
    What follows the last good record is a torn write or damage by proto.frames.classify_tail."""
    out: list[tuple[int, int, int, int, int, bytes | None]] = []
    size = path.stat().st_size
    pos = 0
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            head = f.read(HEADER_SIZE)
            try:
                h = decode_header(head)
            except ProtocolError as exc:
                return _stop(out, pos, head, size, f"bad record at offset {pos}: {exc}")
            end = pos + HEADER_SIZE + h.length
            if end > size:
                return _stop(out, pos, head, size, f"torn record at offset {pos}")
            payload = None
            if h.length <= small or end == size:
                payload = f.read(h.length)
                try:
                    check_payload(h, payload)
                except ProtocolError as exc:
                    return _stop(out, pos, head, size, f"bad record at offset {pos}: {exc}")
            out.append((h.type, h.disk, h.sequence, pos, end - pos, payload))
            pos = end
    return Walk(out, pos, False, None)


def _stop(out: list[tuple[int, int, int, int, int, bytes | None]], pos: int, head: bytes, size: int,
          problem: str) -> Walk:
    """The walk ends at `pos`, the end of the last good record: a torn tail there, or damage."""
    tail = classify_tail(head, size - pos, problem)
    return Walk(out, pos, tail.torn, tail.reason if tail.damaged else None)


def read_segment(path: Path, disk: int, last: bool,
                 files: SegmentLog) -> tuple[Segment, tuple[int, list[tuple[int, int]]] | None]:
    """Index one segment file of disk `disk`'s journal at start-up: its ended groups, and the (first
    sequence, (offset, size) of each part) of UNDO parts at its end that have no END — only the last
    segment (`last`) may end so. A torn last record of the last segment is cut off (through `files`, the
    journal's segment log); damage anywhere else is refused."""
    w = walk_records(path)
    if w.problem is not None:
        raise JournalError(f"retention journal {path} is damaged: {w.problem}")
    if w.torn:
        if not last:
            raise JournalError(f"retention journal {path}: torn record before the last segment")
        log.warning("disk %d: cutting a torn record off the end of %s", disk, path)
        files.cut(path, w.good_end)
    seg = Segment(path, w.good_end)
    undo: tuple[int, list[tuple[int, int]]] | None = None  # (first, parts) of UNDOs awaiting their END
    for ftype, rec_disk, seq, at, size, payload in w.records:
        if rec_disk != disk:
            raise JournalError(f"retention journal {path}: record of disk {rec_disk} in disk {disk}'s")
        if ftype == UNDO_TYPE:
            if undo is None:
                undo = (seq, [(at, size)])
            elif undo[0] == seq:
                undo[1].append((at, size))  # the next part of the same group
            else:
                raise JournalError(f"retention journal {path}: undo records of {undo[0]} and {seq} "
                                   "without a group end between them")
        elif ftype == GROUP_END_TYPE and payload is not None:
            c = decode_group_end(rec_disk, seq, payload)
            first = _int(c.meta.get("first", seq), f"{path}: group end {seq}")
            g = Group(first, seq, c.meta, path)
            if undo is not None:
                if undo[0] != first:
                    raise JournalError(f"retention journal {path}: group end {seq} does not match undo {undo[0]}")
                g.parts = undo[1]
                undo = None
            seg.groups.append(g)
        else:
            raise JournalError(f"retention journal {path}: unexpected record type {ftype:#x} at {at}")
    if undo is not None and not last:
        raise JournalError(f"retention journal {path}: undo record of an open group before the last segment")
    return seg, undo


def _int(v: Any, where: str) -> int:
    if type(v) is not int or v < 0:
        raise JournalError(f"retention journal {where}: bad value {v!r}")
    return v
