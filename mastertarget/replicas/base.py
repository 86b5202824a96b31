"""The replica seam: one small interface in front of every format of target disk.

The master target applies a batch as many ``write()``/``write_zeroes()`` calls, then one ``sync()``,
then acknowledges. That one call is the durability point, so each format only has to make *its own*
metadata crash-safe relative to it; the data itself behaves like a disk (a write not yet synced may
or may not be there after a crash).

This module holds what every format shares: the errors, the range checks, the mapping of OS errors
to messages an operator can act on, and the few low-level file helpers (full pwrite, zero-padded
pread, hole punching through libc ``fallocate``, which Python's ``os`` module does not expose).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from standby.plumbing.buffers import ThreadBuffers
from standby.plumbing.durable import drop_cached
from standby.plumbing.errors import EXIT_BAD_INPUT, StandbyError

SECTOR = 512
DIRECT_ALIGN = 4096  # O_DIRECT reads are rounded up to this (a multiple of every logical block size)

# Zero writes go out in slices of this size: large enough that a 16 MiB zero range is 16 syscalls,
# small enough that the shared zero buffer costs nothing.
ZERO_CHUNK = 1 << 20
_ZEROES = bytes(ZERO_CHUNK)

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# fallocate() answers these when the file system (or device) cannot do the operation; the caller then
# writes zeros instead. Any other errno is a real failure.
_FALLOC_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY}


class ReplicaError(StandbyError):
    """A replica could not be created, opened, read or written; the message says which and why."""


class ReplicaExists(ReplicaError):
    """Create refused: the path (or its -flat.vmdk extent) already exists. Never overwritten."""

    exit_code = EXIT_BAD_INPUT


class ReplicaSizeMismatch(ReplicaError):
    """The device or existing image does not have the size the protected disk has."""

    exit_code = EXIT_BAD_INPUT


class Replica(ABC):
    """A target disk the master target writes batches into.

    Subclasses implement the underscored hooks; this class does the argument checks and turns
    ``OSError`` into ``ReplicaError`` naming the file, so callers handle one exception type.
    """

    format: str
    path: Path
    size: int

    def __init__(self, fmt: str, path: Path, size: int) -> None:
        self.format = fmt
        self.path = Path(path)
        self.size = size
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` (both 512-aligned, inside the disk)."""
        self._check_range("write", offset, len(data))
        if data:
            with self._io("write to"):
                self._write(offset, memoryview(data).cast("B"))

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros; thin formats give the space back where they can."""
        self._check_range("write_zeroes", offset, length)
        if length:
            with self._io("write zeros to"):
                self._write_zeroes(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; never-written space reads as zeros."""
        self._check_range("read", offset, length)
        if not length:
            return b""
        with self._io("read from"):
            return self._read(offset, length)

    @contextmanager
    def scanning(self) -> Iterator[Callable[[int, int], bytes | memoryview]]:
        """A `read(offset, length)` for reading the whole replica once (a resync's hashing), safe to call
        from several threads. What it returns may be overwritten by the calling thread's next read."""
        yield self.read

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Advice: the (offset, length) `ranges` are about to be read, one by one. Formats that can ask
        for them all at once do (the disk then serves them together instead of one random read at a
        time: about three times faster for a group's old contents); the others ignore it."""
        return

    def sync(self) -> None:
        """Durability point: when this returns, every earlier write is on stable storage."""
        self._check_open()
        with self._io("sync"):
            self._sync()
            self._drop_cached()

    def close(self) -> None:
        """Sync and release the files (sparse VMDK: also mark the image cleanly shut down).

        Idempotent. If the final sync fails the files are still released and the error raised, so
        a sparse image keeps its unclean-shutdown flag and is recovered on the next open.
        """
        if self._closed:
            return
        self._closed = True
        with self._io("close"):
            self._close()

    @abstractmethod
    def data_files(self) -> list[Path]:
        """The files (or device) holding the data, for status and free-space checks."""

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Replica:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} format={self.format} path={str(self.path)!r} size={self.size}>"

    # -- hooks for subclasses -------------------------------------------------------------------

    @abstractmethod
    def _write(self, offset: int, data: memoryview) -> None: ...

    @abstractmethod
    def _write_zeroes(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def _read(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def _sync(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    def _drop_cached(self) -> None:
        """After a sync: forget the replica's cached pages (plumbing.durable.drop_cached says why)."""
        fd = getattr(self, "_fd", None)
        if fd is not None:
            drop_cached(fd)

    # -- helpers --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ReplicaError(f"replica {self.path} is closed")

    def _check_range(self, what: str, offset: int, length: int) -> None:
        """Refuse a request that a correct caller never makes: it would corrupt neighbouring data."""
        self._check_open()
        if offset < 0 or length < 0 or offset % SECTOR or length % SECTOR:
            raise ReplicaError(
                f"{what} on {self.path}: offset {offset} and length {length} must be non-negative multiples of {SECTOR}"
            )
        if offset + length > self.size:
            raise ReplicaError(f"{what} on {self.path}: range {offset}+{length} ends beyond the disk size {self.size}")

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise ReplicaError(f"{what} {self.path} failed: {exc.strerror or exc}") from exc


# -- low-level file helpers ---------------------------------------------------------------------


class SingleFdReplica(Replica):
    """A replica whose bytes live in one file descriptor at their virtual offsets (raw file, flat VMDK
    extent, block device): reads, syncs and closes are the same for all of them."""

    _fd: int

    def _write(self, offset: int, data: memoryview) -> None:
        pwrite_all(self._fd, data, offset)

    def _read(self, offset: int, length: int) -> bytes:
        return pread_full(self._fd, length, offset)

    @contextmanager
    def scanning(self) -> Iterator[Callable[[int, int], bytes | memoryview]]:
        """Reads with O_DIRECT into one reused buffer per thread. Hashing a replica through the page
        cache cost the master target more system time than the hashing itself (a fresh 8 MiB buffer
        per read, page faulted in, and a copy out of the cache), filled the cache with pages nobody
        reads again, and on this 2-core machine the resync waited for that CPU. O_DIRECT reads what
        was written before (the kernel writes back cached pages of the range first). Where the file
        system refuses O_DIRECT the reads are buffered, still into the reused buffers."""
        self._check_open()
        try:
            fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd = os.dup(self._fd)
        buffers = ThreadBuffers()

        def read(offset: int, length: int) -> memoryview:
            self._check_range("read", offset, length)
            want = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN  # O_DIRECT reads whole blocks
            view = memoryview(buffers.get(want))
            with self._io("read from"):
                got = os.preadv(fd, [view[:want]], offset)
                if got < length:  # the end of the file (a sparse tail reads as zeros)
                    view[got:length] = pread_full(self._fd, length - got, offset + got)
            return view[:length]

        try:
            yield read
        finally:
            os.close(fd)

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        if self._closed:
            return
        try:
            for offset, length in ranges:
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # advice only

    def _sync(self) -> None:
        os.fsync(self._fd)

    def _close(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite until everything is written: a short write (disk nearly full) must not go unnoticed."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """pread exactly ``length`` bytes; what lies past end of file reads as zeros (a sparse tail)."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            parts.append(bytes(length - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def write_zero_bytes(fd: int, offset: int, length: int) -> None:
    """Write real zeros: the fallback where the file system cannot punch or zero a range."""
    end = offset + length
    while offset < end:
        n = min(ZERO_CHUNK, end - offset)
        pwrite_all(fd, memoryview(_ZEROES)[:n], offset)
        offset += n


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate with 64-bit offsets, or None where there is no such call."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Linux fallocate(2). True if done; False if this file system cannot (caller falls back)."""
    if _fallocate is None or length <= 0:
        return False
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _FALLOC_UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range (reads back as zeros), keeping the file size; zero-fill if unsupported."""
    if not fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        write_zero_bytes(fd, offset, length)


SMALL_ZEROS = 64 * 1024  # zero ranges up to this size are written, not punched (thin_zero)


def thin_zero(fd: int, offset: int, length: int) -> None:
    """Make a range of a thin (sparse) file read as zeros, keeping the file as thin as it is.

    Large ranges are punched. A punched hole costs a file-system transaction whatever its size (about 70
    µs on ext4 here) while writing 4-64 KiB of zeros costs 3-21 µs, and a rollback to an old point or
    churn of small zero writes zeroes tens of thousands of small ranges: a quarter of a one-hour failover
    was spent punching them. A small range is therefore skipped when it is a hole already (SEEK_DATA,
    which sees data still in the page cache too) and written as zeros otherwise: it then stays allocated,
    as it was, rather than being given back."""
    if length > SMALL_ZEROS:
        punch_hole(fd, offset, length)
        return
    try:
        data_at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: no data at or after `offset`, all hole
            raise
        return
    if data_at < offset + length:
        write_zero_bytes(fd, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Zero a range but keep it allocated (thick disks stay thick); zero-fill if unsupported."""
    if not fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
        write_zero_bytes(fd, offset, length)


def check_size(fmt: str, size: int) -> None:
    """Refuse sizes no disk has: zero, negative, or not whole sectors."""
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % SECTOR:
        raise ReplicaError(f"{fmt} replica size {size!r} must be a positive multiple of {SECTOR} bytes")


def refuse_existing(*paths: Path) -> None:
    """Create never overwrites: an existing file may be the only copy of someone's disk."""
    for p in paths:
        if os.path.lexists(p):
            raise ReplicaExists(f"{p} already exists; refusing to overwrite it")


def check_parent_dir(path: Path) -> None:
    if not path.parent.is_dir():
        raise ReplicaError(f"cannot create {path}: directory {path.parent} does not exist")


def create_exclusive(path: Path) -> int:
    """Open a new file for read/write, failing with ReplicaExists if something is already there."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:
        raise ReplicaExists(f"{path} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise ReplicaError(f"cannot create {path}: {exc.strerror}") from exc


def open_existing(path: Path, what: str) -> int:
    """Open an existing replica file read/write with a message that names what was expected."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ReplicaError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise ReplicaError(f"cannot open {what} {path}: {exc.strerror}") from exc


def remove_quietly(path: Path) -> None:
    """Best-effort clean-up of a half-created replica; the original error is what matters."""
    try:
        os.unlink(path)
    except OSError:
        pass
