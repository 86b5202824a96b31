"""Replicas whose data is one plain file, byte for byte the disk: raw images and flat VMDK extents.

A raw replica and the ``-flat.vmdk`` extent of a VMDK are the same thing on disk (the VMDK adds only
a text descriptor beside it), so they share ``FileReplica``. There is no metadata inside the file,
so nothing here needs crash ordering: ``sync()`` is one fsync.

Thin files are sparse (``ftruncate``) and give space back on ``write_zeroes`` by punching holes;
thick files are preallocated (``posix_fallocate``) and zero ranges in place so they stay allocated
(a thick disk that silently turned thin could run its datastore out of space at failover time).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from standby.plumbing.durable import fsync_dir

from .base import (
    ReplicaError,
    ReplicaSizeMismatch,
    SingleFdReplica,
    check_parent_dir,
    check_size,
    create_exclusive,
    open_existing,
    remove_quietly,
    thin_zero,
    zero_range,
)


class FileReplica(SingleFdReplica):
    """A disk stored as one regular file of exactly ``size`` bytes."""

    def __init__(self, fmt: str, path: Path, size: int, data_path: Path, fd: int, thin: bool) -> None:
        super().__init__(fmt, path, size)
        self.data_path = Path(data_path)
        self.thin = thin
        self._fd = fd

    def data_files(self) -> list[Path]:
        return [self.data_path]

    def _write_zeroes(self, offset: int, length: int) -> None:
        if self.thin:
            thin_zero(self._fd, offset, length)
        else:
            zero_range(self._fd, offset, length)


def create_data_file(path: Path, size: int, *, thin: bool) -> int:
    """Create ``path`` durably at ``size`` bytes (sparse or preallocated) and return its fd.

    The file and its directory entry are fsynced before returning, so a crash right after create
    never leaves a replica the master target believes in but the file system forgot.
    """
    check_parent_dir(path)
    fd = create_exclusive(path)
    try:
        if thin:
            os.ftruncate(fd, size)
        else:
            os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
        fsync_dir(path.parent)
    except OSError as exc:
        os.close(fd)
        remove_quietly(path)
        raise ReplicaError(f"cannot create {path} ({size} bytes): {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        remove_quietly(path)
        raise
    return fd


def open_data_file(path: Path, size: int, what: str) -> int:
    """Open an existing data file read/write, refusing anything but a regular file of ``size`` bytes."""
    fd = open_existing(path, what)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReplicaError(f"{what} {path} is not a regular file")
        if st.st_size != size:
            raise ReplicaSizeMismatch(f"{what} {path} holds {st.st_size} bytes but the disk is {size} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_raw(path: Path, size: int) -> FileReplica:
    """A new sparse raw image: the simplest replica, readable by anything."""
    check_size("raw", size)
    path = Path(path)
    fd = create_data_file(path, size, thin=True)
    return FileReplica("raw", path, size, path, fd, thin=True)


def open_raw(path: Path, size: int) -> FileReplica:
    check_size("raw", size)
    path = Path(path)
    fd = open_data_file(path, size, "raw image")
    return FileReplica("raw", path, size, path, fd, thin=True)
