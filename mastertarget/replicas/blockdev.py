"""Replicas on an existing block device.

On vSphere the master target's replicas are VMDKs attached to the master-target VM and found by
disk UUID (DESIGN.md section 7); on bare metal they are LUNs or LVs. Either way the device exists
before replication starts, so "create" here only checks it: that it is a block device, that it has
exactly the protected disk's size (a bigger one would silently waste space, a smaller one would
fail mid-resync), and that nobody else holds it.

The device is opened with ``O_EXCL``: Linux then refuses the open with EBUSY while the device is
mounted, part of a RAID/LVM stack, or held exclusively by another process. That turns the worst
operator mistake here (naming the master target's own root disk) into an error instead of a
wiped disk.

Writes go through the page cache; ``sync()`` is fsync, which on a block device flushes the cache
and sends a flush to the device. Zeroing uses the BLKZEROOUT ioctl, which lets the device
do it without data transfer (WRITE SAME / WRITE ZEROES / discard-with-zeroing) and invalidates the
page cache for the range; where the device refuses, zeros are written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from .base import ReplicaError, ReplicaSizeMismatch, SingleFdReplica, check_size, write_zero_bytes

# linux/fs.h: BLKZEROOUT = _IO(0x12, 127); argument is uint64_t range[2] = {start, length}.
BLKZEROOUT = 0x127F
# Answers meaning "this device or kernel cannot zero that way": fall back to writing zeros.
# EBUSY: a kernel that could not invalidate the page cache for the range refuses the ioctl.
_ZEROOUT_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EBUSY}


class DeviceReplica(SingleFdReplica):
    """A block device used whole as the replica."""

    def __init__(self, path: Path, size: int, fd: int) -> None:
        super().__init__("device", path, size)
        self._fd = fd
        self._zeroout_ok = True

    def data_files(self) -> list[Path]:
        return [self.path]

    def _write_zeroes(self, offset: int, length: int) -> None:
        if self._zeroout_ok:
            try:
                fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
                return
            except OSError as exc:
                if exc.errno not in _ZEROOUT_UNSUPPORTED:
                    raise
                if exc.errno != errno.EBUSY:
                    self._zeroout_ok = False  # the device will not learn it later; stop asking
        write_zero_bytes(self._fd, offset, length)


def open_device(path: Path, size: int) -> DeviceReplica:
    """Open ``path`` as a replica; create and reopen are the same check for a device."""
    check_size("device", size)
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise ReplicaError(f"device {path} does not exist") from exc
    except OSError as exc:
        raise ReplicaError(f"cannot inspect device {path}: {exc.strerror}") from exc
    if not stat.S_ISBLK(st.st_mode):
        raise ReplicaError(f"{path} is not a block device")
    try:
        fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ReplicaError(
                f"device {path} is in use (mounted, part of LVM/RAID, or held by another process)"
            ) from exc
        raise ReplicaError(f"cannot open device {path}: {exc.strerror}") from exc
    try:
        actual = os.lseek(fd, 0, os.SEEK_END)
        if actual != size:
            raise ReplicaSizeMismatch(f"device {path} has {actual} bytes but the disk is {size} bytes")
    except OSError as exc:
        os.close(fd)
        raise ReplicaError(f"cannot size device {path}: {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        raise
    return DeviceReplica(path, size, fd)
