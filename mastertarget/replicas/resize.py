"""Resizing a replica when its source disk changed size (the resync that follows fixes the contents).

Raw and flat VMDK formats resize their data file (thin: truncate; thick: the new part preallocated) and,
for VMDKs, rewrite the descriptor's extent size and geometry keeping its identity (ddb.uuid, CID: a
VM that uses the disk must still recognise it). A block-device replica cannot be resized from here: it
must already have the new size. monolithicSparse is not resizable yet (its grain directory is sized
for the capacity at creation). The replica must be closed while it is resized.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from standby.plumbing.durable import save_file

from .base import SECTOR, ReplicaError, check_size
from .descriptor import geometry, parse_descriptor
from .vmdk_flat import FLAVOURS, read_descriptor_file


def resize_replica(fmt: str, path: Path, new_size: int) -> None:
    check_size(fmt, new_size)
    path = Path(path)
    if fmt == "raw":
        _resize_file(path, new_size, thin=True)
    elif fmt in FLAVOURS:
        flavour = FLAVOURS[fmt]
        desc = parse_descriptor(read_descriptor_file(path), str(path))
        if len(desc.extents) != 1:
            raise ReplicaError(f"{path}: only single-extent VMDKs can be resized")
        extent = desc.extents[0]
        flat = Path(extent.filename)
        flat = flat if flat.is_absolute() else path.parent / flat
        _resize_file(flat, new_size, thin=flavour.thin)
        cylinders, heads, sectors = geometry(new_size)
        desc.extents = [dataclasses.replace(extent, sectors=new_size // SECTOR)]
        desc.ddb["ddb.geometry.cylinders"] = str(cylinders)
        desc.ddb["ddb.geometry.heads"] = str(heads)
        desc.ddb["ddb.geometry.sectors"] = str(sectors)
        save_file(path, desc.render().encode("ascii"), mode=0o600)
    elif fmt == "device":
        with open(path, "rb") as f:
            have = f.seek(0, os.SEEK_END)
        if have != new_size:
            raise ReplicaError(
                f"replica device {path} has {have} bytes, the source disk now {new_size}: resize the device first"
            )
    else:
        raise ReplicaError(f"{fmt} replicas cannot be resized (yet): the source disk changed size")


def _resize_file(path: Path, size: int, thin: bool) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise ReplicaError(f"cannot open {path} to resize it: {exc.strerror}") from exc
    try:
        old = os.fstat(fd).st_size
        os.ftruncate(fd, size)
        if not thin and size > old:
            os.posix_fallocate(fd, old, size - old)
        os.fsync(fd)
    except OSError as exc:
        raise ReplicaError(f"cannot resize {path} to {size} bytes: {exc.strerror}") from exc
    finally:
        os.close(fd)
