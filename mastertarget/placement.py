"""Where a replica may go: the checks behind the process server's `check_replica` request, made before a
disk is protected (a new replica's path, or an existing replica to seed from)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode, ReplicaFormat

from .replicas import ReplicaError, open_replica
from .replicas.vmdk_flat import FLAVOURS
from .volume import overlaps


async def check_replica(retention_dir: Path, used: set[str], path: str, format: str, size: int,
                        existing: bool = False) -> None:
    """RequestFailed unless `path` can hold the replica (`format`, `size` bytes) of a disk: off the retention
    volume, used by no other protected disk (`used`), and new — or, `existing`, a replica to seed from."""
    if overlaps(path, retention_dir):
        code, message = ErrorCode.BAD_INPUT, f"replica {path} would be on the retention volume {retention_dir}"
    elif existing:
        code, message = await asyncio.to_thread(check_existing_replica, path, format, size, used)
    else:
        code, message = check_replica_path(path, format, size, used)
    if code:
        raise RequestFailed(code, message)


def check_existing_replica(path: str, fmt: str, size: int, used: set[str]) -> tuple[str, str]:
    """Can the replica at `path` (offline seeding) be opened as format `fmt` with the source's size?"""
    if fmt not in set(ReplicaFormat):
        return ErrorCode.BAD_INPUT, f"unknown replica format {fmt!r}"
    if path in used:
        return "replica-exists", f"replica path {path} is already used by another protected disk"
    if fmt == ReplicaFormat.DEVICE:
        code, message = check_device_free(path, size)
        if code:
            return code, message
    elif not Path(path).exists():
        return ErrorCode.MISSING, f"replica {path} does not exist on the master target"
    try:
        open_replica(fmt, Path(path), size).close()
    except (ReplicaError, OSError) as exc:
        return ErrorCode.BAD_INPUT, f"cannot use existing replica {path}: {exc}"
    return "", ""


def check_replica_path(path: str, fmt: str, size: int, used: set[str]) -> tuple[str, str]:
    """Is `path` usable for a new replica of `size` bytes? ("", "") or (code, message)."""
    if fmt not in set(ReplicaFormat):
        return ErrorCode.BAD_INPUT, f"unknown replica format {fmt!r}"
    p = Path(path)
    if not p.is_absolute():
        return ErrorCode.BAD_INPUT, f"replica path {path!r} must be absolute"
    if path in used:
        return "replica-exists", f"replica path {path} is already used by another protected disk"
    if fmt == ReplicaFormat.DEVICE:
        try:
            mode = os.stat(p).st_mode
        except OSError as exc:
            return ErrorCode.BAD_INPUT, f"replica device {path}: {exc.strerror}"
        if not stat.S_ISBLK(mode):
            return ErrorCode.BAD_INPUT, f"{path} is not a block device"
        with open(p, "rb") as f:
            dev_size = f.seek(0, os.SEEK_END)
        if dev_size != size:
            return "size-mismatch", f"device {path} has {dev_size} bytes, the source disk has {size}"
        return "", ""
    flat = p.with_name(p.stem + "-flat.vmdk") if fmt in FLAVOURS else None
    for q in (p, flat):
        if q is not None and q.exists():
            return "replica-exists", (
                f"replica path {q} already exists on the master target (refusing to overwrite it); if {p} holds a "
                "copy of this disk (a restored backup, an earlier replica), protect with --existing to seed from it: "
                "only the differences travel")
    if not p.parent.is_dir():
        return ErrorCode.BAD_INPUT, f"directory {p.parent} does not exist on the master target"
    if not os.access(p.parent, os.W_OK):
        return ErrorCode.BAD_INPUT, f"directory {p.parent} is not writable on the master target"
    return "", ""


def check_device_free(path: str, size: int) -> tuple[str, str]:
    """Is the block device at `path` there, of exactly `size` bytes, and used by nobody? What reprotect to
    the original location asks of an original disk: a missing, smaller or mounted disk is refused with the
    reason, before anything is written."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return ErrorCode.MISSING, f"disk {path} does not exist on the master target (was it deleted? reprotect to an " \
                          "alternate location instead)"
    except OSError as exc:
        return ErrorCode.BAD_INPUT, f"disk {path}: {exc.strerror}"
    if not stat.S_ISBLK(mode):
        return ErrorCode.BAD_INPUT, f"{path} is not a block device"
    try:
        # O_EXCL on a block device: refused (EBUSY) while it is mounted or held by another exclusive user.
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return ErrorCode.IN_USE, f"disk {path} is in use (mounted, or held by another program): unmount it first"
        return ErrorCode.BAD_INPUT, f"disk {path}: {exc.strerror}"
    try:
        dev_size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if dev_size != size:
        what = "smaller than" if dev_size < size else "larger than"
        return ErrorCode.SIZE_MISMATCH, (f"disk {path} has {dev_size} bytes, {what} the {size} bytes of the disk "
                                         "to replicate")
    return "", ""
