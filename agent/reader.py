"""Reading a disk range into a sealed batch: runs of zeros become `zero` extents with no payload,
everything else is checksummed, compressed and encrypted (proto.envelope) as `data` extents.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from standby.plumbing.buffers import ThreadBuffers
from standby.proto.envelope import ZERO_GRAIN, Sealer, seal_pieces
from standby.proto.envelope import zero_runs as runs
from standby.proto.messages import Batch, BatchKind, ExtentKind

__all__ = ["ZERO_GRAIN", "BatchBuilder", "disk_size", "runs"]


def disk_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a block device or image file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class BatchBuilder:
    """Builds sealed batches for one disk; safe to call from several worker threads at once."""

    def __init__(self, path: str, disk: int, key: bytes, uid: bytes, level: int, tracker: object = None) -> None:
        self.path = path
        # The full-scan tracker learns the hashes of what is shipped (it compares later scans with them).
        self._shipped = getattr(tracker, "shipped", None)
        self.disk = disk
        self.key = key
        self.uid = uid
        self.level = level
        self._local = threading.local()
        self._buffers = ThreadBuffers()  # the initial copy's read buffers

    def _sealer(self) -> Sealer:
        s = getattr(self._local, "sealer", None)
        if s is None:
            s = self._local.sealer = Sealer(self.key, self.uid, self.level)
        return s

    def read_extents(self, extents: list[tuple[int, int]]) -> list[tuple[int, memoryview]]:
        """Read each (offset, length) from the device itself. A block device is read with O_DIRECT: its
        page cache is not kept coherent with writes made through a partition or a file system, and the
        tracker proves consistency against what reached the device, so that is what must be read.

        Many small reads (4 KiB random churn) are issued from READ_THREADS threads at once: one O_DIRECT
        read waits for the device, so a single thread leaves it idle most of the time."""
        return self._read_into(None, extents)

    def _read_into(self, into: mmap.mmap | None, extents: list[tuple[int, int]]) -> list[tuple[int, memoryview]]:
        """`read_extents` into `into` (page-aligned, large enough), or into a new buffer."""
        fd, direct = _open_for_delta(self.path)
        try:
            slots, pos = [], 0
            for off, n in extents:
                slots.append((off, n, pos))
                pos += -(-n // 4096) * 4096  # each read starts page-aligned in the buffer, as O_DIRECT needs
            buf = memoryview(into if into is not None else mmap.mmap(-1, max(pos, mmap.PAGESIZE)))

            def read_some(part: list[tuple[int, int, int]]) -> None:
                for off, n, at in part:
                    got = os.preadv(fd, [buf[at : at + n]], off)
                    if got != n:
                        raise OSError(f"short read from {self.path} at {off}: {got} of {n} bytes")

            if len(slots) >= 2 * READ_SPLIT:
                parts = [slots[i : i + READ_SPLIT] for i in range(0, len(slots), READ_SPLIT)]
                for f in [_read_pool().submit(read_some, p) for p in parts]:
                    f.result()
            else:
                read_some(slots)
            out = [(off, buf[at : at + n]) for off, n, at in slots]
            if self._shipped is not None:
                for off, data in out:
                    self._shipped(off, data)
            return out
        finally:
            os.close(fd)

    @contextmanager
    def scanning(self) -> Iterator[Callable[[int, int], memoryview]]:
        """A `read(offset, length)` for reading the whole disk once (a checksum resync's hashing), safe
        to call from several threads: the device opened once, O_DIRECT like every read here, into one
        reused buffer per thread, so what it returns is overwritten by the calling thread's next read.
        A fresh buffer per 8 MiB read cost a page fault per 4 KiB (most of the agent's system time
        while hashing). Not a shipment: the full-scan tracker learns nothing from it."""
        fd, _ = _open_for_delta(self.path)
        buffers = ThreadBuffers()

        def read(offset: int, length: int) -> memoryview:
            view = memoryview(buffers.get(length))[:length]
            got = os.preadv(fd, [view], offset)
            if got != length:
                raise OSError(f"short read from {self.path} at {offset}: {got} of {length} bytes")
            return view

        try:
            yield read
        finally:
            os.close(fd)

    def delta_batch(
        self, generation: int, sequence: int, kind: BatchKind, pieces: list[tuple[int, memoryview]]
    ) -> Batch:
        """Seal already-read (offset, data) pieces as one DELTA or RESYNC batch."""
        return self._seal(generation, sequence, kind, 0, pieces)

    def initial_batch(self, generation: int, sequence: int, offset: int, length: int) -> Batch:
        """Read [offset, offset+length) and seal it as an INITIAL batch whose cursor is its end. The read is
        O_DIRECT on a block device like every other (`read_extents`): besides coherence, a copy of the
        whole disk streamed through the page cache would evict the protected machine's own cache, and on
        a loop device it was measured 3-9 times slower than the direct read (bench/initial_replication).

        The range is read and sealed SEAL_UNIT at a time through one reused buffer, so a batch being
        built holds its sealed extents and 1 MiB of plaintext, not the whole plaintext as well (a fresh
        buffer per batch would also cost a page fault per 4 KiB: most of the agent's system time)."""
        sealer = self._sealer()
        buf = self._buffers.get(min(length, SEAL_UNIT))  # this thread's: the batch is built in it alone
        extents: list[tuple[ExtentKind, int, int, bytes]] = []
        for at in range(offset, offset + length, SEAL_UNIT):
            n = min(SEAL_UNIT, offset + length - at)
            pieces = self._read_into(buf, [(at, n)])
            for zero, off, size, sealed in seal_pieces(sealer, generation, sequence, pieces, unit=SEAL_UNIT):
                if zero and extents and extents[-1][0] == ExtentKind.ZERO:  # one run across reads
                    extents[-1] = (ExtentKind.ZERO, extents[-1][1], extents[-1][2] + size, b"")
                else:
                    extents.append((ExtentKind.ZERO if zero else ExtentKind.DATA, off, size, sealed))
        return self._frame(sealer, generation, sequence, BatchKind.INITIAL, offset + length, extents)

    def _seal(
        self, generation: int, sequence: int, kind: BatchKind, cursor: int, pieces: list[tuple[int, memoryview]]
    ) -> Batch:
        """Zero runs become zero extents; the batch seal covers the whole extent table."""
        sealer = self._sealer()
        extents = [
            (ExtentKind.ZERO if zero else ExtentKind.DATA, off, n, sealed)
            for zero, off, n, sealed in seal_pieces(sealer, generation, sequence, pieces, unit=SEAL_UNIT)
        ]
        return self._frame(sealer, generation, sequence, kind, cursor, extents)

    def _frame(self, sealer: Sealer, generation: int, sequence: int, kind: BatchKind, cursor: int,
               extents: list[tuple[ExtentKind, int, int, bytes]]) -> Batch:
        table = Batch.table(generation, kind, 0, cursor, [(k, o, n, len(p)) for k, o, n, p in extents])
        seal = sealer.seal_batch(generation, sequence, table)
        return Batch.framed(self.disk, sequence, generation, kind, cursor, extents, table, seal)


SEAL_UNIT = 1024 * 1024  # largest sealed extent (bounds sealing's temporary copies; zstd level 1 looks
# back 512 KiB at most, so longer units would not compress better)
READ_THREADS = 8
READ_SPLIT = 128  # extents per read task
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _read_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="read")
    return _pool


def _open_for_delta(path: str) -> tuple[int, bool]:
    fd = os.open(path, os.O_RDONLY)
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return fd, False
    os.close(fd)
    return os.open(path, os.O_RDONLY | os.O_DIRECT), True
