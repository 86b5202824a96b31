"""Oracles of the fault campaign that do not trust the product: what the source held at an instant,
block by block, and whether a replica (or a point materialised from it) equals that.

Three judges, each independent of the code under test:

- the write-order region (tests/writeorder.py): a point equals the source after exactly N records;
- the burst region (`BurstModel`): the test itself writes large incompressible extents one at a time,
  each durable (O_DIRECT | O_DSYNC) before the next starts, and keeps the xxh3 of every 4 KiB block it
  wrote with the write's submission and completion time. A crash-consistent point at instant t must
  then hold, in every block, the last write completed before t — except the blocks of the one write in
  flight at t, which may hold either side (DESIGN.md §4). A missing completed write is a lost epoch
  (issue 9, finding 1); a write submitted after t is a point that is not an instant (finding 3);
- the file-system disk: `e2fsck` of a copy at a point, and byte equality after catch-up.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

BLOCK = 4096
# Point instants come from the agent's tracker clock mapped to the wall clock (microseconds apart); the
# test's timestamps are taken just before the write is submitted and just after it completed. Writes
# whose interval comes this close to the instant count as in flight at it.
MARGIN = 0.010
CHUNK = 4 * 1024 * 1024
MAX_RANGES = 6


def block_hashes(data: bytes | bytearray | memoryview) -> array:
    """xxh3_64 of each 4 KiB block of `data` (a multiple of 4 KiB long)."""
    view = memoryview(data)
    return array("Q", (xxhash.xxh3_64_intdigest(view[i : i + BLOCK]) for i in range(0, len(view), BLOCK)))


@dataclass(frozen=True, slots=True)
class BurstWrite:
    """One extent the burst writer wrote: blocks [first, first + len(hashes)) of the disk."""

    number: int
    first: int
    hashes: array
    submit: float
    complete: float


@dataclass
class Expectation:
    """The burst region of the source at instant `t`: `hashes[i]` for block `first + i`, written by
    write `owner[i]` (0: the initial fill); blocks in `unknown` were being written at `t`."""

    t: float
    first: int
    hashes: array
    owner: array
    unknown: list[tuple[int, int, int]]  # (first block, count, write number)
    completed: dict[int, float]  # write number -> completion time, for the writes named in `owner`
    later: list[BurstWrite]  # writes submitted after t (a block holding one is from the future)


class BurstModel:
    """What the burst region of the source holds over time, from the writes the test made.

    Writes are strictly sequential (one writer, each complete before the next starts), so the state at
    any instant is "every write completed before it", plus at most one write in flight. Judged instants
    only move forward (the newest point of a paused replica), so completed writes are folded into one
    array of block hashes and forgotten: memory stays proportional to the region, not to the run.
    """

    def __init__(self, first_block: int, initial: array) -> None:
        self.first = first_block
        self.base = array("Q", initial)
        self.owner = array("q", bytes(8 * len(initial)))
        self.completed: dict[int, float] = {0: 0.0}
        self.pending: deque[BurstWrite] = deque()
        self.inflight: tuple[int, int, int, float] | None = None  # (number, first, count, submit)
        self.folded_until = 0.0
        self.writes = 0
        self.bytes = 0
        self._lock = threading.Lock()

    @property
    def blocks(self) -> int:
        return len(self.base)

    def begin(self, first: int, count: int) -> tuple[int, float]:
        """Called just before a write is submitted; returns (write number, submission time)."""
        with self._lock:
            self.writes += 1
            submit = time.time()
            self.inflight = (self.writes, first, count, submit)
            return self.writes, submit

    def end(self, number: int, first: int, hashes: array, submit: float) -> None:
        """Called just after the write completed (O_DSYNC returned)."""
        complete = time.time()
        with self._lock:
            self.pending.append(BurstWrite(number, first, hashes, submit, complete))
            self.inflight = None
            self.bytes += len(hashes) * BLOCK

    def abandon(self) -> None:
        """A write failed: its blocks may hold anything from now on, so stop judging them (the caller
        stops the campaign's burst writer; a source device that refuses writes is a broken rig)."""
        with self._lock:
            self.inflight = None

    def expected_at(self, t: float) -> Expectation | None:
        """The region at instant t; None if t is before an instant already judged (it cannot be
        reconstructed any more — and the newest point going back in time is a failure in itself)."""
        with self._lock:
            if t < self.folded_until:
                return None
            while self.pending and self.pending[0].complete + MARGIN < t:
                w = self.pending.popleft()
                off = w.first - self.first
                self.base[off : off + len(w.hashes)] = w.hashes
                self.owner[off : off + len(w.hashes)] = array(self.owner.typecode, [w.number]) * len(w.hashes)
                self.completed[w.number] = w.complete
            self.folded_until = t
            unknown = [(w.first, len(w.hashes), w.number) for w in self.pending if w.submit - MARGIN <= t]
            if self.inflight is not None and self.inflight[3] - MARGIN <= t:
                unknown.append((self.inflight[1], self.inflight[2], self.inflight[0]))
            later = [w for w in self.pending if w.submit - MARGIN > t]
            named = set(self.owner)
            self.completed = {k: v for k, v in self.completed.items() if k in named}
            return Expectation(t, self.first, array("Q", self.base), array(self.owner.typecode, self.owner), unknown,
                               dict(self.completed), later)


@dataclass
class RegionDiff:
    """Blocks of a replica's burst region that differ from the source at the point's instant."""

    blocks: int = 0
    compared: int = 0
    unknown: int = 0
    ranges: list[str] = field(default_factory=list)
    future: int = 0  # differing blocks holding a write submitted after the instant
    lost_writes: set[int] = field(default_factory=set)

    def describe(self) -> str:
        kinds = f"; {self.future} hold data written after the point" if self.future else ""
        return (f"{self.blocks} of {self.compared} determinate 4 KiB blocks of the burst region differ from the "
                f"source at the point's instant ({self.unknown} blocks in flight not judged{kinds}); "
                f"missing: {len(self.lost_writes)} completed write(s); first: {'; '.join(self.ranges)}")


def compare_region(read: Callable[[int, int], bytes], exp: Expectation) -> RegionDiff:
    """Compare the replica's burst region (read(offset, length)) with the expectation."""
    diff = RegionDiff()
    skip = bytearray(len(exp.hashes))
    for first, count, _n in exp.unknown:
        lo, hi = max(first - exp.first, 0), min(first - exp.first + count, len(skip))
        skip[lo:hi] = b"\x01" * max(hi - lo, 0)
        diff.unknown += max(hi - lo, 0)
    future: dict[int, dict[int, int]] = {}
    for w in exp.later:
        future.setdefault(w.number, {})
        for i, h in enumerate(w.hashes):
            future[w.number][w.first + i] = h
    bad: list[int] = []
    per_chunk = CHUNK // BLOCK
    for c0 in range(0, len(exp.hashes), per_chunk):
        n = min(per_chunk, len(exp.hashes) - c0)
        data = memoryview(read((exp.first + c0) * BLOCK, n * BLOCK))
        for i in range(n):
            k = c0 + i
            if skip[k]:
                continue
            diff.compared += 1
            got = xxhash.xxh3_64_intdigest(data[i * BLOCK : (i + 1) * BLOCK]) if len(data) >= (i + 1) * BLOCK else -1
            if got != exp.hashes[k]:
                bad.append(k)
                if any(blocks.get(exp.first + k) == got for blocks in future.values()):
                    diff.future += 1
                else:
                    diff.lost_writes.add(exp.owner[k])
    diff.blocks = len(bad)
    for lo, hi in _runs(bad)[:MAX_RANGES]:
        w = exp.owner[lo]
        when = exp.completed.get(w)
        lag = f", completed {exp.t - when:.3f} s before the point" if when and w else ""
        what = f"write #{w}{lag}" if w else "the initial fill"
        diff.ranges.append(f"blocks {exp.first + lo}..{exp.first + hi} should hold {what}")
    return diff


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as (first, last)."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


class ClippedImage:
    """The first `size` bytes of a disk image, for tests.journalcheck.walk_points: undo records write
    anywhere on the disk but only the write-order region is judged, so only it is kept (4 MiB instead of
    a copy of the whole disk per trial)."""

    def __init__(self, data: bytes, size: int) -> None:
        self.buf = bytearray(data[:size])
        if len(self.buf) != size:
            raise ValueError(f"image has {len(self.buf)} bytes, the region needs {size}")

    def __setitem__(self, key: slice, value: bytes) -> None:
        start, stop = key.start or 0, key.stop
        if start >= len(self.buf):
            return
        end = min(stop, len(self.buf))
        self.buf[start:end] = value[: end - start]


@dataclass
class DiskDiff:
    blocks: int
    ranges: list[str]
    size: int

    def describe(self) -> str:
        return f"{self.blocks} of {self.size // BLOCK} blocks of 4 KiB differ; first: {'; '.join(self.ranges)}"


def diff_devices(source: str | Path, replica: str | Path, size: int) -> DiskDiff:
    """Byte comparison of two images of `size` bytes, by 4 KiB block (qemu-img compare says only where the
    first difference is; the campaign wants how much differs)."""
    bad: list[int] = []
    with open(source, "rb", buffering=0) as a, open(replica, "rb", buffering=0) as b:
        off = 0
        while off < size:
            n = min(CHUNK, size - off)
            x, y = os.pread(a.fileno(), n, off), os.pread(b.fileno(), n, off)
            if x != y:
                for i in range(0, n, BLOCK):
                    if x[i : i + BLOCK] != y[i : i + BLOCK]:
                        bad.append((off + i) // BLOCK)
            off += n
    ranges = [f"blocks {lo}..{hi}" for lo, hi in _runs(bad)[:MAX_RANGES]]
    return DiskDiff(len(bad), ranges, size)


def fsck_image(path: Path, replay: bool = True) -> tuple[bool, str]:
    """Is the ext4 file system in the image file clean? A crash-consistent point is what a power cut leaves:
    replay the journal first (what a mount does), then check everything without repairing (-fn)."""
    out = ""
    if replay:
        r = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(path)], capture_output=True, text=True,
                           timeout=120)
        out += r.stdout + r.stderr
        if r.returncode not in (0, 1):
            return False, f"journal replay: e2fsck exit {r.returncode}: {out.strip()[-800:]}"
    r = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    return r.returncode == 0, f"e2fsck -fn exit {r.returncode}: {out.strip()[-800:]}"
