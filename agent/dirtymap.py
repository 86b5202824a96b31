"""The dirty map: which blocks of a disk were written since they were last read for shipping.

A bitmap at a fixed granularity (default 4 KiB, the file-system block size, so 4 KiB random writes ship
4 KiB, not more), kept as pages of PAGE_BLOCKS bits allocated on first touch. Memory is bounded by the
disk size (1 bit per block: 32 MiB for 1 TiB), never by the amount of churn — which is what lets the
agent keep tracking while the process server does not acknowledge (promise 8, "pull ahead").
"""

from __future__ import annotations

from collections.abc import Iterable

PAGE_BLOCKS = 1 << 15  # bits per page (4 KiB of bitmap, 128 MiB of disk at 4 KiB granularity)
_FULL = (1 << PAGE_BLOCKS) - 1


class DirtyMap:
    def __init__(self, size: int, granularity: int = 4096) -> None:
        if granularity <= 0 or granularity % 512 or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of two and a multiple of 512")
        self.size = size
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self.blocks = (size + granularity - 1) >> self._shift
        self._pages: dict[int, int] = {}  # page number -> bits (Python int: fast OR, popcount, scans)
        self._count = 0  # set bits, kept as marks arrive: asked for often (cut bounds, reports)

    def __bool__(self) -> bool:
        return bool(self._pages)

    def mark(self, start: int, end: int) -> None:
        """Mark the bytes [start, end) dirty (rounded out to whole blocks, clipped to the disk)."""
        end = min(end, self.size)
        if start >= end:
            return
        first = start >> self._shift
        last = (end - 1) >> self._shift  # inclusive
        pages = self._pages
        while first <= last:
            p, bit = divmod(first, PAGE_BLOCKS)
            n = min(last - first + 1, PAGE_BLOCKS - bit)
            mask = _FULL if n == PAGE_BLOCKS else ((1 << n) - 1) << bit
            old = pages.get(p, 0)
            self._count += (mask & ~old).bit_count()
            pages[p] = old | mask
            first += n

    def merge(self, other: DirtyMap) -> None:
        pages = self._pages
        for p, bits in other._pages.items():
            old = pages.get(p, 0)
            self._count += (bits & ~old).bit_count()
            pages[p] = old | bits

    def mark_extents(self, extents: Iterable[tuple[int, int]]) -> None:
        for off, length in extents:
            self.mark(off, off + length)

    @property
    def dirty_blocks(self) -> int:
        return self._count

    @property
    def dirty_bytes(self) -> int:
        """Bytes to read for shipping (the last block may be short)."""
        n = self.dirty_blocks << self._shift
        last = self.blocks - 1
        p, bit = divmod(last, PAGE_BLOCKS)
        if n and self.size % self.granularity and (self._pages.get(p, 0) >> bit) & 1:
            n -= self.granularity - self.size % self.granularity
        return n

    def extents(self) -> list[tuple[int, int]]:
        """Dirty byte ranges as sorted, merged (offset, length) pairs."""
        out: list[tuple[int, int]] = []
        g = self._shift
        for p in sorted(self._pages):
            bits = self._pages[p]
            base = p * PAGE_BLOCKS
            pos = 0
            while bits:
                skip = (bits & -bits).bit_length() - 1  # trailing zeros
                bits >>= skip
                pos += skip
                run = (bits ^ (bits + 1)).bit_length() - 1  # trailing ones
                start = (base + pos) << g
                end = min((base + pos + run) << g, self.size)
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], end - out[-1][0])
                else:
                    out.append((start, end - start))
                bits >>= run
                pos += run
        return out

    def intersects(self, extents: Iterable[tuple[int, int]]) -> bool:
        """Does any block of the (offset, length) ranges lie in this map?"""
        probe = DirtyMap(self.size, self.granularity)
        probe.mark_extents(extents)
        pages = self._pages
        return any(bits & pages.get(p, 0) for p, bits in probe._pages.items())

    def clear(self) -> None:
        self._pages.clear()
        self._count = 0


def split_extents(extents: list[tuple[int, int]], limit: int) -> list[list[tuple[int, int]]]:
    """Cut sorted extents into groups of at most `limit` bytes each (splitting long extents), in order."""
    if limit <= 0:
        raise ValueError("limit must be positive")
    groups: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    room = limit
    for off, length in extents:
        while length:
            n = min(length, room)
            cur.append((off, n))
            off += n
            length -= n
            room -= n
            if room == 0:
                groups.append(cur)
                cur, room = [], limit
    if cur:
        groups.append(cur)
    return groups
