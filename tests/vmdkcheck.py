"""Independent structural checker for hosted sparse (monolithicSparse) VMDK files.

Written from VMware's "Virtual Disk Format 1.1" without importing the writer, so a bug shared by
writer and checker cannot hide itself. Used by the replica tests after every write pattern and every
simulated or real crash.

``check(path)`` returns a ``SparseReport`` or raises ``VmdkCheckError`` listing every problem found:
header sanity, embedded descriptor, both grain directories, primary and redundant grain tables equal,
every entry zero or a whole grain inside the data area of the file, no grain mapped twice.
``read_image(path)`` reads the virtual disk through the primary tables (a third reader besides qemu
and libvmdk).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")  # the 433 padding bytes follow
FLAG_NL = 1
FLAG_RGD = 2


class VmdkCheckError(AssertionError):
    """The file is not a structurally valid hosted sparse extent; ``problems`` lists why."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
        self.problems = problems


@dataclass
class SparseReport:
    """What a valid file looks like, for tests that want to assert on it."""

    capacity: int
    grain_size: int
    overhead: int
    file_sectors: int
    unclean_shutdown: int
    descriptor: str
    allocated: dict[int, int] = field(default_factory=dict)  # grain number -> file sector


def _u32_list(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data[: len(data) // 4 * 4]))


def check(path: Path | str, *, expect_clean: bool | None = None) -> SparseReport:
    """Check the file; ``expect_clean`` True/False also asserts the uncleanShutdown flag."""
    path = Path(path)
    data = path.read_bytes()
    problems: list[str] = []
    if len(data) < SECTOR:
        raise VmdkCheckError(path, ["file shorter than one sector"])
    (magic, version, flags, capacity, grain, doff, dsize, gtes, rgd, gd, overhead, unclean, nl, comp) = (
        HEADER.unpack_from(data, 0)
    )
    if magic != b"KDMV":
        raise VmdkCheckError(path, [f"bad magic {magic!r}"])
    if version != 1:
        problems.append(f"version {version}, expected 1")
    if flags & FLAG_NL and nl != b"\n \r\n":
        problems.append(f"newline check bytes {nl!r}")
    if not flags & FLAG_RGD:
        problems.append("redundant grain table flag not set")
    if comp != 0:
        problems.append(f"compressAlgorithm {comp}")
    if grain < 8 or grain & (grain - 1):
        problems.append(f"grainSize {grain} is not a power of two >= 8")
    if gtes != 512:
        problems.append(f"numGTEsPerGT {gtes}, expected 512")
    if unclean not in (0, 1):
        problems.append(f"uncleanShutdown byte is {unclean}")
    if expect_clean is not None and bool(unclean) == expect_clean:
        problems.append(f"uncleanShutdown is {unclean}, expected {0 if expect_clean else 1}")
    if grain and overhead % grain:
        problems.append(f"overHead {overhead} not a multiple of grainSize {grain}")
    if data[HEADER.size : SECTOR].count(0) != SECTOR - HEADER.size:
        problems.append("header padding is not zero")
    if len(data) % SECTOR:
        problems.append(f"file size {len(data)} is not whole sectors")
    file_sectors = len(data) // SECTOR
    if file_sectors < overhead:
        problems.append(f"file ({file_sectors} sectors) shorter than overHead {overhead}")
    if problems:
        raise VmdkCheckError(path, problems)

    # Embedded descriptor.
    desc_raw = data[doff * SECTOR : (doff + dsize) * SECTOR]
    descriptor = desc_raw.split(b"\0", 1)[0].decode("ascii", "replace")
    if not doff or doff + dsize > overhead:
        problems.append("descriptor outside the metadata area")
    if not descriptor.startswith("# Disk DescriptorFile\n"):
        problems.append("descriptor does not start with '# Disk DescriptorFile'")
    if 'createType="monolithicSparse"' not in descriptor:
        problems.append("descriptor createType is not monolithicSparse")
    extents = re.findall(r'^RW (\d+) SPARSE "([^"]+)"$', descriptor, re.M)
    if extents != [(str(capacity), path.name)]:
        problems.append(f"descriptor extents {extents}, expected one RW {capacity} SPARSE {path.name!r}")
    for key in ("CID", "parentCID"):
        if not re.search(rf"^{key}=[0-9a-f]{{8}}$", descriptor, re.M):
            problems.append(f"descriptor {key} missing or not 8 hex digits")

    # Directories and tables.
    grains = -(-capacity // grain)
    gt_count = -(-grains // gtes)
    gd_bytes = gt_count * 4
    gt_bytes = gtes * 4
    gt_sectors = -(-gt_bytes // SECTOR)
    meta_spans: list[tuple[int, int, str]] = [(0, 1, "header"), (doff, dsize, "descriptor")]
    tables: dict[str, list[list[int]]] = {}
    for name, off in (("primary", gd), ("redundant", rgd)):
        if not off or off * SECTOR + gd_bytes > overhead * SECTOR:
            problems.append(f"{name} grain directory at {off} outside the metadata area")
            continue
        meta_spans.append((off, -(-gd_bytes // SECTOR), f"{name} directory"))
        directory = _u32_list(data[off * SECTOR : off * SECTOR + gd_bytes])
        tabs = []
        for i, gt_sector in enumerate(directory):
            if gt_sector == 0 or gt_sector + gt_sectors > overhead:
                problems.append(f"{name} directory entry {i} = {gt_sector} not a preallocated table")
                tabs.append([0] * gtes)
                continue
            meta_spans.append((gt_sector, gt_sectors, f"{name} table {i}"))
            tabs.append(_u32_list(data[gt_sector * SECTOR : gt_sector * SECTOR + gt_bytes]))
        tables[name] = tabs
    meta_spans.sort()
    for (a, alen, an), (b, _, bn) in zip(meta_spans, meta_spans[1:], strict=False):
        if a + alen > b:
            problems.append(f"{an} overlaps {bn}")
    if problems:
        raise VmdkCheckError(path, problems)

    if tables["primary"] != tables["redundant"]:
        diff = [
            (i, j)
            for i, (pt, rt) in enumerate(zip(tables["primary"], tables["redundant"], strict=True))
            for j in range(gtes)
            if pt[j] != rt[j]
        ]
        problems.append(f"primary and redundant grain tables differ at {len(diff)} entries, first {diff[:5]}")
    allocated: dict[int, int] = {}
    owner: dict[int, int] = {}
    for i, table in enumerate(tables["primary"]):
        for j, sector in enumerate(table):
            if not sector:
                continue
            g = i * gtes + j
            if g >= grains:
                problems.append(f"grain {g} beyond capacity is mapped")
            if sector < overhead:
                problems.append(f"grain {g} -> sector {sector} inside the metadata area")
            if sector % grain:
                problems.append(f"grain {g} -> sector {sector} not grain-aligned")
            if sector + grain > file_sectors:
                problems.append(f"grain {g} -> sector {sector} extends past end of file ({file_sectors})")
            if sector in owner:
                problems.append(f"sector {sector} mapped by grains {owner[sector]} and {g}")
            owner[sector] = g
            allocated[g] = sector
    if problems:
        raise VmdkCheckError(path, problems)
    return SparseReport(capacity, grain, overhead, file_sectors, unclean, descriptor, allocated)


def read_image(path: Path | str) -> bytes:
    """The virtual disk's contents, read through the (checked) primary grain tables."""
    path = Path(path)
    report = check(path)
    data = path.read_bytes()
    gb = report.grain_size * SECTOR
    out = bytearray(report.capacity * SECTOR)
    for g, sector in report.allocated.items():
        start = g * gb
        n = min(gb, len(out) - start)
        out[start : start + n] = data[sector * SECTOR : sector * SECTOR + n]
    return bytes(out)
