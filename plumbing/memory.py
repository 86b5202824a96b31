"""glibc malloc settings for daemons that pass large buffers from thread to thread.

Every batch is a handful of buffers of up to a few MiB (the read, the compressed body, the sealed
extent, the frame). glibc serves an allocation that large with a fresh mmap and gives it back with
munmap when it is freed, so each batch page-faulted its memory in again, 4 KiB at a time, and the
kernel zeroed every page: in the agent during an initial replication that was 18 % of its CPU (perf),
most of its system time. With the mmap threshold above the largest buffer and the heap not trimmed
after every free, the same memory is reused batch after batch. At most two arenas: the worker threads
would otherwise each grow an arena of their own (up to 8 per core), every one holding its own spare
batches, and the resident size would grow with the number of threads rather than with the work.

The resident size then stays at the daemon's high-water mark instead of falling between bursts; the
benchmarks report that peak (VmHWM), which these settings do not raise.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("standby.memory")

# malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit; a batch is at most 16 MiB
TRIM_THRESHOLD = 256 << 20
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Apply the settings above; False (and nothing changed) where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, ARENA_MAX)))
    if not ok:
        log.debug("mallopt refused a setting; the C library's defaults stay")
    return ok
