"""The campaign's judges must catch what they are there to catch: these feed them replicas with a lost
write, a write from after the point, a write in flight, a damaged cache record — no daemons, no root."""

from __future__ import annotations

import os
import random
import time
from array import array
from pathlib import Path

import pytest

from standby.proto.frames import encode_frame, scan_records

from .campaign import Settings
from .judge import BLOCK, MARGIN, BurstModel, ClippedImage, compare_region, diff_devices
from .report import log_excerpt
from .rig import Disk, Rig

FIRST = 16  # the region starts at block 16 of the "disk"
BLOCKS = 64


def model_and_disk() -> tuple[BurstModel, bytearray]:
    rng = random.Random(1)
    disk = bytearray(rng.randbytes((FIRST + BLOCKS) * BLOCK))
    from .judge import block_hashes

    return BurstModel(FIRST, block_hashes(disk[FIRST * BLOCK :])), disk


def write(model: BurstModel, disk: bytearray, first: int, count: int, seed: int, apply: bool = True) -> float:
    """One burst write of `count` blocks at block `first`; returns its completion time."""
    from .judge import block_hashes

    data = random.Random(seed).randbytes(count * BLOCK)
    n, submit = model.begin(first, count)
    if apply:
        disk[first * BLOCK : (first + count) * BLOCK] = data
    model.end(n, first, block_hashes(data), submit)
    time.sleep(2 * MARGIN)  # writes are apart in time, as real ones are (each one is synced)
    return model.pending[-1].complete


def reader(img: bytes | bytearray):  # noqa: ANN201 - a read(offset, length) callable
    return lambda off, n: bytes(img[off : off + n])


def test_replica_at_the_instant_passes() -> None:
    model, disk = model_and_disk()
    write(model, disk, 20, 4, 1)
    write(model, disk, 30, 8, 2)
    t = time.time()
    replica = bytes(disk)
    time.sleep(2 * MARGIN)
    write(model, disk, 20, 2, 3)  # after the point: not expected
    diff = compare_region(reader(replica), model.expected_at(t))  # type: ignore[arg-type]
    assert diff.blocks == 0 and diff.compared == BLOCKS


def test_a_lost_completed_write_is_found_and_named() -> None:
    model, disk = model_and_disk()
    replica = bytearray(disk)  # the replica never got the next write
    done = write(model, disk, 40, 5, 7)
    t = done + 0.5
    diff = compare_region(reader(replica), model.expected_at(t))  # type: ignore[arg-type]
    assert diff.blocks == 5 and diff.lost_writes == {1} and diff.future == 0
    assert "write #1, completed 0.5" in diff.ranges[0] and "blocks 40..44" in diff.ranges[0]


def test_a_write_after_the_instant_is_future() -> None:
    model, disk = model_and_disk()
    write(model, disk, 20, 1, 1)
    t = time.time()
    time.sleep(2 * MARGIN)
    write(model, disk, 50, 3, 2)
    diff = compare_region(reader(disk), model.expected_at(t))  # type: ignore[arg-type]
    assert diff.blocks == 3 and diff.future == 3 and not diff.lost_writes


def test_the_write_in_flight_is_not_judged() -> None:
    model, disk = model_and_disk()
    n, submit = model.begin(24, 4)  # in flight at t: either side is right
    t = time.time()
    half = bytearray(disk)
    half[24 * BLOCK : 26 * BLOCK] = os.urandom(2 * BLOCK)
    exp = model.expected_at(t)
    assert exp is not None
    diff = compare_region(reader(half), exp)
    assert diff.blocks == 0 and diff.unknown == 4 and diff.compared == BLOCKS - 4
    model.end(n, 24, array("Q", [0] * 4), submit)


def test_instants_only_move_forward() -> None:
    model, disk = model_and_disk()
    write(model, disk, 20, 1, 1)
    t = time.time()
    assert model.expected_at(t) is not None
    assert model.expected_at(t - 1) is None


def test_clipped_image_keeps_only_the_region() -> None:
    img = ClippedImage(b"a" * 100, 10)
    img[5:20] = b"b" * 15
    img[50:60] = b"c" * 10
    assert bytes(img.buf) == b"aaaaabbbbb"


def test_diff_devices_counts_blocks(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    data = os.urandom(64 * BLOCK)
    a.write_bytes(data)
    other = bytearray(data)
    other[3 * BLOCK] ^= 1
    other[10 * BLOCK : 12 * BLOCK] = bytes(2 * BLOCK)
    b.write_bytes(other)
    d = diff_devices(a, b, len(data))
    assert d.blocks == 3 and d.ranges == ["blocks 3..3", "blocks 10..11"]


def test_damaged_last_cache_record_is_detected_by_the_scan(tmp_path: Path) -> None:
    rig = Rig(tmp_path, lambda *a: "", random.Random(3))
    rig.cache_mnt = tmp_path
    rig.disks = {"src": Disk("src", "disk0", "", 0, disk_id=7)}
    seg = tmp_path / "cache" / "disk-7" / "seg-00000000000000000001.log"
    seg.parent.mkdir(parents=True)
    seg.write_bytes(b"".join(encode_frame(1, 7, n, os.urandom(1000)) for n in (1, 2, 3)))
    info = rig.damage_last_cache_record("src")
    assert info is not None and info["sequence"] == 3 and info["tail_problem_before"] is None
    records, _, problem = scan_records(seg.read_bytes())
    assert [r.header.sequence for r in records] == [1, 2] and problem and "checksum" in problem


def test_settings_from_env() -> None:
    s = Settings.from_env({"STANDBY_FAULT_KINDS": "kill-ps, reset-mt", "STANDBY_FAULT_SEED": "5",
                           "STANDBY_FAULT_RETENTION_MIB": "64"})
    assert s.kinds == ["kill-ps", "reset-mt"] and s.seed == 5 and s.volumes == {"retention": 64 << 20}
    with pytest.raises(ValueError, match="unknown fault kind"):
        Settings.from_env({"STANDBY_FAULT_KINDS": "kill-everything"})


def test_log_excerpt_collapses_repeats() -> None:
    text = "".join(f"2026-01-01 00:00:0{i},000 ERROR standby.mt: sequence 5 rejected\n" for i in range(3))
    text += "2026-01-01 00:00:09,000 INFO standby.mt: fine\n"
    assert log_excerpt(text) == "ERROR standby.mt: sequence 5 rejected (x3)"
