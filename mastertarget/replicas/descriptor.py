"""VMDK text descriptors: render the ones we write, parse the ones we reopen.

A descriptor is the small text file (or, for monolithicSparse, the text embedded at sector 1 of the
sparse file) that names the create type and the extents. We write what ESXi writes on an NFS
datastore (``createType="vmfs"``) and what the hosted products write (``monolithicFlat``,
``monolithicSparse``), which is also what ``qemu-img`` accepts::

    # Disk DescriptorFile
    version=1
    encoding="UTF-8"
    CID=8d2f3c1a
    parentCID=ffffffff
    createType="vmfs"

    # Extent description
    RW 134217728 VMFS "disk-flat.vmdk"

    # The Disk Data Base
    #DDB

    ddb.adapterType = "lsilogic"
    ddb.geometry.cylinders = "8354"
    ...

Two readers shaped what is safe to put here: qemu finds ``CID`` with a plain substring search, so
nothing before the ``CID=`` line may contain "CID"; and qemu's format probe only accepts comment or
blank lines before ``version=``.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass, field

from .base import SECTOR, ReplicaError

# lsilogic (and every SCSI adapter) uses the 255-head, 63-sector translation; VMware computes the
# cylinder count from it without the IDE 16383 cap.
HEADS = 255
SECTORS_PER_TRACK = 63
ADAPTER_TYPE = "lsilogic"
# The oldest virtual hardware version that can use the disk: "4" is what qemu writes and every
# VMware product since Workstation 5 / ESX 3 accepts it.
VIRTUAL_HW_VERSION = "4"

_EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')
_KEY_RE = re.compile(r'^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*"?(.*?)"?\s*$')


@dataclass(frozen=True, slots=True)
class Extent:
    """One extent line: ``RW <sectors> <type> "<file>" [<offset>]``."""

    access: str
    sectors: int
    type: str
    filename: str
    offset: int | None = None

    def render(self) -> str:
        line = f'{self.access} {self.sectors} {self.type} "{self.filename}"'
        if self.offset is not None:
            line += f" {self.offset}"
        return line


@dataclass(slots=True)
class Descriptor:
    """The parts of a descriptor we write and check; unknown keys are kept for reading only."""

    create_type: str
    extents: list[Extent]
    cid: int = field(default_factory=lambda: secrets.randbits(32))
    parent_cid: int = 0xFFFFFFFF
    ddb: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """The descriptor text, LF line endings, ASCII only."""
        lines = [
            "# Disk DescriptorFile",
            "version=1",
            'encoding="UTF-8"',
            f"CID={self.cid:08x}",
            f"parentCID={self.parent_cid:08x}",
            f'createType="{self.create_type}"',
            "",
            "# Extent description",
            *(e.render() for e in self.extents),
            "",
            "# The Disk Data Base",
            "#DDB",
            "",
            *(f'{k} = "{v}"' for k, v in self.ddb.items()),
        ]
        return "\n".join(lines) + "\n"


def geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors) for an lsilogic disk of ``size`` bytes, as VMware computes it."""
    cylinders = max(1, size // (HEADS * SECTORS_PER_TRACK * SECTOR))
    return cylinders, HEADS, SECTORS_PER_TRACK


def vmware_uuid() -> str:
    """A ddb.uuid value: 16 random bytes as space-separated hex pairs, VMware's spelling."""
    return " ".join(f"{b:02x}" for b in uuid.uuid4().bytes)


def new_descriptor(create_type: str, extents: list[Extent], size: int, *, thin: bool = False) -> Descriptor:
    """A fresh descriptor with a random CID, geometry for ``size``, and the thin flag if asked."""
    cid = secrets.randbits(32)
    cylinders, heads, sectors = geometry(size)
    ddb = {
        "ddb.adapterType": ADAPTER_TYPE,
        "ddb.geometry.cylinders": str(cylinders),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": str(sectors),
        # ESXi keeps CID equal to the low 32 bits of longContentID; so do we.
        "ddb.longContentID": f"{secrets.randbits(96):024x}{cid:08x}",
        "ddb.uuid": vmware_uuid(),
        "ddb.virtualHWVersion": VIRTUAL_HW_VERSION,
    }
    if thin:
        ddb["ddb.thinProvisioned"] = "1"
    return Descriptor(create_type=create_type, extents=extents, cid=cid, ddb=ddb)


def parse_descriptor(text: str, source: str) -> Descriptor:
    """Parse descriptor text; ``source`` names the file in error messages.

    Strict about what we rely on (version, createType, well-formed extent lines), lenient about
    everything else so a descriptor touched by VMware tools still opens.
    """
    text = text.split("\0", 1)[0]
    fields: dict[str, str] = {}
    ddb: dict[str, str] = {}
    extents: list[Extent] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            access, sectors, etype, fname, offset = m.groups()
            if fname is None:
                raise ReplicaError(f"{source}: extent line without a file name: {line!r}")
            if len(sectors) > 20 or (offset and len(offset) > 20):
                raise ReplicaError(f"{source}: extent size or offset out of range: {line[:120]!r}")
            extents.append(Extent(access, int(sectors), etype, fname, int(offset) if offset else None))
            continue
        k = _KEY_RE.match(line)
        if not k:
            raise ReplicaError(f"{source}: not a VMDK descriptor line: {line!r}")
        key, value = k.groups()
        (ddb if key.startswith("ddb.") else fields)[key] = value
    if fields.get("version") not in {"1", "2", "3"}:
        raise ReplicaError(f"{source}: not a VMDK descriptor (no version=1 line)")
    if "createType" not in fields:
        raise ReplicaError(f"{source}: VMDK descriptor has no createType")
    if not extents:
        raise ReplicaError(f"{source}: VMDK descriptor lists no extents")
    try:
        cid = int(fields.get("CID", "0"), 16)
        parent_cid = int(fields.get("parentCID", "ffffffff"), 16)
    except ValueError as exc:
        raise ReplicaError(f"{source}: bad CID in VMDK descriptor") from exc
    return Descriptor(create_type=fields["createType"], extents=extents, cid=cid, parent_cid=parent_cid, ddb=ddb)


def flat_extent_name(descriptor_name: str) -> str:
    """``disk.vmdk`` -> ``disk-flat.vmdk`` (qemu and VMware name it the same way)."""
    stem, dot, ext = descriptor_name.rpartition(".")
    if not dot or not stem:
        return f"{descriptor_name}-flat"
    return f"{stem}-flat.{ext}"
