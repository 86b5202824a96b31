"""Reading a disk range into a sealed batch: runs of zeros become `zero` extents with no payload,
everything else is checksummed, compressed and encrypted (proto.envelope) as `data` extents.

Zero detection works on ZERO_GRAIN blocks with one bytes comparison each (memcmp in C), so the Python
work per batch is proportional to grains, not bytes.
"""

from __future__ import annotations

import os
import threading

from standby.proto.envelope import Sealer
from standby.proto.messages import Batch, BatchKind, Extent, ExtentKind

ZERO_GRAIN = 64 * 1024
_ZEROS = bytes(ZERO_GRAIN)


def disk_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a block device or image file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def runs(buf: memoryview) -> list[tuple[bool, int, int]]:
    """Split `buf` into alternating (is_zero, start, end) runs at ZERO_GRAIN granularity."""
    out: list[tuple[bool, int, int]] = []
    n = len(buf)
    for start in range(0, n, ZERO_GRAIN):
        end = min(start + ZERO_GRAIN, n)
        z = buf[start:end] == _ZEROS[: end - start]
        if out and out[-1][0] == z:
            out[-1] = (z, out[-1][1], end)
        else:
            out.append((z, start, end))
    return out


class BatchBuilder:
    """Builds sealed batches for one disk; safe to call from several worker threads at once."""

    def __init__(self, path: str, disk: int, key: bytes, uid: bytes, level: int) -> None:
        self.path = path
        self.disk = disk
        self.key = key
        self.uid = uid
        self.level = level
        self._local = threading.local()

    def _sealer(self) -> Sealer:
        s = getattr(self._local, "sealer", None)
        if s is None:
            s = self._local.sealer = Sealer(self.key, self.uid, self.level)
        return s

    def read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise OSError(f"short read from {self.path} at {offset}: {len(data)} of {length} bytes")
        return data

    def initial_batch(self, generation: int, sequence: int, offset: int, length: int) -> Batch:
        """Read [offset, offset+length) and seal it as an INITIAL batch whose cursor is its end."""
        data = memoryview(self.read(offset, length))
        sealer = self._sealer()
        extents: list[Extent] = []
        for is_zero, a, b in runs(data):
            if is_zero:
                extents.append(Extent(ExtentKind.ZERO, offset + a, b - a))
            else:
                payload = sealer.seal(generation, sequence, offset + a, data[a:b])
                extents.append(Extent(ExtentKind.DATA, offset + a, b - a, payload))
        cursor = offset + length
        table = Batch.table(
            generation, BatchKind.INITIAL, 0, cursor, [(e.kind, e.offset, e.length, len(e.payload)) for e in extents]
        )
        return Batch(
            self.disk,
            sequence,
            generation,
            BatchKind.INITIAL,
            cursor,
            tuple(extents),
            sealer.seal_batch(generation, sequence, table),
        )
