"""The hosted sparse extent format (monolithicSparse), as data: header, layout, table encoding.

No I/O here; ``vmdk_sparse`` does the reading and writing. Facts are from VMware's "Virtual Disk
Format 1.1" (hosted sparse extents) and agree with what qemu's block/vmdk.c reads and writes.

File layout we create (all offsets in 512-byte sectors)::

    0                header (SparseExtentHeader, one sector, "KDMV")
    1 .. 20          embedded text descriptor, NUL padded (descriptorOffset=1, descriptorSize=20)
    rgdOffset        redundant grain directory: one uint32 per grain table = sector of that table
    rgdOffset+gd     redundant grain tables, numGTEsPerGT uint32 each, 4 sectors per table
    gdOffset         primary grain directory
    gdOffset+gd      primary grain tables
    overHead         first grain (metadata end rounded up to a grain)
    overHead + k*g   grains, 64 KiB each, appended in allocation order

Every grain table exists from creation on, both copies, so allocating a grain only ever changes a
grain-table entry from 0 to the grain's sector and never touches a directory. That is what makes
the crash ordering in ``vmdk_sparse`` simple: data first, then entries, and an entry is never
changed once set.

Header (little endian, packed, 512 bytes)::

    off size field
      0   4  magicNumber        'KDMV' (0x564d444b read as a little-endian uint32)
      4   4  version            1
      8   4  flags              bit0 valid newline test, bit1 redundant grain table in use
     12   8  capacity           sectors
     20   8  grainSize          sectors (128 = 64 KiB)
     28   8  descriptorOffset   sectors
     36   8  descriptorSize     sectors
     44   4  numGTEsPerGT       512
     48   8  rgdOffset          sectors
     56   8  gdOffset           sectors
     64   8  overHead           sectors, grain-aligned
     72   1  uncleanShutdown    1 while an application has the extent open for writing
     73   4  '\\n' ' ' '\\r' '\\n'  detects a file mangled by a text-mode (FTP ASCII) transfer
     77   2  compressAlgorithm  0 = none
     79 433  padding
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass, replace

from .base import SECTOR, ReplicaError

MAGIC = b"KDMV"
VERSION = 1
FLAG_VALID_NL_TEST = 1 << 0
FLAG_REDUNDANT_GT = 1 << 1
FLAG_ZEROED_GRAIN = 1 << 2  # version 2 only: GTE value 1 means "reads as zeros"; not supported
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
NL_CHECK = b"\n \r\n"

GRAIN_SECTORS = 128  # 64 KiB, VMware's default
GTES_PER_GT = 512  # fixed by the format
DESCRIPTOR_OFFSET = 1
DESCRIPTOR_SECTORS = 20  # what VMware and qemu reserve; our descriptor needs under 2 sectors
GTE_BYTES = 4

# Grain-table entries and directory entries are uint32 sector numbers, so no byte of the extent can
# lie at or beyond sector 2**32: a hosted sparse extent holds at most 2 TiB.
MAX_SECTORS = 1 << 32
MAX_SPARSE_SIZE = MAX_SECTORS * SECTOR

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH433x")
UNCLEAN_SHUTDOWN_OFFSET = 72
assert _HEADER.size == SECTOR
assert struct.calcsize("<4sIIQQQQIQQQ") == UNCLEAN_SHUTDOWN_OFFSET


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class SparseHeader:
    """The extent header; immutable, change a field with ``with_unclean()``."""

    capacity: int
    grain_size: int = GRAIN_SECTORS
    descriptor_offset: int = DESCRIPTOR_OFFSET
    descriptor_size: int = DESCRIPTOR_SECTORS
    num_gtes_per_gt: int = GTES_PER_GT
    rgd_offset: int = 0
    gd_offset: int = 0
    overhead: int = 0
    unclean_shutdown: int = 0
    version: int = VERSION
    flags: int = FLAG_VALID_NL_TEST | FLAG_REDUNDANT_GT
    nl_check: bytes = NL_CHECK
    compress_algorithm: int = 0
    magic: bytes = MAGIC

    def pack(self) -> bytes:
        return _HEADER.pack(
            self.magic,
            self.version,
            self.flags,
            self.capacity,
            self.grain_size,
            self.descriptor_offset,
            self.descriptor_size,
            self.num_gtes_per_gt,
            self.rgd_offset,
            self.gd_offset,
            self.overhead,
            self.unclean_shutdown,
            self.nl_check,
            self.compress_algorithm,
        )

    @classmethod
    def unpack(cls, data: bytes) -> SparseHeader:
        (magic, version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead, unclean, nl, comp) = (
            _HEADER.unpack(data[:SECTOR])
        )
        return cls(
            capacity=capacity,
            grain_size=grain,
            descriptor_offset=doff,
            descriptor_size=dsize,
            num_gtes_per_gt=gtes,
            rgd_offset=rgd,
            gd_offset=gd,
            overhead=overhead,
            unclean_shutdown=unclean,
            version=version,
            flags=flags,
            nl_check=nl,
            compress_algorithm=comp,
            magic=magic,
        )

    def with_unclean(self, unclean: bool) -> SparseHeader:
        return replace(self, unclean_shutdown=1 if unclean else 0)

    # -- derived sizes --------------------------------------------------------------------------

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def grain_count(self) -> int:
        return ceil_div(self.capacity, self.grain_size)

    @property
    def gt_count(self) -> int:
        return ceil_div(self.grain_count, self.num_gtes_per_gt)

    @property
    def gt_bytes(self) -> int:
        return self.num_gtes_per_gt * GTE_BYTES

    @property
    def gt_sectors(self) -> int:
        return ceil_div(self.gt_bytes, SECTOR)

    @property
    def gd_sectors(self) -> int:
        return ceil_div(self.gt_count * GTE_BYTES, SECTOR)

    def validate_for_writing(self, source: str) -> None:
        """Refuse headers we cannot safely write: the message says which field and why."""
        if self.magic != MAGIC:
            raise ReplicaError(f"{source} is not a hosted sparse VMDK (no KDMV magic)")
        if self.version != VERSION:
            raise ReplicaError(f"{source}: sparse VMDK version {self.version} is not supported for writing")
        if self.flags & FLAG_VALID_NL_TEST and self.nl_check != NL_CHECK:
            raise ReplicaError(f"{source}: newline check bytes damaged (file copied in text mode?)")
        if self.flags & (FLAG_COMPRESSED | FLAG_MARKERS) or self.compress_algorithm:
            raise ReplicaError(f"{source} is a compressed (streamOptimized) VMDK; it cannot be written in place")
        if not self.flags & FLAG_REDUNDANT_GT or not self.rgd_offset:
            raise ReplicaError(f"{source} has no redundant grain tables; crash-safe writing needs them")
        g = self.grain_size
        if g < 8 or g & (g - 1) or g > 1 << 20:
            raise ReplicaError(f"{source}: grain size {g} sectors is invalid (power of two, at least 8)")
        if self.num_gtes_per_gt != GTES_PER_GT:
            raise ReplicaError(f"{source}: {self.num_gtes_per_gt} entries per grain table, format requires 512")
        if self.capacity <= 0 or self.capacity > MAX_SECTORS:
            raise ReplicaError(f"{source}: capacity {self.capacity} sectors is out of range")
        if self.overhead % g or self.overhead >= MAX_SECTORS:
            raise ReplicaError(f"{source}: overHead {self.overhead} is not grain-aligned")
        for name, start, length in (
            ("descriptor", self.descriptor_offset, self.descriptor_size),
            ("redundant grain directory", self.rgd_offset, self.gd_sectors),
            ("grain directory", self.gd_offset, self.gd_sectors),
        ):
            if length and (start < 1 or start + length > self.overhead):
                raise ReplicaError(f"{source}: {name} lies outside the metadata area")


def new_header(capacity: int) -> SparseHeader:
    """Header and layout for a new extent of ``capacity`` sectors, laid out as VMware does."""
    h = SparseHeader(capacity=capacity)
    rgd = DESCRIPTOR_OFFSET + DESCRIPTOR_SECTORS
    gd = rgd + h.gd_sectors + h.gt_count * h.gt_sectors
    end = gd + h.gd_sectors + h.gt_count * h.gt_sectors
    overhead = ceil_div(end, h.grain_size) * h.grain_size
    return replace(h, rgd_offset=rgd, gd_offset=gd, overhead=overhead)


def directory_for(header: SparseHeader, gd_offset: int) -> list[int]:
    """Sector of each grain table following the directory at ``gd_offset``, in order."""
    first = gd_offset + header.gd_sectors
    return [first + i * header.gt_sectors for i in range(header.gt_count)]


def pack_directory(header: SparseHeader, sectors: list[int]) -> bytes:
    """A grain directory, padded with zeros to whole sectors."""
    return table_to_bytes(array("I", sectors)).ljust(header.gd_sectors * SECTOR, b"\0")


# Grain tables are arrays of little-endian uint32; array('I') is 4 bytes on every platform
# CPython supports, and we swap on big-endian hosts.
assert array("I").itemsize == GTE_BYTES
_SWAP = sys.byteorder != "little"


def table_from_bytes(data: bytes) -> array[int]:
    t = array("I")
    t.frombytes(data)
    if _SWAP:
        t.byteswap()
    return t


def table_to_bytes(t: array[int]) -> bytes:
    if not _SWAP:
        return t.tobytes()
    c = array("I", t)
    c.byteswap()
    return c.tobytes()
