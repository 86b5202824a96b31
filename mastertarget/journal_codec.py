"""Retention-journal records: pure encoding, decoding and scanning, no file I/O (the files are
mastertarget.journal's).

Records are the self-verifying frames of proto.frames (as in the process server's cache), with frame
types of their own that are only ever stored, never sent:

    0x40 UNDO    disk = disk id, sequence = the batch's sequence
                 payload: generation u32 | extent count u32 | table (offset u64, length u32, stored u32,
                 kind u8, pad 3) | table seal 28 B | sealed old contents, back to back
                 The *old* contents of the blocks the batch overwrites, read from the replica before it is
                 written: compressed and encrypted with the disk's key under the UNDO domain
                 (envelope.UNDO), so an undo ciphertext can never pass as a batch extent or back.
                 Old contents that were zeros travel as zero extents (no bytes).
    0x41 END     disk = disk id, sequence = the group's last sequence
                 payload: canonical JSON {generation, kind, first, time, consistency, tag}; written after
                 the replica is synced: an UNDO without its END is an open group, rolled back at start-up.
    0x42 REDO    as UNDO, under the REDO domain: during a failover, the contents a rollback is about to
                 overwrite, so the operator can move to a newer point again until the failover is committed.
                 disk = disk id, sequence = the step's starting state, generation field = part number
    0x43 MOVE    JSON {src, dst, parts}: a backward step of a failover, followed by its `parts` REDO records
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from standby.proto.envelope import REDO, UNDO, Domain, Opener, Sealer, seal_pieces
from standby.proto.errors import EnvelopeError
from standby.proto.fields import MAX_SEQUENCE
from standby.proto.frames import encode_frame, encode_frame_parts, scan_segment
from standby.proto.marker_meta import MarkerMeta
from standby.proto.messages import MAX_BATCH_LOGICAL, SEAL_SIZE, ExtentKind, meta_bytes
from standby.proto.wire import BadRequest

UNDO_TYPE = 0x40
GROUP_END_TYPE = 0x41
REDO_TYPE = 0x42
MOVE_TYPE = 0x43
_HEAD = struct.Struct(">II")
_ENTRY = struct.Struct(">QIIBxxx")


class JournalError(Exception):
    """A journal record is malformed or fails authentication."""


@dataclass(frozen=True, slots=True)
class UndoRecord:
    disk: int
    sequence: int
    generation: int
    extents: tuple[tuple[int, bytes | None], ...]  # (offset, old contents) or (offset, None) + length below
    lengths: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GroupEnd:
    disk: int
    sequence: int
    meta: dict[str, Any]


def undo_sealer(key: bytes, uid: bytes, level: int = 1, domain: Domain = UNDO) -> Sealer:
    return Sealer(key, uid, level, domain)


def undo_opener(key: bytes, uid: bytes, domain: Domain = UNDO) -> Opener:
    return Opener(key, uid, MAX_BATCH_LOGICAL, domain)


def redo_sealer(key: bytes, uid: bytes) -> Sealer:
    return undo_sealer(key, uid, 1, REDO)


def redo_opener(key: bytes, uid: bytes) -> Opener:
    return undo_opener(key, uid, REDO)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def sealing_pool() -> ThreadPoolExecutor:
    """The threads that seal and open old contents for every disk's journal: one per core. Compressing
    them is most of a journaled group's CPU (zstd releases the GIL), and a group's contents are read
    from the replica meanwhile."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="undo-seal")
        return _pool


def encode_undo(
    disk: int,
    sequence: int,
    generation: int,
    pieces: Iterable[tuple[int, bytes | memoryview]],
    sealer: Sealer,
    ftype: int = UNDO_TYPE,
) -> bytes:
    """One UNDO record holding the old contents `pieces` ((offset, data) in the order of the batch). The
    pieces are sealed in the sealing pool as they come: `pieces` may be a generator reading them."""
    runs = seal_pieces(sealer, generation, sequence, ((off, memoryview(data)) for off, data in pieces),
                       sealing_pool())
    table = [(off, n, len(sealed), ExtentKind.ZERO if zero else ExtentKind.DATA) for zero, off, n, sealed in runs]
    blobs = [sealed for _, _, _, sealed in runs]
    head = _HEAD.pack(generation, len(table)) + b"".join(_ENTRY.pack(*e) for e in table)
    seal = sealer.seal_batch(generation, sequence, head)
    return encode_frame_parts(ftype, disk, sequence, [head, seal, *blobs])


def decode_undo(disk: int, sequence: int, payload: bytes | memoryview, opener: Opener,
                wanted: list[tuple[int, int]] | None = None) -> UndoRecord:
    """Verify and open an UNDO record's payload (everything is checked before anything is returned).

    `wanted`: sorted, disjoint (start, end) byte ranges; only the extents overlapping one are opened and
    returned. A rollback writes each block from the oldest record covering it, so most of a newer
    record's contents are never written: opening (decrypting, decompressing) them was most of a long
    rollback's CPU. The extent table is still authenticated whole, and every extent returned is opened
    and authenticated; an extent left out is neither read nor trusted."""
    p = memoryview(payload)
    keep = _overlaps(wanted) if wanted is not None else None
    try:
        generation, count = _HEAD.unpack_from(p, 0)
        end = _HEAD.size + count * _ENTRY.size
        if end + SEAL_SIZE > len(p):
            raise JournalError(f"undo record {sequence}: extent table truncated")
        head = bytes(p[:end])
        opener.check_batch(generation, sequence, head, p[end : end + SEAL_SIZE])
        pos = end + SEAL_SIZE
        extents: list[tuple[int, bytes | None]] = []
        lengths: list[int] = []
        for i in range(count):
            offset, length, stored, kind = _ENTRY.unpack_from(p, _HEAD.size + i * _ENTRY.size)
            if kind == ExtentKind.ZERO and stored == 0:
                data = None
            elif kind == ExtentKind.DATA and stored and pos + stored <= len(p):
                data = p[pos : pos + stored]
                pos += stored
            else:
                raise JournalError(f"undo record {sequence}: bad extent {i}")
            if keep is not None and not keep(offset, length):
                continue
            if data is not None:
                data = opener.open(generation, sequence, offset, length, data)
            extents.append((offset, data))
            lengths.append(length)
        if pos != len(p):
            raise JournalError(f"undo record {sequence}: {len(p) - pos} bytes after the last extent")
    except struct.error:
        raise JournalError(f"undo record {sequence}: truncated") from None
    except EnvelopeError as exc:
        raise JournalError(f"undo record {sequence} failed authentication: {exc}") from None
    return UndoRecord(disk, sequence, generation, tuple(extents), tuple(lengths))


def _overlaps(wanted: list[tuple[int, int]]) -> Callable[[int, int], bool]:
    """Whether [offset, offset + length) meets one of `wanted` (sorted, disjoint (start, end) ranges)."""
    ends = [b for _, b in wanted]

    def meets(offset: int, length: int) -> bool:
        k = bisect.bisect_right(ends, offset)  # the first range ending after `offset`
        return k < len(wanted) and wanted[k][0] < offset + length

    return meets


def undo_table(sequence: int, prefix: bytes | memoryview, opener: Opener) -> list[tuple[int, int]] | int:
    """The (offset, length) ranges of an UNDO/REDO payload from its first bytes, table seal checked; or,
    if `prefix` is too short, how many bytes are needed. Lets a rollback plan its writes without
    decrypting contents it may not use."""
    p = memoryview(prefix)
    if len(p) < _HEAD.size:
        return _HEAD.size
    generation, count = _HEAD.unpack_from(p, 0)
    end = _HEAD.size + count * _ENTRY.size
    if len(p) < end + SEAL_SIZE:
        return end + SEAL_SIZE
    try:
        opener.check_batch(generation, sequence, bytes(p[:end]), p[end : end + SEAL_SIZE])
    except EnvelopeError as exc:
        raise JournalError(f"undo record {sequence} failed authentication: {exc}") from None
    return [_ENTRY.unpack_from(p, _HEAD.size + i * _ENTRY.size)[:2] for i in range(count)]


def encode_group_end(disk: int, sequence: int, meta: dict[str, Any]) -> bytes:
    check_end_meta(sequence, meta)
    return encode_frame(GROUP_END_TYPE, disk, sequence, meta_bytes(meta))


def check_end_meta(sequence: int, meta: Any) -> MarkerMeta:
    """The meta of a group end is a MARKER's meta (checked again: the file may be damaged or crafted behind a
    valid checksum) or the journal's own kind `batch`, plus `first`. JournalError if it is not: a journal
    whose points cannot be named must not be listed or moved to, and the disk says why."""
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise JournalError(f"group end {sequence}: the sequence is beyond what a disk's stream numbers")
    try:
        return MarkerMeta.from_wire(meta, what="group end meta")
    except BadRequest as exc:
        raise JournalError(f"group end {sequence}: {exc}") from None


def decode_group_end(disk: int, sequence: int, payload: bytes | memoryview) -> GroupEnd:
    try:
        meta = json.loads(bytes(payload))
    except (ValueError, RecursionError):
        raise JournalError(f"group end {sequence}: not JSON") from None
    check_end_meta(sequence, meta)
    return GroupEnd(disk, sequence, meta)


@dataclass(frozen=True, slots=True)
class Scan:
    records: list[tuple[int, int, int, memoryview]]  # (type, disk, sequence, payload)
    good_end: int  # offset after the last intact record
    torn: bool  # what follows good_end is a torn last write (cut it off)
    problem: str | None  # anything after good_end that is not a torn tail: damage (refuse to go on)
    offsets: list[int]  # where each of `records` starts in the buffer


def scan(buf: bytes | memoryview) -> Scan:
    """Read a journal segment; what follows its last good record is a torn tail or damage by the one
    rule of proto.frames.classify_tail."""
    records, good_end, tail = scan_segment(buf)
    out = [(r.header.type, r.header.disk, r.header.sequence, r.payload) for r in records]
    offsets = [r.offset for r in records]
    return Scan(out, good_end, tail.torn, tail.reason if tail.damaged else None, offsets)
