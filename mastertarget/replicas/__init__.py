"""Replica targets: the disks the master target keeps up to date (DESIGN.md section 7).

One narrow interface, ``Replica`` (write, write_zeroes, read, sync, close, data_files), in front of
six formats (proto.enums.ReplicaFormat):

``vmdk``                  ESXi ``vmfs`` descriptor over a sparse ``NAME-flat.vmdk`` (thin)
``vmdk-thick``            the same with the extent preallocated
``vmdk-monolithic-flat``  hosted-product ``monolithicFlat`` descriptor over a flat extent
``vmdk-sparse``           hosted ``monolithicSparse``: thin in the format itself, at most 2 TiB
``raw``                   a sparse raw image
``device``                an existing block device of exactly the disk's size

``create_replica`` makes a new one (never over an existing file); ``open_replica`` reopens one after
a restart or a crash, recovering a sparse VMDK that was not closed cleanly. ``sync()`` is the
durability point the master target acknowledges a batch on.
"""

from __future__ import annotations

from pathlib import Path

from standby.proto.enums import ReplicaFormat

from .base import Replica, ReplicaError, ReplicaExists, ReplicaSizeMismatch
from .blockdev import open_device
from .raw import create_raw, open_raw
from .vmdk_flat import FLAVOURS, create_vmdk_flat, open_vmdk_flat
from .vmdk_sparse import create_vmdk_sparse, open_vmdk_sparse

__all__ = [
    "Replica",
    "ReplicaError",
    "ReplicaExists",
    "ReplicaSizeMismatch",
    "create_replica",
    "open_replica",
]


def _check_format(format: str) -> None:
    if format not in set(ReplicaFormat):
        raise ReplicaError(f"unknown replica format {format!r}; choose one of: {', '.join(ReplicaFormat)}")


def create_replica(fmt: str, path: Path, size: int) -> Replica:
    """Create a replica of ``size`` bytes at ``path`` and return it open for writing.

    Refuses (``ReplicaExists``) if ``path`` -- or, for flat VMDKs, its ``-flat.vmdk`` extent --
    exists; a ``device`` must instead exist already and have exactly ``size`` bytes.
    """
    _check_format(fmt)
    path = Path(path)
    if fmt in FLAVOURS:
        return create_vmdk_flat(fmt, path, size)
    if fmt == "vmdk-sparse":
        return create_vmdk_sparse(path, size)
    if fmt == "raw":
        return create_raw(path, size)
    return open_device(path, size)


def open_replica(fmt: str, path: Path, size: int) -> Replica:
    """Reopen an existing replica; ``ReplicaSizeMismatch`` if it does not hold ``size`` bytes."""
    _check_format(fmt)
    path = Path(path)
    if fmt in FLAVOURS:
        return open_vmdk_flat(fmt, path, size)
    if fmt == "vmdk-sparse":
        return open_vmdk_sparse(path, size)
    if fmt == "raw":
        return open_raw(path, size)
    return open_device(path, size)
