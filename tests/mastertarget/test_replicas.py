"""Replica targets against real readers: qemu-img, libvmdk and our own structural checker.

No mocks: every test writes real files (or a real loop device) and reads them back with tools that
share no code with the writer. The sparse-VMDK crash tests stop ``sync()`` between its steps, edit
the file with their own struct code to reach the states a power cut can leave, and finally
SIGKILL a real writer process at random moments.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from standby.mastertarget.replicas import (
    Replica,
    ReplicaError,
    ReplicaExists,
    ReplicaSizeMismatch,
    create_replica,
    open_replica,
)
from standby.mastertarget.replicas.base import SMALL_ZEROS
from standby.proto import hashtree
from standby.proto.enums import ReplicaFormat

# The tests directory is importable as "tests" when the repository root is on sys.path, and as the
# top level otherwise (pytest's rootdir conftest insertion); accept either layout.
try:
    from tests import vmdkcheck
    from tests.conftest import needs_qemu_img
except ModuleNotFoundError:
    import vmdkcheck  # type: ignore[no-redef]
    from conftest import needs_qemu_img  # type: ignore[no-redef]

KiB = 1024
MiB = 1024 * KiB
GRAIN = 64 * KiB
SECTOR = 512
SIZE = 64 * MiB + 5 * GRAIN  # an odd number of grains past a round size
FILE_KINDS = [k.value for k in ReplicaFormat if k != ReplicaFormat.DEVICE]
VMDK_KINDS = [k for k in FILE_KINDS if k.startswith("vmdk")]
CREATE_TYPE = {
    "vmdk": "vmfs",
    "vmdk-thick": "vmfs",
    "vmdk-monolithic-flat": "monolithicFlat",
    "vmdk-sparse": "monolithicSparse",
}


# -- helpers ---------------------------------------------------------------------------------------


def replica_path(tmp_path: Path, kind: str) -> Path:
    return tmp_path / ("disk.img" if kind == "raw" else "disk.vmdk")


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run qemu-img as a reader only (info, check, compare): it must never write a sparse VMDK."""
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120)


def qemu_compare(ref: Path, image: Path | str, fmt: str) -> None:
    res = qemu_img("compare", "-f", "raw", ref, "-F", fmt, image)
    assert res.returncode == 0, f"qemu-img compare: {res.stdout}{res.stderr}"


def qemu_check(image: Path) -> None:
    res = qemu_img("check", "-f", "vmdk", image)
    assert res.returncode == 0, f"qemu-img check: {res.stdout}{res.stderr}"


def qemu_info(image: Path) -> dict:
    res = qemu_img("info", "--output=json", image)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def write_ref(tmp_path: Path, ref: bytes | bytearray) -> Path:
    p = tmp_path / "reference.raw"
    p.write_bytes(ref)
    return p


def random_pattern(replica: Replica, ref: bytearray, rng: random.Random, ops: int = 140) -> None:
    """A realistic mix of what a batch stream does, mirrored into ``ref``.

    Grain-aligned and unaligned (but 512-aligned) writes, partial grains, overwrites of earlier
    writes, zero data through write(), write_zeroes over allocated and unallocated space, big
    multi-MiB writes, and syncs in between.
    """
    size = len(ref)
    history: list[tuple[int, int]] = []

    def put(off: int, data: bytes) -> None:
        replica.write(off, data)
        ref[off : off + len(data)] = data
        history.append((off, len(data)))

    def zero(off: int, n: int) -> None:
        replica.write_zeroes(off, n)
        ref[off : off + n] = bytes(n)

    def rand_range(max_len: int, align: int) -> tuple[int, int]:
        n = rng.randrange(1, max_len // align + 1) * align
        n = min(n, size)
        off = rng.randrange(0, (size - n) // align + 1) * align
        return off, n

    put(0, rng.randbytes(3 * SECTOR))  # first sectors
    put(size - SECTOR, rng.randbytes(SECTOR))  # last sector
    for _ in range(ops):
        r = rng.random()
        if r < 0.25:
            off, n = rand_range(16 * GRAIN, GRAIN)
            put(off, rng.randbytes(n))
        elif r < 0.50:
            off, n = rand_range(300 * SECTOR, SECTOR)
            put(off, rng.randbytes(n))
        elif r < 0.60 and history:
            off, n = rng.choice(history)
            start = off + rng.randrange(0, n // SECTOR) * SECTOR
            length = min(off + n - start, rng.randrange(1, 200) * SECTOR)
            put(start, rng.randbytes(length))
        elif r < 0.67:
            off, n = rand_range(3 * GRAIN, SECTOR)
            put(off, bytes(n))
        elif r < 0.82:
            off, n = rand_range(2 * MiB, SECTOR if rng.random() < 0.5 else GRAIN)
            zero(off, n)
        elif r < 0.87:
            off, n = rand_range(4 * MiB, SECTOR)
            put(off, rng.randbytes(n))
        else:
            replica.sync()


def abandon(replica: Replica) -> None:
    """Drop a replica as a crashed process would: release the fd, skip every clean-up step."""
    os.close(replica._fd)  # type: ignore[attr-defined]
    replica._closed = True  # type: ignore[attr-defined]


class SimulatedCrash(Exception):
    pass


def crash_at(replica: Replica, stage: str) -> None:
    """Make the replica's next sync() stop at ``stage`` (the fault-injection seam in vmdk_sparse)."""

    def hook(s: str) -> None:
        if s == stage:
            raise SimulatedCrash(stage)

    replica._crash_point = hook  # type: ignore[attr-defined]


# Header fields the crash tests edit, by the test's own struct code (offsets from the VMDK spec).
_HDR = struct.Struct("<4sIIQQQQIQQQB")


def sparse_tables(path: Path) -> tuple[dict[str, int], list[int], list[int]]:
    """(header fields, primary table sectors, redundant table sectors) of a sparse VMDK."""
    data = path.read_bytes()
    (_, _, _, capacity, grain, _, _, gtes, rgd, gd, overhead, unclean) = _HDR.unpack_from(data)
    grains = (capacity + grain - 1) // grain
    gt_count = (grains + gtes - 1) // gtes
    primary = list(struct.unpack_from(f"<{gt_count}I", data, gd * SECTOR))
    redundant = list(struct.unpack_from(f"<{gt_count}I", data, rgd * SECTOR))
    fields = {"capacity": capacity, "grain": grain, "gtes": gtes, "overhead": overhead, "unclean": unclean}
    return fields, primary, redundant


def read_gte(path: Path, table_sector: int, slot: int) -> int:
    with open(path, "rb") as f:
        f.seek(table_sector * SECTOR + slot * 4)
        return struct.unpack("<I", f.read(4))[0]


def write_gte(path: Path, table_sector: int, slot: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(table_sector * SECTOR + slot * 4)
        f.write(struct.pack("<I", value))


def set_unclean(path: Path, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(bytes([value]))


# -- every file kind against qemu-img ----------------------------------------------------------------


@needs_qemu_img
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_random_pattern_matches_reference(tmp_path: Path, kind: str) -> None:
    path = replica_path(tmp_path, kind)
    rng = random.Random(f"pattern-{kind}")
    ref = bytearray(SIZE)
    replica = create_replica(kind, path, SIZE)
    assert (replica.format, replica.path, replica.size) == (kind, path, SIZE)
    random_pattern(replica, ref, rng)
    replica.sync()
    assert replica.read(0, SIZE) == ref
    replica.close()
    replica.close()  # idempotent

    ref_path = write_ref(tmp_path, ref)
    fmt = "raw" if kind == "raw" else "vmdk"
    qemu_compare(ref_path, path, fmt)
    info = qemu_info(path)
    assert info["format"] == fmt
    assert info["virtual-size"] == SIZE
    if fmt == "vmdk":
        assert info["format-specific"]["data"]["create-type"] == CREATE_TYPE[kind]
        qemu_check(path)

    reopened = open_replica(kind, path, SIZE)
    assert reopened.read(0, SIZE) == ref
    assert reopened.data_files() == replica.data_files()
    reopened.close()


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_scanning_reads_what_was_written(tmp_path: Path, kind: str) -> None:
    """A resync hashes the replica through `scanning` (O_DIRECT where the format allows): the same bytes
    as `read`, from several threads, a write not yet synced included, ranges not a multiple of 4 KiB."""
    replica = create_replica(kind, replica_path(tmp_path, kind), SIZE)
    ref = bytearray(SIZE)
    random_pattern(replica, ref, random.Random(f"scan-{kind}"))
    replica.sync()
    replica.write(SIZE - GRAIN, b"\x07" * SECTOR)
    ref[SIZE - GRAIN : SIZE - GRAIN + SECTOR] = b"\x07" * SECTOR
    with replica.scanning() as read:
        assert hashtree.leaf_hashes(read, SIZE, hashtree.LEAF, None, 3) == hashtree.leaf_hashes(
            lambda o, n: ref[o : o + n], SIZE
        )
        assert bytes(read(SIZE - 3 * SECTOR, 3 * SECTOR)) == ref[SIZE - 3 * SECTOR :]
        with pytest.raises(ReplicaError):
            read(SIZE - SECTOR, 2 * SECTOR)
    replica.close()


@needs_qemu_img
def test_sparse_is_structurally_sound_and_libvmdk_agrees(tmp_path: Path) -> None:
    pyvmdk = pytest.importorskip("pyvmdk", reason="libvmdk-python (pyvmdk) is not installed")
    path = tmp_path / "disk.vmdk"
    rng = random.Random("sparse-structure")
    ref = bytearray(SIZE)
    replica = create_replica("vmdk-sparse", path, SIZE)
    random_pattern(replica, ref, rng, ops=100)
    vmdkcheck.check(path, expect_clean=False)  # open for writing: flag set, tables consistent
    replica.close()

    report = vmdkcheck.check(path, expect_clean=True)
    assert report.capacity * SECTOR == SIZE and report.grain_size == 128
    assert report.file_sectors == report.overhead + len(report.allocated) * 128  # no holes, no orphans
    assert vmdkcheck.read_image(path) == ref

    handle = pyvmdk.handle()
    handle.open(str(path))
    handle.open_extent_data_files()
    try:
        assert handle.get_media_size() == SIZE
        for off in range(0, SIZE, 8 * MiB):
            n = min(8 * MiB, SIZE - off)
            assert handle.read_buffer_at_offset(n, off) == ref[off : off + n], f"libvmdk differs at {off}"
    finally:
        handle.close()


@needs_qemu_img
def test_sparse_capacity_not_a_whole_grain(tmp_path: Path) -> None:
    size = 3 * MiB + 7 * SECTOR
    path = tmp_path / "odd.vmdk"
    ref = bytearray(size)
    with create_replica("vmdk-sparse", path, size) as replica:
        rng = random.Random("odd")
        random_pattern(replica, ref, rng, ops=40)
        tail = rng.randbytes(7 * SECTOR)
        replica.write(size - len(tail), tail)
        ref[size - len(tail) :] = tail
    vmdkcheck.check(path, expect_clean=True)
    assert vmdkcheck.read_image(path) == ref
    qemu_check(path)
    qemu_compare(write_ref(tmp_path, ref), path, "vmdk")


def test_sparse_stays_thin(tmp_path: Path) -> None:
    """Zeros never allocate grains; write_zeroes on allocated grains zeroes them in place."""
    path = tmp_path / "thin.vmdk"
    with create_replica("vmdk-sparse", path, 8 * MiB) as replica:
        replica.write(0, bytes(2 * MiB))
        replica.write_zeroes(2 * MiB, 4 * MiB)
        replica.sync()
        assert vmdkcheck.check(path).allocated == {}
        replica.write(GRAIN, b"\xaa" * (3 * GRAIN))
        replica.write(7 * MiB + SECTOR, b"\x55" * SECTOR)  # partial grain: rest must read as zeros
        replica.sync()
        report = vmdkcheck.check(path)
        assert sorted(report.allocated) == [1, 2, 3, 7 * MiB // GRAIN]
        replica.write_zeroes(GRAIN, GRAIN + SECTOR)
        replica.write_zeroes(0, 8 * MiB - 4 * SECTOR)
        assert replica.read(0, 8 * MiB) == bytes(8 * MiB)
    after = vmdkcheck.check(path, expect_clean=True)
    assert after.allocated == report.allocated  # entries never go back to 0
    assert vmdkcheck.read_image(path) == bytes(8 * MiB)


def test_sparse_table_cache_trimming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a one-table cache, clean tables are dropped and reloaded; dirty ones must survive."""
    from standby.mastertarget.replicas import vmdk_sparse

    monkeypatch.setattr(vmdk_sparse, "MAX_CACHED_TABLES", 1)
    size = 4 * 32 * MiB + 3 * GRAIN  # five grain tables
    path = tmp_path / "cache.vmdk"
    ref = bytearray(size)
    with create_replica("vmdk-sparse", path, size) as replica:
        random_pattern(replica, ref, random.Random("cache"), ops=60)
        big = os.urandom(40 * MiB)  # one write spanning two table boundaries
        replica.write(30 * MiB, big)
        ref[30 * MiB : 70 * MiB] = big
        assert replica.read(0, size) == ref
    assert vmdkcheck.read_image(path) == ref


def test_thin_zeroes_small_ranges_without_punching(tmp_path: Path) -> None:
    """A thin file: small zero ranges over data are written (allocation kept), over a hole skipped
    (nothing allocated), large ones punched; all read back as zeros."""
    with create_replica("raw", tmp_path / "thin.raw", 16 * MiB) as replica:
        f = replica.data_files()[0]
        replica.write(0, os.urandom(4 * MiB))
        replica.sync()
        blocks = f.stat().st_blocks
        replica.write_zeroes(4096, 8192)  # small, over data
        replica.write_zeroes(8 * MiB, SMALL_ZEROS)  # small, over a hole
        replica.write_zeroes(8 * MiB - 4096, 8192)  # small, half data (none here) half hole
        replica.sync()
        assert f.stat().st_blocks == blocks
        assert replica.read(0, 16384)[4096:12288] == bytes(8192)
        assert replica.read(8 * MiB, SMALL_ZEROS) == bytes(SMALL_ZEROS)
        replica.write_zeroes(1 * MiB, 2 * MiB)  # large: punched
        replica.sync()
        assert f.stat().st_blocks * 512 <= blocks * 512 - 2 * MiB
        assert replica.read(1 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert replica.read(0, 4096) != bytes(4096) and replica.read(3 * MiB, 4096) != bytes(4096)


def test_flat_descriptors_and_allocation(tmp_path: Path) -> None:
    """vmfs/monolithicFlat descriptors say what ESXi and the hosted products expect; thin stays
    thin (holes punched), thick stays allocated."""
    size = 16 * MiB
    for kind, thin in (("vmdk", True), ("vmdk-thick", False), ("vmdk-monolithic-flat", True)):
        path = tmp_path / f"{kind}.vmdk"
        with create_replica(kind, path, size) as replica:
            flat = replica.data_files()[0]
            assert flat == tmp_path / f"{kind}-flat.vmdk"
            replica.write(0, os.urandom(8 * MiB))
            replica.sync()
            replica.write_zeroes(0, 8 * MiB)
            replica.sync()
            assert replica.read(0, 8 * MiB) == bytes(8 * MiB)
        text = path.read_text()
        assert text.startswith("# Disk DescriptorFile\nversion=1\n")
        assert f'createType="{CREATE_TYPE[kind]}"' in text
        assert "parentCID=ffffffff" in text
        assert 'ddb.adapterType = "lsilogic"' in text
        assert 'ddb.geometry.heads = "255"' in text and 'ddb.geometry.sectors = "63"' in text
        extent = f'RW {size // SECTOR} VMFS "{flat.name}"' if kind != "vmdk-monolithic-flat" else None
        extent = extent or f'RW {size // SECTOR} FLAT "{flat.name}" 0'
        assert extent in text.splitlines()
        assert ('ddb.thinProvisioned = "1"' in text) == (kind == "vmdk")
        allocated = flat.stat().st_blocks * 512
        assert flat.stat().st_size == size
        if thin:
            assert allocated < 1 * MiB, f"{kind}: {allocated} bytes still allocated after write_zeroes"
        else:
            assert allocated >= size, f"{kind}: thick extent only {allocated} bytes allocated"


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_create_refuses_existing(tmp_path: Path, kind: str) -> None:
    path = replica_path(tmp_path, kind)
    path.write_bytes(b"precious")
    with pytest.raises(ReplicaExists):
        create_replica(kind, path, MiB)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("kind", ["vmdk", "vmdk-thick", "vmdk-monolithic-flat"])
def test_create_refuses_existing_flat_extent(tmp_path: Path, kind: str) -> None:
    flat = tmp_path / "disk-flat.vmdk"
    flat.write_bytes(b"precious")
    with pytest.raises(ReplicaExists):
        create_replica(kind, tmp_path / "disk.vmdk", MiB)
    assert flat.read_bytes() == b"precious"
    assert not (tmp_path / "disk.vmdk").exists()


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_open_with_wrong_size(tmp_path: Path, kind: str) -> None:
    path = replica_path(tmp_path, kind)
    create_replica(kind, path, 2 * MiB).close()
    for wrong in (2 * MiB - SECTOR, 2 * MiB + GRAIN):
        with pytest.raises(ReplicaSizeMismatch):
            open_replica(kind, path, wrong)
    open_replica(kind, path, 2 * MiB).close()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ReplicaError, match="unknown replica format"):
        create_replica("qcow2", tmp_path / "x", MiB)
    for bad in (0, -SECTOR, MiB + 1):
        with pytest.raises(ReplicaError):
            create_replica("raw", tmp_path / "x.img", bad)
    with pytest.raises(ReplicaError, match="does not exist"):
        create_replica("raw", tmp_path / "no" / "x.img", MiB)
    with pytest.raises(ReplicaError, match="not a block device"):
        create_replica("device", write_ref(tmp_path, b"x" * SECTOR), SECTOR)
    with pytest.raises(ReplicaError, match="does not exist"):
        open_replica("device", tmp_path / "nodev", MiB)
    with pytest.raises(ReplicaError, match="monolithicFlat"):
        create_replica("vmdk-monolithic-flat", tmp_path / "m.vmdk", MiB).close()
        open_replica("vmdk", tmp_path / "m.vmdk", MiB)
    with pytest.raises(ReplicaError, match="monolithicSparse"):
        create_replica("vmdk-sparse", tmp_path / "s.vmdk", MiB).close()
        open_replica("vmdk", tmp_path / "s.vmdk", MiB)

    replica = create_replica("raw", tmp_path / "r.img", MiB)
    with pytest.raises(ReplicaError):
        replica.write(100, b"x" * SECTOR)  # not 512-aligned
    with pytest.raises(ReplicaError):
        replica.write(0, b"x" * 100)
    with pytest.raises(ReplicaError):
        replica.write(MiB, b"x" * SECTOR)  # past the end
    with pytest.raises(ReplicaError):
        replica.write_zeroes(MiB - SECTOR, 2 * SECTOR)
    replica.close()
    with pytest.raises(ReplicaError, match="closed"):
        replica.write(0, b"x" * SECTOR)


def test_sparse_size_limit(tmp_path: Path) -> None:
    """2 TiB is the format's limit (32-bit sector numbers): accepted exactly, refused beyond."""
    with pytest.raises(ReplicaError, match="2 TiB"):
        create_replica("vmdk-sparse", tmp_path / "big.vmdk", 2 * 1024**4 + SECTOR)
    assert not (tmp_path / "big.vmdk").exists()
    size = 2 * 1024**4
    path = tmp_path / "max.vmdk"
    with create_replica("vmdk-sparse", path, size) as replica:
        replica.write(size - GRAIN, b"\x42" * GRAIN)
        replica.sync()
        assert replica.read(size - GRAIN, GRAIN) == b"\x42" * GRAIN
    with open_replica("vmdk-sparse", path, size) as replica:
        assert replica.read(size - 2 * GRAIN, 2 * GRAIN) == bytes(GRAIN) + b"\x42" * GRAIN
    if shutil.which("qemu-img"):
        assert qemu_info(path)["virtual-size"] == size


# -- sparse crash recovery -------------------------------------------------------------------------


def _crash_fixture(tmp_path: Path, stage: str) -> tuple[Path, bytes, bytes, bytes]:
    """An image with synced data, then a batch whose sync() stopped at ``stage``.

    The batch overwrites one allocated grain in place and fills three unallocated grains (two of
    them partially). Returns (path, before, after, without_tables): the contents before the batch,
    after it, and with only the in-place write (what remains if the new entries are lost).
    """
    path = tmp_path / "crash.vmdk"
    size = 8 * MiB
    rng = random.Random(stage)
    before = bytearray(size)
    replica = create_replica("vmdk-sparse", path, size)
    random_pattern(replica, before, rng, ops=12)
    replica.sync()
    allocated = vmdkcheck.check(path).allocated
    free = [g for g in range(size // GRAIN) if g not in allocated]
    after = bytearray(before)
    in_place = rng.choice(sorted(allocated)) * GRAIN
    data = rng.randbytes(GRAIN)
    replica.write(in_place, data)
    after[in_place : in_place + GRAIN] = data
    without_tables = bytes(after)
    fresh = [(0, GRAIN), (3 * SECTOR, 5 * SECTOR), (SECTOR, GRAIN - SECTOR)]
    for g, (start, n) in zip(rng.sample(free, 3), fresh, strict=True):
        off = g * GRAIN + start
        data = rng.randbytes(n)
        replica.write(off, data)
        after[off : off + n] = data
    crash_at(replica, stage)
    with pytest.raises(SimulatedCrash):
        replica.sync()
    abandon(replica)
    return path, bytes(before), bytes(after), without_tables


def test_crash_after_grains_synced_drops_orphans(tmp_path: Path) -> None:
    path, before, after, without_tables = _crash_fixture(tmp_path, "grains-synced")
    size_at_crash = path.stat().st_size
    assert vmdkcheck.check(path, expect_clean=False)  # tables not yet updated: still consistent
    with open_replica("vmdk-sparse", path, len(before)) as replica:
        assert replica.recovered  # type: ignore[attr-defined]
        assert replica.read(0, len(before)) == without_tables  # new grains lost whole, never torn
    report = vmdkcheck.check(path, expect_clean=True)
    assert path.stat().st_size == size_at_crash - 3 * GRAIN  # the three orphan grains truncated away
    assert report.file_sectors == report.overhead + len(report.allocated) * 128


@pytest.mark.parametrize("swap", [False, True], ids=["primary-only", "redundant-only"])
def test_crash_with_one_table_copy_updated(tmp_path: Path, swap: bool) -> None:
    path, before, new, _ = _crash_fixture(tmp_path, "primary-written")
    fields, primary, redundant = sparse_tables(path)
    with pytest.raises(vmdkcheck.VmdkCheckError, match="differ"):
        vmdkcheck.check(path)
    if swap:  # the other order a power cut may leave: redundant copy on disk, primary not
        for p, r in zip(primary, redundant, strict=True):
            for slot in range(fields["gtes"]):
                a, b = read_gte(path, p, slot), read_gte(path, r, slot)
                if a != b:
                    write_gte(path, p, slot, b)
                    write_gte(path, r, slot, a)
    with open_replica("vmdk-sparse", path, len(before)) as replica:
        assert replica.read(0, len(before)) == new
        # keep going after recovery: new grains must land after the recovered ones
        replica.write(60 * GRAIN, b"\x77" * GRAIN)
    expected = bytearray(new)
    expected[60 * GRAIN : 61 * GRAIN] = b"\x77" * GRAIN
    vmdkcheck.check(path, expect_clean=True)
    assert vmdkcheck.read_image(path) == expected
    if shutil.which("qemu-img"):
        qemu_check(path)
        qemu_compare(write_ref(tmp_path, expected), path, "vmdk")


def test_crash_after_both_copies_written_before_fsync(tmp_path: Path) -> None:
    path, before, new, _ = _crash_fixture(tmp_path, "redundant-written")
    with open_replica("vmdk-sparse", path, len(before)) as replica:
        assert replica.read(0, len(before)) == new
    vmdkcheck.check(path, expect_clean=True)


def test_unclean_flag_alone_recovers_to_synced_state(tmp_path: Path) -> None:
    path = tmp_path / "u.vmdk"
    data = os.urandom(3 * GRAIN)
    with create_replica("vmdk-sparse", path, 4 * MiB) as replica:
        replica.write(GRAIN, data)
    assert vmdkcheck.check(path, expect_clean=True)
    set_unclean(path, 1)
    replica = open_replica("vmdk-sparse", path, 4 * MiB)
    assert replica.recovered  # type: ignore[attr-defined]
    assert replica.read(GRAIN, 3 * GRAIN) == data
    vmdkcheck.check(path, expect_clean=False)  # flag stays set until close
    replica.close()
    vmdkcheck.check(path, expect_clean=True)


@pytest.mark.parametrize("damage", ["conflict", "out-of-range", "unaligned", "past-eof", "duplicate"])
def test_recovery_refuses_damaged_tables(tmp_path: Path, damage: str) -> None:
    """Recovery merges what a crash can produce and refuses what it cannot, rather than guess."""
    path = tmp_path / "d.vmdk"
    with create_replica("vmdk-sparse", path, 4 * MiB) as replica:
        replica.write(0, os.urandom(2 * GRAIN))
    fields, primary, redundant = sparse_tables(path)
    e0 = read_gte(path, primary[0], 0)
    file_sectors = path.stat().st_size // SECTOR
    if damage == "conflict":
        write_gte(path, redundant[0], 0, e0 + 128 * 5)
    else:
        value = {
            "out-of-range": 3,  # inside the header and descriptor
            "unaligned": e0 + 1,
            "past-eof": file_sectors,
            "duplicate": e0,
        }[damage]
        write_gte(path, primary[0], 7, value)
        write_gte(path, redundant[0], 7, value)
    set_unclean(path, 1)
    with pytest.raises(ReplicaError, match="damaged|beyond"):
        open_replica("vmdk-sparse", path, 4 * MiB)
    with pytest.raises(vmdkcheck.VmdkCheckError):
        vmdkcheck.check(path)


def kill_batch(seed: int, seq: int, size: int) -> list[tuple[int, int, bytes | None]]:
    """Batch ``seq`` of writer ``seed``: (offset, length, data or None for write_zeroes).

    Ops in one batch never overlap, so after a crash each sector is either before or after the batch.
    Shared with the child process by source (inspect.getsource), so both sides agree exactly.
    """
    import random as _random

    grain = 65536
    rng = _random.Random(seed * 1_000_003 + seq)
    slots = size // (2 * grain)
    ops = []
    for slot in rng.sample(range(slots), rng.randint(1, 6)):
        base = slot * 2 * grain
        start = rng.choice([0, grain, rng.randrange(0, 2 * grain // 512) * 512])
        length = min(2 * grain - start, rng.choice([grain, 2 * grain, rng.randrange(1, 200) * 512]))
        data = None if rng.random() < 0.15 else rng.randbytes(length)
        ops.append((base + start, length, data))
    return ops


CHILD = """
import sys
from pathlib import Path
from standby.mastertarget.replicas import open_replica
{kill_batch}
path, size, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
replica = open_replica("vmdk-sparse", path, size)
print("ready", flush=True)
seq = 0
while True:
    seq += 1
    for off, length, data in kill_batch(seed, seq, size):
        if data is None:
            replica.write_zeroes(off, length)
        else:
            replica.write(off, data)
    replica.sync()
    print(seq, flush=True)
"""


# How long the writer may stay silent before the test gives up on it (a hung writer must fail the
# test, not hang the run). Generous: a loaded machine can take seconds to start Python or to fsync.
WRITER_SILENCE_LIMIT = 120.0


def expect_line(proc: subprocess.Popen[str], want: bytes) -> bytes:
    """Read one line of the writer's stdout and check it is ``want``; kill the writer otherwise.

    Byte by byte from the descriptor: a buffered readline could swallow the next progress lines, which
    communicate() (reading the descriptor directly) would then never see.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + WRITER_SILENCE_LIMIT
    line = b""
    while not line.endswith(b"\n"):
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    if line != want:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"writer said {line!r}, expected {want!r} (within {WRITER_SILENCE_LIMIT:.0f} s): {err}")
    return line


def _apply(ref: bytearray, ops: list[tuple[int, int, bytes | None]]) -> None:
    for off, length, data in ops:
        ref[off : off + length] = data if data is not None else bytes(length)


@needs_qemu_img
def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    """A real writer process SIGKILLed 20 times: every recovery is structurally sound, qemu-img
    accepts the image, and everything synced before the last completed sync() is intact."""
    size = 4 * MiB + 3 * GRAIN
    path = tmp_path / "kill.vmdk"
    create_replica("vmdk-sparse", path, size).close()
    code = CHILD.format(kill_batch=textwrap.dedent(inspect.getsource(kill_batch)))
    rng = random.Random("sigkill")
    ref = bytearray(size)
    completed_total = 0
    for seed in range(1, 21):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(path), str(size), str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        early = seed % 7 == 0  # sometimes kill during start-up or recovery, before "ready"
        progress = b""
        if not early:
            expect_line(proc, b"ready\n")
            # Then wait for the writer to complete 0 to 3 batches (seed % 4, at least 25 in all) before
            # the random sleep. The sleep alone is wall-clock time: on a loaded machine (busy CPUs, an
            # fsync taking tens of milliseconds) it could end before the writer completed anything, and
            # the test would fail below for proving too little rather than for a wrong image.
            for n in range(1, seed % 4 + 1):
                progress += expect_line(proc, f"{n}\n".encode())
        time.sleep(rng.uniform(0.0, 0.25 if not early else 0.4))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"writer died on its own: {err}"
        done = [int(x) for x in (progress.decode() + out).split() if x.isdigit()]
        last = done[-1] if done else 0
        assert done == list(range(1, last + 1))
        completed_total += last

        for seq in range(1, last + 1):
            _apply(ref, kill_batch(seed, seq, size))
        in_flight = kill_batch(seed, last + 1, size)
        after = bytearray(ref)
        _apply(after, in_flight)

        with open_replica("vmdk-sparse", path, size) as replica:
            actual = replica.read(0, size)
        touched = bytearray(size)
        for off, length, _ in in_flight:
            touched[off : off + length] = b"\x01" * length
        for off in range(0, size, GRAIN):
            got, want = actual[off : off + GRAIN], ref[off : off + GRAIN]
            if got == want:
                continue
            assert touched[off : off + GRAIN].count(1), f"seed {seed}: synced data lost at {off}"
            for s in range(off, off + GRAIN, SECTOR):  # in-flight: each sector old or new
                assert actual[s : s + SECTOR] in (ref[s : s + SECTOR], after[s : s + SECTOR]), (
                    f"seed {seed}: sector {s // SECTOR} is neither before nor after batch {last + 1}"
                )
        ref[:] = actual  # the next writer continues from what survived
        report = vmdkcheck.check(path, expect_clean=True)
        assert report.file_sectors == report.overhead + len(report.allocated) * 128
        qemu_check(path)
    # At least 25 by the waits above; kept so a change to the harness cannot quietly make it prove little.
    assert completed_total > 20, "the writer hardly ever completed a batch; the test proves little"
    qemu_compare(write_ref(tmp_path, ref), path, "vmdk")


# -- block device ----------------------------------------------------------------------------------


@needs_qemu_img
def test_device_replica(tmp_path: Path, make_loop: Callable[..., str]) -> None:
    size = 32 * MiB + 3 * GRAIN
    dev = make_loop(size, "target")
    with pytest.raises(ReplicaSizeMismatch):
        create_replica("device", Path(dev), size + SECTOR)
    ref = bytearray(size)
    replica = create_replica("device", Path(dev), size)
    assert replica.data_files() == [Path(dev)]
    random_pattern(replica, ref, random.Random("device"), ops=80)
    replica.sync()
    assert replica.read(0, size) == ref
    with replica.scanning() as read:
        assert bytes(read(0, size)) == ref
    replica.close()
    qemu_compare(write_ref(tmp_path, ref), dev, "raw")
    with open_replica("device", Path(dev), size) as again:
        assert again.read(size - MiB, MiB) == ref[size - MiB :]
