"""Flat VMDKs: a text descriptor ``NAME.vmdk`` over a raw extent ``NAME-flat.vmdk``.

Three formats share this layout and differ only in the descriptor and in how the extent is allocated:

==========================  =================  ===========  ==============================
format                      createType         extent type  extent file
==========================  =================  ===========  ==============================
``vmdk``                    vmfs               VMFS         sparse, ddb.thinProvisioned=1
``vmdk-thick``              vmfs               VMFS         preallocated (posix_fallocate)
``vmdk-monolithic-flat``    monolithicFlat     FLAT ... 0   sparse (hosted products)
==========================  =================  ===========  ==============================

``vmfs`` is what ESXi itself writes on an NFS datastore, so a replica made here can be registered
as the disk of a VM without conversion; ``monolithicFlat`` is the hosted (Workstation/Fusion)
spelling of the same thing. The data path is ``FileReplica``: the extent is byte-for-byte the disk.

Create order: the extent first (fsynced, directory fsynced), the descriptor last through the
durable temp-file-and-rename helper. A crash in between leaves an orphan extent and no descriptor,
which a retried create reports as "already exists" rather than silently reusing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from standby.plumbing.durable import save_file

from .base import (
    SECTOR,
    ReplicaError,
    ReplicaSizeMismatch,
    check_parent_dir,
    check_size,
    refuse_existing,
    remove_quietly,
)
from .descriptor import Extent, flat_extent_name, new_descriptor, parse_descriptor
from .raw import FileReplica, create_data_file, open_data_file

# A descriptor is a few hundred bytes; anything bigger than this is not one (for instance the
# operator named the -flat.vmdk extent), and we will not read gigabytes to find that out.
MAX_DESCRIPTOR_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class FlatFlavour:
    """What distinguishes the flat formats from one another."""

    create_type: str
    extent_type: str
    extent_offset: int | None  # FLAT extents carry an explicit start offset, VMFS ones do not
    thin: bool  # sparse extent file, holes punched on write_zeroes
    mark_thin: bool  # ddb.thinProvisioned = "1": how ESXi knows to report and treat the disk as thin


FLAVOURS: dict[str, FlatFlavour] = {
    "vmdk": FlatFlavour("vmfs", "VMFS", None, thin=True, mark_thin=True),
    "vmdk-thick": FlatFlavour("vmfs", "VMFS", None, thin=False, mark_thin=False),
    # Hosted products have no thin flag for flat disks; the file is sparse all the same.
    "vmdk-monolithic-flat": FlatFlavour("monolithicFlat", "FLAT", 0, thin=True, mark_thin=False),
}


class FlatVmdkReplica(FileReplica):
    """A flat VMDK: ``path`` is the descriptor, ``data_path`` the extent the data lives in."""


def create_vmdk_flat(fmt: str, path: Path, size: int) -> FlatVmdkReplica:
    """Create descriptor and extent for one of the flat formats; refuses if either already exists."""
    flavour = FLAVOURS[fmt]
    check_size(fmt, size)
    path = Path(path)
    flat_path = path.with_name(flat_extent_name(path.name))
    refuse_existing(path, flat_path)
    check_parent_dir(path)

    extent = Extent("RW", size // SECTOR, flavour.extent_type, flat_path.name, flavour.extent_offset)
    descriptor = new_descriptor(flavour.create_type, [extent], size, thin=flavour.mark_thin)
    fd = create_data_file(flat_path, size, thin=flavour.thin)
    try:
        save_file(path, descriptor.render().encode("ascii"), mode=0o600)
    except OSError as exc:
        os.close(fd)
        remove_quietly(flat_path)
        raise ReplicaError(f"cannot write VMDK descriptor {path}: {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        remove_quietly(flat_path)
        raise
    return FlatVmdkReplica(fmt, path, size, flat_path, fd, flavour.thin)


def open_vmdk_flat(fmt: str, path: Path, size: int) -> FlatVmdkReplica:
    """Reopen a flat VMDK, checking that its descriptor is the format and size the caller expects."""
    flavour = FLAVOURS[fmt]
    check_size(fmt, size)
    path = Path(path)
    text = read_descriptor_file(path)
    desc = parse_descriptor(text, str(path))
    if desc.create_type != flavour.create_type:
        raise ReplicaError(
            f"{path} is a createType={desc.create_type!r} VMDK, not {flavour.create_type!r} as format {fmt} needs"
        )
    if len(desc.extents) != 1:
        raise ReplicaError(f"{path} has {len(desc.extents)} extents; only single-extent VMDKs are supported")
    extent = desc.extents[0]
    if extent.access != "RW" or extent.type != flavour.extent_type:
        raise ReplicaError(f"{path}: extent is {extent.access} {extent.type}, expected RW {flavour.extent_type}")
    if extent.offset not in (None, 0):
        raise ReplicaError(f"{path}: extent starts at sector {extent.offset}; only offset 0 is supported")
    if extent.sectors * SECTOR != size:
        raise ReplicaSizeMismatch(
            f"{path} describes a disk of {extent.sectors * SECTOR} bytes but the disk is {size} bytes"
        )
    flat_path = Path(extent.filename)
    if not flat_path.is_absolute():
        flat_path = path.parent / flat_path
    fd = open_data_file(flat_path, size, "VMDK extent")
    return FlatVmdkReplica(fmt, path, size, flat_path, fd, flavour.thin)


def read_descriptor_file(path: Path) -> str:
    """Read a stand-alone descriptor, refusing binary files (a sparse VMDK or a flat extent)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DESCRIPTOR_BYTES + 1)
    except FileNotFoundError as exc:
        raise ReplicaError(f"VMDK descriptor {path} does not exist") from exc
    except OSError as exc:
        raise ReplicaError(f"cannot read VMDK descriptor {path}: {exc.strerror}") from exc
    if data[:4] == b"KDMV":
        raise ReplicaError(f"{path} is a hosted sparse VMDK (monolithicSparse), not a descriptor file")
    if len(data) > MAX_DESCRIPTOR_BYTES or b"\0" in data:
        raise ReplicaError(f"{path} is not a VMDK descriptor (binary or too large)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReplicaError(f"{path} is not a VMDK descriptor (not UTF-8 text)") from exc
