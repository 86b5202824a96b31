"""The durable per-disk cache: an append-only log of segment files holding records byte for byte as
they arrived (self-verifying frames, see proto.frames), an in-memory index from sequence to position,
and deletion of whole segments once the master target has applied everything in them.

Promise 1: `append` returns only after the record is fsynced (and, for a new segment, its directory),
so an ACK sent after it means durable. At start-up every segment is scanned: a torn record at the tail
of the newest segment (a crash mid-append, never acked) is cut off; damage anywhere else is refused
loudly rather than skipped — skipping would lose acknowledged data.

Layout: CACHE_DIR/disk-<id>/seg-<first sequence, 20 digits>.log
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from standby.plumbing.durable import fsync_dir
from standby.plumbing.errors import StandbyError
from standby.proto.errors import ProtocolError
from standby.proto.frames import HEADER_SIZE, decode_header, scan_records
from standby.proto.messages import Batch, BatchKind, Commit, decode_message

log = logging.getLogger("standby.ps.cache")

# Segments roll at this size: large enough that fsync of the directory on roll is rare, small enough
# that applied data is freed promptly.
SEGMENT_BYTES = 64 * 1024 * 1024


class CacheCorrupt(StandbyError):
    """A cache segment is damaged before its tail: acknowledged data may be affected."""


@dataclass(slots=True)
class Entry:
    sequence: int
    segment: Path
    offset: int
    length: int


@dataclass(slots=True)
class Recovered:
    last_seq: int
    last_cursor: int  # cursor of the newest INITIAL batch cached, 0 if none
    generation: int
    records: dict[int, RecordInfo]


def _is_torn_tail(seg: Path, good_end: int, size: int) -> bool:
    """A crash mid-append tears only the *last* record: what follows the last good record is either a
    partial header, or a header whose record would reach (or pass) the end of the file. Anything else —
    a complete record that fails its checksum with more bytes after it — is corruption."""
    if size - good_end < HEADER_SIZE:
        return True
    with open(seg, "rb") as f:
        head = os.pread(f.fileno(), HEADER_SIZE, good_end)
    try:
        h = decode_header(head)
    except ProtocolError:
        return False
    return good_end + HEADER_SIZE + h.length >= size


class RecordInfo(NamedTuple):
    """What the server remembers of a cached record until it is applied."""

    kind: str  # a commit's kind ("point", "initial-complete", "resync-complete"), or "batch"
    cursor: int  # INITIAL batches: where the copy stands after it
    nbytes: int  # logical bytes of a batch
    time: float = 0.0  # a point's instant (wall clock)


def record_info(msg: object) -> RecordInfo:
    if isinstance(msg, Commit):
        t = msg.meta.get("time")
        return RecordInfo(str(msg.meta["kind"]), 0, 0, float(t) if isinstance(t, int | float) else 0.0)
    if isinstance(msg, Batch):
        return RecordInfo("batch", msg.cursor if msg.kind == BatchKind.INITIAL else 0, msg.logical_bytes)
    return RecordInfo("other", 0, 0)


class DiskCache:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: list[Entry] = []  # ascending sequence
        # `append` runs in a worker thread (it blocks on fsync) while `after` and `release` run on the event
        # loop: every touch of index, bytes and the open segment holds this lock, or an entry appended
        # during a release is lost (seen: the sender skipped a sequence and replication stalled).
        self._lock = threading.Lock()
        self.bytes = 0
        self._fd: int | None = None
        self._seg: Path | None = None
        self._seg_size = 0

    # -- start-up -----------------------------------------------------------------------------------
    def recover(self) -> Recovered:
        """Rebuild the index from the segments on disk."""
        segs = sorted(self.dir.glob("seg-*.log"))
        last_seq, cursor, gen = 0, 0, 0
        info: dict[int, tuple[str, int, int]] = {}
        for i, seg in enumerate(segs):
            size = seg.stat().st_size
            if size == 0:
                if i == len(segs) - 1:
                    seg.unlink()
                    continue
                raise CacheCorrupt(f"cache segment {seg} is empty but is not the newest")
            records, good_end, problem = scan_records(seg.read_bytes())  # segments are at most ~64 MiB
            for r in records:
                self.index.append(Entry(r.header.sequence, seg, r.offset, r.end - r.offset))
                msg = decode_message(r.header, r.payload)
                if isinstance(msg, Batch | Commit):
                    gen = max(gen, msg.generation)
                info[r.header.sequence] = record_info(msg)
                if isinstance(msg, Batch) and msg.kind == BatchKind.INITIAL:
                    cursor = msg.cursor
                last_seq = r.header.sequence
            if problem:
                if i != len(segs) - 1 or not _is_torn_tail(seg, good_end, size):
                    # Acknowledged records may follow the damage: refuse loudly rather than cut them off.
                    raise CacheCorrupt(
                        f"cache segment {seg} is damaged ({problem}) before its end; "
                        "acknowledged data may be affected — move the segment aside to continue"
                    )
                log.warning("cache %s: cutting a torn tail (%s); it was never acknowledged", seg, problem)
                with open(seg, "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
                size = good_end
            self.bytes += size
        return Recovered(last_seq, cursor, gen, info)

    # -- append -------------------------------------------------------------------------------------
    def append(self, sequence: int, record: bytes | bytearray) -> None:
        """Append one record and make it durable. Called from a worker thread (it blocks on fsync)."""
        self.append_group([(sequence, record)])

    def append_group(self, items: list[tuple[int, bytes | bytearray]]) -> None:
        """Append consecutive records with one fsync for all of them (group commit): none of them is
        durable — and none may be acknowledged — before this returns."""
        with self._lock:
            last = self.index[-1].sequence if self.index else None
            for seq, _ in items:
                if last is not None and seq <= last:
                    # Backstop for promise 2: the cache never holds a sequence twice or out of order.
                    raise ValueError(f"sequence {seq} is not after {last}")
                last = seq
            if self._fd is None or self._seg_size >= SEGMENT_BYTES:
                self._roll(items[0][0])
            assert self._fd is not None and self._seg is not None
            start = pos = self._seg_size
            entries = []
            try:
                for seq, record in items:
                    view = memoryview(record)
                    while view:
                        view = view[os.write(self._fd, view) :]
                    entries.append(Entry(seq, self._seg, pos, len(record)))
                    pos += len(record)
                os.fsync(self._fd)
            except OSError:
                # Leave no half record behind that a later append would bury in the middle of the segment.
                os.ftruncate(self._fd, start)
                raise
            self._seg_size = pos
            self.bytes += pos - start
            self.index.extend(entries)

    def _roll(self, first_seq: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._seg = self.dir / f"seg-{first_seq:020d}.log"
        self._fd = os.open(self._seg, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._seg_size = os.fstat(self._fd).st_size
        fsync_dir(self.dir)

    # -- read and release ---------------------------------------------------------------------------
    def after(self, sequence: int) -> list[Entry]:
        """Entries with a sequence greater than `sequence`, in order."""
        with self._lock:
            return self._after(sequence)

    def _after(self, sequence: int) -> list[Entry]:
        lo, hi = 0, len(self.index)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.index[mid].sequence <= sequence:
                lo = mid + 1
            else:
                hi = mid
        return self.index[lo:]

    @staticmethod
    def read(entry: Entry) -> bytes:
        with open(entry.segment, "rb") as f:
            return os.pread(f.fileno(), entry.length, entry.offset)

    def release(self, applied_seq: int) -> None:
        """Forget entries up to `applied_seq`; delete segments that hold nothing newer."""
        with self._lock:
            self._release(applied_seq)

    def _release(self, applied_seq: int) -> None:
        keep = self._after(applied_seq)
        live = {e.segment for e in keep}
        for seg in {e.segment for e in self.index} - live:
            if seg == self._seg:
                continue  # the open segment is reused until it rolls
            try:
                self.bytes -= seg.stat().st_size
                seg.unlink()
            except FileNotFoundError:
                pass
        self.index = keep
        if not keep and self._seg is not None:
            # Everything is applied: drop the open segment too; the next append starts a new one.
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.bytes -= self._seg_size
            self._seg.unlink(missing_ok=True)
            self._seg = None
            self._seg_size = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
