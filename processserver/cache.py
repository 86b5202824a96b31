"""The durable per-disk cache: an append-only log of segment files holding records byte for byte as
they arrived (self-verifying frames, see proto.frames), an in-memory index from sequence to position,
and deletion of whole segments once the master target has applied everything in them.

Promise 1: `append` returns only after the record is fsynced (and, for a new segment, its directory),
so an ACK sent after it means durable. At start-up every segment is scanned: a torn record at the tail
of the newest segment (a crash mid-append, never acked) is cut off; damage anywhere else is refused
loudly rather than skipped — skipping would lose acknowledged data (the rule: proto.frames.classify_tail).
The files themselves — segments, appends with fsync, rotation, cuts, deletion — are a
plumbing.segmentlog.SegmentLog; what a record is, what is acknowledged and when a segment may go is here.

Layout: CACHE_DIR/disk-<id>/seg-<first sequence, 20 digits>.log
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from standby.plumbing.durable import fsync_dir
from standby.plumbing.errors import StandbyError
from standby.plumbing.segmentlog import SegmentLog
from standby.proto.enums import MarkerKind
from standby.proto.errors import ProtocolError
from standby.proto.fields import MARKER_KINDS
from standby.proto.frames import HEADER_SIZE, classify_tail, scan_records
from standby.proto.messages import Batch, BatchKind, Marker, decode_message
from standby.proto.point import meta_time

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
    damage: str | None = None  # what was set aside as damaged (then the disk needs a resync)


class RecordInfo(NamedTuple):
    """What the server remembers of a cached record until it is applied."""

    marker: MarkerKind | None  # what a MARKER marks; None for a batch (or a marker of a kind not known here)
    cursor: int  # INITIAL batches: where the copy stands after it
    nbytes: int  # logical bytes of a batch
    time: float = 0.0  # a point's instant (wall clock)


def record_info(msg: object) -> RecordInfo:
    if isinstance(msg, Marker):
        kind = msg.meta.get("kind")
        marker = MarkerKind(kind) if isinstance(kind, str) and kind in MARKER_KINDS else None
        return RecordInfo(marker, 0, 0, meta_time(msg.meta))  # a peer's time: never trusted
    if isinstance(msg, Batch):
        return RecordInfo(None, msg.cursor if msg.kind == BatchKind.INITIAL else 0, msg.logical_bytes)
    return RecordInfo(None, 0, 0)


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
        # Records are read back to be forwarded soon after they are written: their pages stay cached
        # until their segment is released and deleted (at most a segment or two when the master target
        # keeps up).
        self.log = SegmentLog(self.dir, ".log", drop_synced=False)

    # -- start-up -----------------------------------------------------------------------------------
    def recover(self, acked: int = 0) -> Recovered:
        """Rebuild the index from the segments on disk. `acked`: the highest sequence this server may
        have acknowledged (the registry's received_seq) — nothing at or below it is ever cut off as a
        torn tail (promise 1).

        A torn last record that was never acknowledged (a crash mid-append) is cut off. Any other damage
        — a record that fails its checksum, does not decode, or an acknowledged record torn — is not
        skipped and does not stop the server: the records before it stay (they are intact and in order),
        the damaged segment and everything after it are moved to `quarantine/` (kept for inspection), and
        `Recovered.damage` says what was lost, so the caller can have the disk resynced (promise 3)."""
        segs = self.log.paths()
        last_seq, cursor, gen = 0, 0, 0
        info: dict[int, RecordInfo] = {}
        damage: str | None = None
        lost_from = 0  # the first sequence set aside with the damage
        for i, seg in enumerate(segs):
            newest = i == len(segs) - 1
            size = seg.stat().st_size
            if size == 0:
                if newest:
                    seg.unlink()
                    continue
                damage = f"cache segment {seg.name} is empty but is not the newest"
                lost_from = SegmentLog.first_of(seg)
                self._quarantine(segs[i:], None)
                break
            data = seg.read_bytes()  # segments are at most ~64 MiB
            records, good_end, problem = scan_records(data)
            # The last intact sequence of this segment; before its first record, the one before its first
            # (from its name): what came earlier may have been applied and its segments released long ago.
            seg_last = SegmentLog.first_of(seg) - 1
            for r in records:
                try:
                    msg = decode_message(r.header, r.payload)
                except ProtocolError as exc:
                    problem, good_end = f"record {r.header.sequence} does not decode: {exc}", r.offset
                    break
                if self.index and r.header.sequence <= last_seq:
                    # Written in order, one sequence each (append_group checks): a crafted or mixed-up file.
                    problem, good_end = f"sequence {r.header.sequence} is not after {last_seq}", r.offset
                    break
                self.index.append(Entry(r.header.sequence, seg, r.offset, r.end - r.offset))
                if isinstance(msg, Batch | Marker):
                    gen = max(gen, msg.generation)
                info[r.header.sequence] = record_info(msg)
                if isinstance(msg, Batch) and msg.kind == BatchKind.INITIAL:
                    cursor = msg.cursor
                last_seq = seg_last = r.header.sequence
            if problem:
                # Acknowledged if its sequence (the one after the last intact) is not beyond what was.
                tail = classify_tail(data[good_end : good_end + HEADER_SIZE], size - good_end, problem,
                                     newest=newest, acknowledged=seg_last + 1 <= acked)
                if tail.torn:
                    log.warning("cache %s: cutting a torn tail (%s); it was never acknowledged", seg, problem)
                    self.log.cut(seg, good_end)
                    size = good_end
                else:
                    # Acknowledged records may be in or after the damage: keep the intact prefix, set the
                    # rest aside, say what is lost.
                    damage = f"cache segment {seg.name} is damaged at offset {good_end} ({problem})"
                    lost_from = seg_last + 1
                    self._quarantine(segs[i:], (seg, good_end))
                    self.index = [e for e in self.index if e.segment != seg or e.offset < good_end]
                    self.bytes += good_end
                    break
            self.bytes += size
        if damage is not None and acked >= lost_from:
            # Not from 1: what came before the damaged segment may have been applied and released long ago.
            damage += f"; records {lost_from}..{acked} are lost" if acked > lost_from else f"; record {acked} is lost"
        return Recovered(last_seq, cursor, gen, info, damage)

    def _quarantine(self, segs: list[Path], keep: tuple[Path, int] | None) -> None:
        """Move damaged segments into `quarantine/`; `keep`: a segment whose intact first bytes stay in
        place (a copy of the whole file goes to quarantine)."""
        qdir = self.dir / "quarantine"
        qdir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for seg in segs:
            dest = qdir / f"{seg.name}.{stamp}"
            if keep is not None and seg == keep[0]:
                try:
                    shutil.copy2(seg, dest)
                except OSError as exc:
                    # A full cache volume: the copy for inspection is given up, the disk is not (its intact
                    # prefix stays and the resync repairs the rest).
                    dest.unlink(missing_ok=True)
                    log.error("cache: damaged segment %s: no copy kept for inspection (%s)", seg,
                              exc.strerror or exc)
                self.log.cut(seg, keep[1])
                if keep[1] == 0:
                    seg.unlink()
            else:
                os.replace(seg, dest)
            log.error("cache: damaged segment %s set aside as %s", seg, dest)
        fsync_dir(qdir)
        self.log.sync_dir()

    # -- append -------------------------------------------------------------------------------------
    def append(self, sequence: int, record: bytes | bytearray) -> None:
        """Append one record and make it durable. Called from a worker thread (it blocks on fsync)."""
        self.append_group([(sequence, record)])

    def append_group(self, items: list[tuple[int, bytes | bytearray]]) -> None:
        """Append consecutive records with one fsync for all of them: none of them is
        durable — and none may be acknowledged — before this returns."""
        with self._lock:
            last = self.index[-1].sequence if self.index else None
            for seq, _ in items:
                if last is not None and seq <= last:
                    # Backstop for promise 2: the cache never holds a sequence twice or out of order.
                    raise ValueError(f"sequence {seq} is not after {last}")
                last = seq
            if self.log.tail is None or self.log.size >= SEGMENT_BYTES:
                self.log.start(items[0][0])  # a new segment: its directory is fsynced
            seg = self.log.tail
            assert seg is not None
            # One fsync for the group; on an error no half record is left for a later append to bury.
            pos = start = self.log.append([record for _, record in items])
            entries = []
            for seq, record in items:
                entries.append(Entry(seq, seg, pos, len(record)))
                pos += len(record)
            self.bytes += pos - start
            self.index.extend(entries)

    def set_aside_from(self, sequence: int) -> int:
        """Move every record from `sequence` on into quarantine/ (an operator's resync after the master
        target refused one as not authentic: the copies are kept for inspection, never applied). Returns
        how many records were set aside."""
        with self._lock:
            gone = [e for e in self.index if e.sequence >= sequence]
            if not gone:
                return 0
            first = gone[0]
            later = sorted({e.segment for e in gone} - {first.segment})
            if self.log.tail is not None and (self.log.tail == first.segment or self.log.tail in later):
                self.log.forget_tail()  # the next append starts a new segment
            before = sum(p.stat().st_size for p in {first.segment, *later} if p.exists())
            self._quarantine([first.segment, *later], (first.segment, first.offset))
            after = first.segment.stat().st_size if first.segment.exists() else 0
            self.bytes -= before - after
            self.index = [e for e in self.index if e.sequence < sequence]
            return len(gone)

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
        # The open segment is reused until it rolls.
        done = sorted({e.segment for e in self.index} - live - {self.log.tail})
        self.bytes -= self.log.delete(done)
        self.index = keep
        if not keep and self.log.tail is not None:
            # Everything is applied: drop the open segment too; the next append starts a new one.
            self.bytes -= self.log.size
            self.log.delete([self.log.tail])

    def close(self) -> None:
        self.log.forget_tail()


def drop_quarantine(cache_dir: Path, want: int = SEGMENT_BYTES) -> tuple[int, int]:
    """Delete the oldest segments set aside in any disk's `quarantine/` until `want` bytes are freed (or
    none is left): called when the cache volume is full. They are kept for inspection only, and a
    quarantine that fills the volume would stop every disk (the fault campaign's full-cache wedge after
    repeated damage): replication comes first. Returns (files, bytes) deleted."""
    found = []
    for f in cache_dir.glob("disk-*/quarantine/*"):
        try:
            st = f.stat()
        except OSError:
            continue
        found.append((st.st_mtime, st.st_size, f))
    files = freed = 0
    for _, size, f in sorted(found):
        if freed >= want:
            break
        try:
            f.unlink()
        except OSError:
            continue
        files, freed = files + 1, freed + size
        log.warning("cache: deleted %s (%d bytes), set aside earlier for inspection: the cache volume is full",
                    f, size)
    return files, freed
