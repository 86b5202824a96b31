"""Read buffers reused thread by thread.

O_DIRECT reads need page-aligned memory, and a fresh buffer per read costs a page fault (and a page
zeroed by the kernel) per 4 KiB: that was most of the agent's system time in an initial replication and
the master target's in a resync's hashing. A buffer per thread is reused by that thread's next read, so
whatever a read returns is only good until the same thread reads again.
"""

from __future__ import annotations

import mmap
import threading


class ThreadBuffers:
    """One page-aligned buffer per thread, grown when a read needs more."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, size: int) -> mmap.mmap:
        """This thread's buffer, at least `size` bytes (rounded up to whole pages)."""
        want = max(-(-size // mmap.PAGESIZE) * mmap.PAGESIZE, mmap.PAGESIZE)
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < want:
            buf = self._local.buf = mmap.mmap(-1, want)  # the smaller one goes when its views are gone
        return buf
