"""Write-order workload and crash-consistency checker (DESIGN.md §3 promise 4, §13).

A recovery point labelled ``crash-consistent`` must equal the source disk at one instant. To test that
without trusting any of our own replication code, a workload writes *numbered* records to a region of a
block device (or image file), one at a time, each complete before the next starts, so the record number
is the completion order. Any instant of the source is then "records 1..N applied, nothing after", for
some cut N. The checker reads a replica and decides whether one N explains every slot of the region.

Region: ``[offset, offset + slots * 4096)``, cut into 4 KiB slots. ``format`` writes record 0 to every
slot so the initial state is known.

Record layout (one 4096-byte block, little endian)::

    0     8  magic  b"SBYWOREC"
    8     8  record number n (u64; 0 = written by format)
    16    4  slot index (u32) the record was written to
    20    4  layout version (u32, = 1)
    24    8  seed of the run (u64) - a block of another run is "foreign", not a valid old record
    32 4056  filler = SHAKE-128(seed, n, slot): deterministic (replay builds byte-identical images)
             and incompressible (the compressor in the pipeline gets no free ride)
    4088  8  xxh3_64 of bytes 0..4088 - a torn block (halves of two records) fails it

Log file (so another process can check later; 40-byte header, then 12 bytes a record)::

    header: magic b"SBYWOLOG", version u32, slot size u32, offset u64, slots u64, seed u64
    entry:  record number u64, slot u32      (entries are 1, 2, 3, ... in order)

The writer appends a record's log entry (one unbuffered ``write``) *before* writing the record to the
device. So the log is always a superset of the completed writes, even if the workload is killed with
SIGKILL: a logged record that never reached the device only looks like a cut just before it, whereas
the opposite order would leave records on the device the checker has never heard of.

Command line (run from the repository root)::

    python3 -m tests.writeorder write DEVICE --offset O --slots N --log FILE [--rate R] [--seconds S]
                                             [--count C] [--seed X] [--sync auto|direct|dsync|fdatasync|none]
    python3 -m tests.writeorder check IMAGE --offset O --slots N --log FILE
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import signal
import stat
import struct
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

SLOT = 4096
RECORD_MAGIC = b"SBYWOREC"
RECORD_VERSION = 1
HEADER = struct.Struct("<8sQIIQ")  # magic, n, slot, version, seed
FILLER_AT = HEADER.size  # 32
HASH_AT = SLOT - 8
FILLER_LEN = HASH_AT - FILLER_AT
FILLER_KEY = struct.Struct("<QQI")

LOG_MAGIC = b"SBYWOLOG"
LOG_VERSION = 1
LOG_HEADER = struct.Struct("<8sIIQQQ")  # magic, version, slot size, offset, slots, seed
LOG_ENTRY = struct.Struct("<QI")  # record number, slot

SYNC_MODES = ("auto", "direct", "dsync", "fdatasync", "none")
DEFAULT_MAX_SECONDS = 600.0  # a writer with no count and no duration still stops: runaway tests must end
READ_CHUNK_SLOTS = 256  # 1 MiB reads: few syscalls, bounded memory
MAX_REASONS = 12
U64 = (1 << 64) - 1

ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str] | Callable[[int, int], bytes]


# --------------------------------------------------------------------------------------------------
# Records


def make_record(seed: int, n: int, slot: int) -> bytes:
    """The exact 4096 bytes of record ``n`` written to ``slot`` in the run ``seed``.

    Deterministic, so a replay from the log rebuilds the source byte for byte and the checker can demand
    byte equality, not just a plausible header.
    """
    head = HEADER.pack(RECORD_MAGIC, n, slot, RECORD_VERSION, seed & U64)
    body = head + hashlib.shake_128(FILLER_KEY.pack(seed & U64, n, slot)).digest(FILLER_LEN)
    return body + xxhash.xxh3_64_digest(body)[::-1]  # digest is big endian; store the u64 little endian


@dataclass(frozen=True)
class Decoded:
    """What a block holds, as far as it can be told without the log."""

    kind: str  # "record", "torn", "foreign"
    n: int = -1
    slot: int = -1
    seed: int = -1
    detail: str = ""


def decode_record(block: bytes | memoryview) -> Decoded:
    """Classify one block: a valid record, a torn one (our magic, bad checksum) or foreign data.

    Torn is kept apart from foreign because it points at a different bug: a write applied in pieces
    (or two writes mixed) rather than a write to the wrong place or a never-written block.
    """
    if len(block) != SLOT:
        return Decoded("foreign", detail=f"short block ({len(block)} bytes)")
    magic, n, slot, version, seed = HEADER.unpack_from(block, 0)
    if magic != RECORD_MAGIC:
        if not any(block):
            return Decoded("foreign", detail="zeros")
        return Decoded("foreign", detail=f"no record magic (starts {bytes(block[:8]).hex()})")
    stored = int.from_bytes(block[HASH_AT:], "little")
    if xxhash.xxh3_64_intdigest(block[:HASH_AT]) != stored:
        return Decoded("torn", n, slot, seed, detail=f"checksum mismatch (header says record {n}, slot {slot})")
    if version != RECORD_VERSION:
        return Decoded("foreign", n, slot, seed, detail=f"record layout version {version}")
    return Decoded("record", n, slot, seed)


# --------------------------------------------------------------------------------------------------
# The write log


@dataclass
class WriteLog:
    """Which slot each record went to: ``slot_of[n]`` for n = 1..last (index 0 is unused).

    Records are numbered densely from 1, so the slot list alone is the whole history; an ``array`` keeps
    a million records in 4 MB instead of a list of tuples.
    """

    seed: int
    offset: int
    slots: int
    slot_of: array = field(default_factory=lambda: array("I", [0]))

    @property
    def last(self) -> int:
        """Number of the newest record in the log (0 when nothing was written)."""
        return len(self.slot_of) - 1

    def append(self, slot: int) -> int:
        """Record that the next record went to ``slot``; return its number."""
        self.slot_of.append(slot)
        return self.last

    def pairs(self) -> Iterator[tuple[int, int]]:
        """(n, slot) for every record, in order."""
        for n in range(1, len(self.slot_of)):
            yield n, self.slot_of[n]

    def writes_to(self, slot: int) -> list[int]:
        """Record numbers written to ``slot``, ascending (for tests and reports, O(log length))."""
        return [n for n, s in self.pairs() if s == slot]

    @classmethod
    def from_pairs(cls, seed: int, offset: int, slots: int, pairs: Iterable[tuple[int, int]]) -> WriteLog:
        """Build from (n, slot) pairs, which must be numbered 1, 2, 3, ... (the writer's in-memory form)."""
        log = cls(seed, offset, slots)
        for n, slot in pairs:
            if n != log.last + 1:
                raise ValueError(f"log entries must be numbered 1, 2, 3, ...: got {n} after {log.last}")
            if not 0 <= slot < slots:
                raise ValueError(f"record {n}: slot {slot} outside 0..{slots - 1}")
            log.append(slot)
        return log

    @classmethod
    def from_slots(cls, seed: int, offset: int, slots: int, slot_seq: Iterable[int]) -> WriteLog:
        """Build from the slot of record 1, 2, 3, ... (what hypothesis generates)."""
        return cls.from_pairs(seed, offset, slots, enumerate(slot_seq, start=1))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> WriteLog:
        """Parse a log file. A partial last entry (writer killed mid-append) is ignored, not an error."""
        data = Path(path).read_bytes()
        if len(data) < LOG_HEADER.size:
            raise ValueError(f"{path}: too short for a write-order log header")
        magic, version, slot_size, offset, slots, seed = LOG_HEADER.unpack_from(data, 0)
        if magic != LOG_MAGIC or version != LOG_VERSION or slot_size != SLOT:
            raise ValueError(f"{path}: not a write-order log (magic {magic!r}, version {version}, slot {slot_size})")
        log = cls(seed, offset, slots)
        body = memoryview(data)[LOG_HEADER.size :]
        whole = len(body) // LOG_ENTRY.size * LOG_ENTRY.size
        for n, slot in LOG_ENTRY.iter_unpack(body[:whole]):
            if n != log.last + 1 or slot >= slots:
                raise ValueError(f"{path}: bad entry after record {log.last}: ({n}, {slot})")
            log.append(slot)
        return log


class _LogFile:
    """Append-only log file writer: one unbuffered write per entry, so a killed writer loses nothing."""

    def __init__(self, path: str | os.PathLike[str], log: WriteLog) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
        os.write(self.fd, LOG_HEADER.pack(LOG_MAGIC, LOG_VERSION, SLOT, log.offset, log.slots, log.seed))

    def append(self, n: int, slot: int) -> None:
        os.write(self.fd, LOG_ENTRY.pack(n, slot))

    def close(self) -> None:
        if self.fd >= 0:
            os.fdatasync(self.fd)
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------------------------------
# Workload


def slot_plan(seed: int, slots: int) -> Iterator[int]:
    """Endless, seed-determined sequence of slots to write.

    The mix is what makes the test bite: uniform random slots (spread), a small hot set (slots rewritten
    often, so "stale" and "future" versions of one slot exist), and runs of consecutive slots written in
    order (multi-block dependencies, like a file system writing a journal then its data) - a replica that
    applies a run out of order or half of it shows up as a mix of two cuts.
    """
    if slots < 1:
        raise ValueError("need at least one slot")
    rng = random.Random(f"standby-writeorder-plan:{seed}")
    hot = [rng.randrange(slots) for _ in range(max(1, slots // 32))]
    while True:
        x = rng.random()
        if x < 0.15 and slots > 1:
            start = rng.randrange(slots)
            for i in range(rng.randint(2, min(32, slots))):
                yield (start + i) % slots
        elif x < 0.40:
            yield rng.choice(hot)
        else:
            yield rng.randrange(slots)


def _region_check(offset: int, slots: int) -> None:
    if offset < 0 or offset % SLOT:
        raise ValueError(f"offset {offset} must be a non-negative multiple of {SLOT} (O_DIRECT alignment)")
    if slots < 1:
        raise ValueError("need at least one slot")


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def format(path: str | os.PathLike[str], offset: int, slots: int, seed: int) -> None:
    """Write record 0 to every slot and fsync, so the state before record 1 is known exactly.

    A regular file is created or extended as needed; a block device must already be large enough.
    """
    _region_check(offset, slots)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode) and _device_size(fd) < offset + slots * SLOT:
            raise ValueError(f"{path}: device has {_device_size(fd)} bytes, region needs {offset + slots * SLOT}")
        for first in range(0, slots, READ_CHUNK_SLOTS):
            chunk = b"".join(make_record(seed, 0, s) for s in range(first, min(slots, first + READ_CHUNK_SLOTS)))
            _pwrite_all(fd, chunk, offset + first * SLOT)
        os.fsync(fd)
        # Drop the cached copy so a later O_DIRECT writer and a reader of the device see the same bytes.
        os.posix_fadvise(fd, offset, slots * SLOT, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview | mmap.mmap, off: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, off)
        if done <= 0:
            raise OSError(f"short write at {off}")
        view = view[done:]
        off += done


class Writer:
    """Writes records 1, 2, 3, ... one at a time, each durable before the next starts.

    ``sync`` chooses how "complete" is enforced: ``direct`` (O_DIRECT | O_DSYNC: the write has reached
    the device when ``pwrite`` returns, so the block layer sees the writes in numbering order - what a
    change tracker on the source observes), ``dsync`` (O_DSYNC through the page cache), ``fdatasync``
    (pwrite then fdatasync), ``none`` (page cache only: order holds for readers of the same file, which
    is all unit tests on image files need; never use it on a tracked device, where writeback may
    reorder). ``auto`` = direct, or dsync where O_DIRECT is refused (tmpfs).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        offset: int,
        slots: int,
        *,
        seed: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        rate: float | None = None,
        sync: str = "auto",
    ) -> None:
        _region_check(offset, slots)
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for as fast as possible)")
        self.path = os.fspath(path)
        self.offset = offset
        self.slots = slots
        self.seed = random.getrandbits(63) if seed is None else seed & U64
        self.rate = rate
        self.log = WriteLog(self.seed, offset, slots)
        self.log_path = log_path
        self.requested_sync = sync
        self.mode = ""
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._plan = slot_plan(self.seed, slots)

    def format(self) -> None:
        """Write record 0 everywhere (see ``format``); call once before ``run``."""
        format(self.path, self.offset, self.slots, self.seed)

    def stop(self) -> None:
        """Ask ``run`` to stop after the record in flight (safe from a signal handler or another thread)."""
        self._stop.set()

    @property
    def writes_per_second(self) -> float:
        """Achieved rate of the last ``run``."""
        return self.log.last / self.elapsed if self.elapsed > 0 else 0.0

    def _open(self) -> tuple[int, str]:
        base = os.O_WRONLY | os.O_CLOEXEC
        want = self.requested_sync
        if want in ("auto", "direct"):
            try:
                return os.open(self.path, base | os.O_DIRECT | os.O_DSYNC), "direct"
            except OSError:
                if want == "direct":
                    raise
                want = "dsync"
        flags = base | (os.O_DSYNC if want == "dsync" else 0)
        return os.open(self.path, flags), want

    def run(
        self,
        *,
        count: int | None = None,
        seconds: float | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> int:
        """Write until ``count`` records, ``seconds`` elapsed, ``stop()`` true or ``self.stop()``.

        With neither count nor seconds, ``DEFAULT_MAX_SECONDS`` applies: the workload is always bounded.
        Returns the number of the last record written (0 if none). Can be called once per Writer.
        """
        if count is None and seconds is None:
            seconds = DEFAULT_MAX_SECONDS
        logfile = _LogFile(self.log_path, self.log) if self.log_path is not None else None
        try:
            fd, self.mode = self._open()
        except BaseException:
            if logfile is not None:
                logfile.close()
            raise
        buf = mmap.mmap(-1, SLOT)  # page aligned, as O_DIRECT requires
        start = time.monotonic()
        deadline = start + seconds if seconds is not None else None
        try:
            while not self._stop.is_set():
                n = self.log.last + 1
                if count is not None and n > count:
                    break
                if stop is not None and stop():
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if self.rate is not None and not self._pace(start + (n - 1) / self.rate, deadline):
                    break
                slot = next(self._plan)
                if logfile is not None:
                    logfile.append(n, slot)  # before the device write: the log stays a superset
                buf[:] = make_record(self.seed, n, slot)
                _pwrite_all(fd, buf, self.offset + slot * SLOT)
                if self.mode == "fdatasync":
                    os.fdatasync(fd)
                self.log.append(slot)
        finally:
            self.elapsed = time.monotonic() - start
            if self.mode == "none":
                os.fsync(fd)  # durable at the end at least, like the other modes
            os.close(fd)
            buf.close()
            if logfile is not None:
                logfile.close()
        return self.log.last

    def _pace(self, due: float, deadline: float | None) -> bool:
        """Sleep until ``due`` in short naps so stop requests and deadlines are honoured promptly."""
        while True:
            now = time.monotonic()
            if now >= due:
                return True
            if self._stop.is_set() or (deadline is not None and now >= deadline):
                return False
            time.sleep(min(0.05, due - now))


# --------------------------------------------------------------------------------------------------
# Replay


def image_at(log: WriteLog, n: int) -> bytes:
    """The region's bytes on the source after records 1..n exactly (offset not included)."""
    if not 0 <= n <= log.last:
        raise ValueError(f"cut {n} outside 0..{log.last}")
    current = [0] * log.slots
    for k in range(1, n + 1):
        current[log.slot_of[k]] = k
    return b"".join(make_record(log.seed, r, s) for s, r in enumerate(current))


def write_image_at(path: str | os.PathLike[str], log: WriteLog, n: int) -> None:
    """Write ``image_at(log, n)`` at the log's offset into an image file (created if missing)."""
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.seek(log.offset)
        f.write(image_at(log, n))


# --------------------------------------------------------------------------------------------------
# Checker


@dataclass
class Verdict:
    """Whether the image equals the source after records 1..N for one N, and if not, why.

    ``cut_lo..cut_hi`` is every N that explains the image. Because every record has distinct content
    and lands in the region, a consistent image always pins N exactly (lo == hi: record N is in the
    image and record N + 1 overwrote something); the range is kept because it is the general answer
    and costs nothing. ``best_cut`` is the N that explains the most slots, so an inconsistent image
    still says "almost N, except these slots".
    """

    consistent: bool
    cut_lo: int | None
    cut_hi: int | None
    records: int
    slots: int
    torn: int = 0
    foreign: int = 0
    unwritten: int = 0
    best_cut: int | None = None
    mismatched: int = 0
    reasons: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cut(self) -> int | None:
        """The smallest N that explains the image (None if none does)."""
        return self.cut_lo

    def explains(self, n: int) -> bool:
        """True if the image equals the source after exactly records 1..n."""
        return (
            self.consistent and self.cut_lo is not None and self.cut_hi is not None and self.cut_lo <= n <= self.cut_hi
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``cut`` is repeated for scripts that only want the one number."""
        d = asdict(self)
        d["cut"] = self.cut
        return d

    def to_json(self) -> str:
        """One line of JSON (what the ``check`` command prints)."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _reader(image: ImageSource) -> tuple[Callable[[int, int], bytes], Callable[[], None]]:
    """Turn bytes, a path (raw image or block device) or a read(offset, length) callable into a reader."""
    if isinstance(image, bytes | bytearray | memoryview):
        view = memoryview(image)
        return (lambda off, length: bytes(view[off : off + length])), (lambda: None)
    if callable(image):
        return image, (lambda: None)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)

    def read(off: int, length: int) -> bytes:
        parts: list[bytes] = []
        while length > 0:
            data = os.pread(fd, length, off)
            if not data:
                break
            parts.append(data)
            off += len(data)
            length -= len(data)
        return b"".join(parts)

    return read, (lambda: os.close(fd))


def check(
    image: ImageSource,
    offset: int,
    slots: int,
    log: WriteLog | str | os.PathLike[str],
) -> Verdict:
    """Decide whether ``image`` equals the source at one cut of the numbering.

    Each slot holding record r constrains the cut N to [r, (next write to that slot after r) - 1]; a
    slot still holding record 0 to [0, (first write to it) - 1]. The image is consistent iff every
    block is a valid record that was really written to that slot and the intersection is not empty.
    Linear in slots + log length: one backwards pass over the log gives, for every record, the next
    record to the same slot.

    ``image`` is bytes (the region's bytes at ``offset`` within them), a path, or ``read(offset,
    length) -> bytes`` (e.g. a VMDK reader). ``log`` is a ``WriteLog`` or the path of a log file.
    """
    if not isinstance(log, WriteLog):
        log = WriteLog.read(log)
    _region_check(offset, slots)
    if slots != log.slots:
        raise ValueError(f"the log is for {log.slots} slots, not {slots}")
    last = log.last
    slot_of = log.slot_of
    # next_same[n] = next record after n written to the same slot (0 = none); first[s] likewise for record 0.
    next_same = array("Q", bytes(8 * (last + 1)))
    following = [0] * slots
    for n in range(last, 0, -1):
        s = slot_of[n]
        next_same[n] = following[s]
        following[s] = n
    first = following

    lo, hi = 0, last
    lo_slot, hi_slot = -1, -1
    found = [-1] * slots  # record held by each slot, -1 = not a valid record of this slot
    intervals: list[tuple[int, int, int]] = []  # (slot, lo, hi) of valid slots
    verdict = Verdict(False, None, None, last, slots)
    bad: list[dict[str, Any]] = []

    read, close = _reader(image)
    try:
        for first_slot in range(0, slots, READ_CHUNK_SLOTS):
            k = min(slots, first_slot + READ_CHUNK_SLOTS) - first_slot
            data = memoryview(read(offset + first_slot * SLOT, k * SLOT))
            for i in range(k):
                s = first_slot + i
                block = data[i * SLOT : (i + 1) * SLOT]
                d = decode_record(block)
                kind, problem = d.kind, d.detail
                if kind == "torn":
                    verdict.torn += 1
                elif kind == "foreign":
                    verdict.foreign += 1
                elif d.seed != log.seed:
                    verdict.foreign += 1
                    kind, problem = "other-run", f"record {d.n} of another run (seed {d.seed}, not {log.seed})"
                elif d.slot != s:
                    verdict.foreign += 1
                    kind, problem = "misplaced", f"record {d.n} belongs to slot {d.slot}"
                elif d.n != 0 and (d.n > last or slot_of[d.n] != s):
                    verdict.unwritten += 1
                    where = "beyond the log" if d.n > last else f"it went to slot {slot_of[d.n]}"
                    kind, problem = "unwritten", f"record {d.n} was never written to this slot ({where})"
                elif bytes(block) != make_record(log.seed, d.n, s):
                    verdict.foreign += 1
                    kind, problem = "corrupt", f"record {d.n}: header and checksum valid but content differs"
                if kind != "record":
                    if len(bad) < MAX_REASONS:
                        bad.append({"slot": s, "kind": kind, "found": problem})
                    continue
                r = d.n
                nxt = first[s] if r == 0 else next_same[r]
                s_lo, s_hi = r, (nxt - 1 if nxt else last)
                found[s] = r
                intervals.append((s, s_lo, s_hi))
                if lo_slot < 0 or s_lo > lo:
                    lo, lo_slot = s_lo, s
                if hi_slot < 0 or s_hi < hi:
                    hi, hi_slot = s_hi, s
    finally:
        close()

    invalid = verdict.torn + verdict.foreign + verdict.unwritten
    verdict.best_cut = _best_cut(intervals, last)
    if not invalid and lo <= hi:
        verdict.consistent, verdict.cut_lo, verdict.cut_hi = True, lo, hi
        return verdict

    reasons: list[dict[str, Any]] = []
    if lo > hi:
        r_hi = found[hi_slot]
        nxt = first[hi_slot] if r_hi == 0 else next_same[r_hi]
        reasons.append(
            {
                "kind": "conflict",
                "found": f"slot {lo_slot} holds record {lo} so N >= {lo}, but slot {hi_slot} holds record {r_hi}"
                f" which record {nxt} overwrote, so N <= {hi}",
                "slots": [lo_slot, hi_slot],
            }
        )
    reasons.extend(bad)
    if verdict.best_cut is not None:
        expected = _records_at(log, verdict.best_cut)
        off_cut = [(s, a, b) for s, a, b in intervals if not a <= verdict.best_cut <= b]
        verdict.mismatched = invalid + len(off_cut)
        for s, a, _b in off_cut:
            if len(reasons) >= MAX_REASONS:
                break
            kind = "future" if a > verdict.best_cut else "stale"
            reasons.append(
                {"slot": s, "kind": kind, "found": found[s], "expected": expected[s], "at_cut": verdict.best_cut}
            )
    else:
        verdict.mismatched = invalid
    verdict.reasons = reasons[:MAX_REASONS]
    return verdict


def _best_cut(intervals: list[tuple[int, int, int]], last: int) -> int | None:
    """The N contained in the most slot intervals (a sweep over a difference array: linear)."""
    if not intervals:
        return None
    diff = [0] * (last + 2)
    for _s, a, b in intervals:
        diff[a] += 1
        diff[b + 1] -= 1
    best, best_n, run = -1, 0, 0
    for n in range(last + 1):
        run += diff[n]
        if run > best:
            best, best_n = run, n
    return best_n


def _records_at(log: WriteLog, n: int) -> list[int]:
    """The record each slot holds on the source after records 1..n."""
    current = [0] * log.slots
    for k in range(1, n + 1):
        current[log.slot_of[k]] = k
    return current


def source_matches(image: ImageSource, offset: int, slots: int, log: WriteLog | str | os.PathLike[str]) -> bool:
    """Sanity check of the workload itself: after it stopped, the source is exactly at the last record.

    If this fails, the workload or the device is broken and no replica verdict means anything.
    """
    if not isinstance(log, WriteLog):
        log = WriteLog.read(log)
    return check(image, offset, slots, log).explains(log.last)


# --------------------------------------------------------------------------------------------------
# Command line


def _cmd_write(args: argparse.Namespace) -> int:
    writer = Writer(
        args.device, args.offset, args.slots, seed=args.seed, log_path=args.log, rate=args.rate, sync=args.sync
    )
    # Handlers go in before formatting so an early SIGTERM still ends with a complete log and "done".
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: writer.stop())
    writer.format()
    print("ready", flush=True)
    last = writer.run(count=args.count, seconds=args.seconds)
    stats = {"records": last, "seconds": round(writer.elapsed, 3), "writes_per_s": round(writer.writes_per_second, 1)}
    print(json.dumps({**stats, "mode": writer.mode, "seed": writer.seed}), file=sys.stderr, flush=True)
    print(f"done {last}", flush=True)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    log = WriteLog.read(args.log)
    if log.offset != args.offset:
        print(f"warning: log was written at offset {log.offset}, checking at {args.offset}", file=sys.stderr)
    verdict = check(args.image, args.offset, args.slots, log)
    print(verdict.to_json(), flush=True)
    return 0 if verdict.consistent else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python3 -m tests.writeorder``."""
    p = argparse.ArgumentParser(prog="python3 -m tests.writeorder", description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="format the region, then write numbered records until stopped")
    w.add_argument("device")
    w.add_argument("--offset", type=int, default=0)
    w.add_argument("--slots", type=int, required=True)
    w.add_argument("--log", required=True)
    w.add_argument("--rate", type=float, default=None, help="target writes/s (default: as fast as possible)")
    w.add_argument("--seconds", type=float, default=None, help=f"duration (default {DEFAULT_MAX_SECONDS:.0f})")
    w.add_argument("--count", type=int, default=None, help="stop after this many records")
    w.add_argument("--seed", type=int, default=None, help="default: random")
    w.add_argument("--sync", choices=SYNC_MODES, default="auto")
    c = sub.add_parser("check", help="print the JSON verdict; exit 0 if consistent, 1 if not")
    c.add_argument("image")
    c.add_argument("--offset", type=int, default=0)
    c.add_argument("--slots", type=int, required=True)
    c.add_argument("--log", required=True)
    args = p.parse_args(argv)
    return _cmd_write(args) if args.cmd == "write" else _cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
