"""Durable metadata writes: the one helper every state file goes through.

Write to a temporary file in the same directory, fsync it, rename it over the target, fsync the
directory. A crash at any instant leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Let the kernel forget the cached pages of a range already made durable (length 0: to the end).

    The cache segments, the replicas and the retention journal are written once and read rarely, so
    keeping their pages only pushes out what the machine does use. It is also where much of the CPU
    went: on the 2-core test machine, fdatasync'd 8 MiB writes cost 3 s of system time per GiB while
    the page cache grew, and 0.2 s when each written range was dropped after its sync (the kernel then
    reuses the same pages). Only clean pages are dropped: called after an fsync, it changes nothing
    about durability. Advice only: a file system that refuses it costs a few cached pages, nothing else."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` at the fd's position (appending, with O_APPEND)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_synced(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` at the fd's position (appending, with O_APPEND), then fsync."""
    write_all(fd, data)
    os.fsync(fd)


def truncate_synced(path: Path, size: int) -> None:
    """Cut a file to `size` bytes, durably (a cut-off torn or rolled-back record must stay cut off)."""
    os.truncate(path, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        write_synced(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    save_file(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


class DamagedFile(OSError):
    """A state file that cannot be read back as what was written (no checksum guards these small files:
    a damaged disk, an editor). An OSError, so whoever handles an unreadable file handles this one."""


def load_json(path: Path) -> Any:
    """A JSON document written by `save_json`; DamagedFile (with the path and why) if it is not one."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, 4300-digit ints
        raise DamagedFile(f"{path} is damaged: {str(exc)[:200]}") from None


def load_record(cls: type[T], path: Path, upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> T:
    """A dataclass saved with `save_json(asdict(...))`; DamagedFile if the file does not hold one. `upgrade`
    maps the fields of a file an older release wrote to the dataclass's."""
    raw = load_json(path)
    try:
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        return cls(**(upgrade(raw) if upgrade else raw))
    except (TypeError, ValueError) as exc:
        raise DamagedFile(f"{path} is damaged: {str(exc)[:200]}") from None


def make_private_dir(path: Path) -> Path:
    """Create a directory only its owner can enter (keys and state live there)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
