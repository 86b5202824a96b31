"""The portable change tracker: hash every 4 KiB block of the disk over and over and compare with the
hashes of what was last *shipped* (not of the last scan: a block that changed X -> Y -> X after Y was
shipped must still count as changed).

Works on anything readable — image files, devices where tracefs is missing — at the cost of reading the
whole disk every scan. It sees no instants, so its epochs never make crash-consistent points (promise 4):
it cannot prove that the blocks it read belong to one moment.

A block whose shipped contents are unknown (never shipped by this agent run) is not reported; the initial
copy or a checksum resync ships or compares every block and so fills the table.
"""

from __future__ import annotations

import os
import threading
import time

from standby.proto import hashtree

from .base import TrackingLost

UNKNOWN = bytes(hashtree.HASH)


class FullScanTracker:
    name = "full-scan"  # as the config's `tracker` choice, status and logs name it
    proves_order = False

    def __init__(self, path: str, size: int, pause: float = 1.0) -> None:
        self.path = path
        self.size = size
        self.pause = pause  # seconds between scans
        self.leaf = hashtree.LEAF
        self._table = bytearray(((size + self.leaf - 1) // self.leaf) * hashtree.HASH)
        self._lock = threading.Lock()
        self._found: list[tuple[int, int, int]] = []
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats: dict[str, int | float] = {"scans": 0, "cpu_seconds": 0.0, "bytes_read": 0}

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"full-scan {self.path}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def poll(self) -> list[tuple[int, int, int]]:
        with self._lock:
            if self._error:
                raise TrackingLost(self._error)
            found, self._found = self._found, []
        return found

    def shipped(self, offset: int, data: bytes | memoryview) -> None:
        """Record the hashes of blocks read for shipping (offset and length leaf-aligned but for the end)."""
        if offset % self.leaf or offset + len(data) > self.size:
            return
        mv = memoryview(data)
        hashes = b"".join(
            [hashtree.block_hash(mv[i : i + self.leaf]) for i in range(0, len(mv), self.leaf)]
        )
        first = offset // self.leaf * hashtree.HASH
        with self._lock:
            self._table[first : first + len(hashes)] = hashes

    def known(self, leaves: bytes | bytearray) -> None:
        """Take a whole table of leaf hashes known to be on the replica (a checksum resync's)."""
        if len(leaves) != len(self._table):
            raise ValueError(f"hash table of {len(leaves)} bytes for a disk needing {len(self._table)}")
        with self._lock:
            self._table[:] = leaves

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.thread_time()
            try:
                self._scan()
            except OSError as exc:
                with self._lock:
                    self._error = f"full scan of {self.path} failed: {exc}"
                return
            self.stats["scans"] = int(self.stats["scans"]) + 1
            self.stats["cpu_seconds"] = float(self.stats["cpu_seconds"]) + time.thread_time() - t0
            self._stop.wait(self.pause)

    def _scan(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            step = hashtree.READ_CHUNK
            for pos in range(0, self.size, step):
                if self._stop.is_set():
                    return
                n = min(step, self.size - pos)
                data = os.pread(fd, n, pos)
                if len(data) != n:
                    raise OSError(f"short read at {pos}")
                self.stats["bytes_read"] = int(self.stats["bytes_read"]) + n
                now = time.monotonic_ns()
                current = hashtree.leaf_hashes(lambda o, k, d=data: memoryview(d)[o : o + k], n, self.leaf)
                first = pos // self.leaf * hashtree.HASH
                found = []
                with self._lock:
                    known = memoryview(self._table)[first : first + len(current)]
                    if known == current:
                        continue
                    for i in range(0, len(current), hashtree.HASH):
                        k = known[i : i + hashtree.HASH]
                        if k != current[i : i + hashtree.HASH] and k != UNKNOWN:
                            a = pos + i // hashtree.HASH * self.leaf
                            found.append((now, a, min(a + self.leaf, self.size)))
                    self._found.extend(found)
        finally:
            os.close(fd)
