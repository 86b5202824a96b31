"""The full-scan tracker on an image file: reports blocks that differ from what was shipped, and only those."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from standby.agent.tracker.base import TrackingLost
from standby.agent.tracker.fullscan import FullScanTracker
from standby.proto import hashtree

B = hashtree.LEAF
PAUSE = 0.05
TIMEOUT = 5.0
Factory = Callable[[Path, int], FullScanTracker]


def make_image(path: Path, size: int) -> bytes:
    data = random.Random(size).randbytes(size)
    path.write_bytes(data)
    return data


def write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def current_leaves(path: Path, size: int) -> bytearray:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hashtree.leaf_hashes(lambda pos, n: os.pread(fd, n, pos), size)
    finally:
        os.close(fd)


def wait_until(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_scans(t: FullScanTracker, n: int = 2) -> None:
    """Wait until `n` more scans completed: the last of them started after this call."""
    target = int(t.stats["scans"]) + n
    wait_until(lambda: int(t.stats["scans"]) >= target, f"{n} scans")


def reported(t: FullScanTracker, scans: int = 2) -> set[tuple[int, int]]:
    wait_scans(t, scans)
    return {(a, b) for _, a, b in t.poll()}


def scan_threads(path: Path) -> list[threading.Thread]:
    return [th for th in threading.enumerate() if th.name == f"full-scan {path}" and th.is_alive()]


@pytest.fixture
def tracker_factory(tmp_path: Path) -> Iterator[Factory]:
    made: list[FullScanTracker] = []

    def factory(path: Path, size: int) -> FullScanTracker:
        t = FullScanTracker(str(path), size, pause=PAUSE)
        made.append(t)
        return t

    yield factory
    for t in made:
        t.close()


def blk(i: int, size: int) -> tuple[int, int]:
    return i * B, min((i + 1) * B, size)


SIZE = 40 * B + 1000  # the last block is short


def test_reports_written_blocks_only(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    data = make_image(img, SIZE)
    t = tracker_factory(img, SIZE)
    t.known(current_leaves(img, SIZE))
    t.start()
    assert reported(t) == set()  # nothing written: nothing reported
    before = time.monotonic_ns()
    write(img, 3 * B, b"\xaa" * B)  # a whole block
    write(img, 10 * B + 4000, b"\x55" * 200)  # crossing into block 11
    write(img, SIZE - 1, bytes([data[-1] ^ 0xFF]))  # the short last block
    wait_scans(t)
    events = t.poll()
    assert {(a, b) for _, a, b in events} == {blk(3, SIZE), blk(10, SIZE), blk(11, SIZE), (40 * B, SIZE)}
    after = time.monotonic_ns()
    assert all(before <= ts <= after for ts, _, _ in events)
    assert t.now_ns() >= after
    # not shipped: still differs from what the replica holds, so reported again on later scans
    assert reported(t) == {blk(3, SIZE), blk(10, SIZE), blk(11, SIZE), (40 * B, SIZE)}
    assert int(t.stats["bytes_read"]) >= 2 * SIZE


def test_write_of_same_contents_is_not_reported(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    data = make_image(img, SIZE)
    t = tracker_factory(img, SIZE)
    t.known(current_leaves(img, SIZE))
    t.start()
    write(img, 5 * B, data[5 * B : 6 * B])
    assert reported(t) == set()


def test_crossing_read_chunk(tmp_path: Path, tracker_factory: Factory) -> None:
    size = hashtree.READ_CHUNK + 5 * B + 123
    img = tmp_path / "disk.img"
    data = make_image(img, size)
    t = tracker_factory(img, size)
    t.known(current_leaves(img, size))
    t.start()
    edge = hashtree.READ_CHUNK // B
    # the last block of chunk 0 and the first of chunk 1
    at = hashtree.READ_CHUNK - 2
    write(img, at, bytes(x ^ 0xFF for x in data[at : at + 4]))
    write(img, size - 1, bytes([data[-1] ^ 0xFF]))
    assert reported(t) == {blk(edge - 1, size), blk(edge, size), (size - 123, size)}


def test_unknown_blocks_are_not_reported(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    fresh = tracker_factory(img, SIZE)  # never told what the replica holds: all unknown
    fresh.start()
    partial = tracker_factory(img, SIZE)
    leaves = current_leaves(img, SIZE)
    leaves[7 * hashtree.HASH : 8 * hashtree.HASH] = bytes(hashtree.HASH)  # block 7 unknown
    partial.known(leaves)
    partial.start()
    write(img, 7 * B, b"\x01" * B)
    write(img, 8 * B, b"\x01" * B)
    assert reported(fresh) == set()
    assert reported(partial) == {blk(8, SIZE)}


def test_shipped_updates_table_and_aba_is_reported(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    data = make_image(img, SIZE)
    x = data[5 * B : 6 * B]
    y = b"\x77" * B
    t = tracker_factory(img, SIZE)
    t.known(current_leaves(img, SIZE))
    t.start()

    write(img, 5 * B, y)  # X -> Y
    assert reported(t) == {blk(5, SIZE)}
    t.shipped(5 * B, y)  # Y shipped: the replica holds Y now
    reported(t)  # drain what a scan in flight may have found before shipped()
    assert reported(t) == set()

    write(img, 5 * B, x)  # Y -> X: back to what the *scan* first saw, but not what was shipped
    assert reported(t) == {blk(5, SIZE)}
    t.shipped(5 * B, x)
    reported(t)
    assert reported(t) == set()


def test_shipped_several_blocks_and_short_end(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    t = tracker_factory(img, SIZE)
    t.known(current_leaves(img, SIZE))
    t.start()
    new = os.urandom(SIZE - 38 * B)
    write(img, 38 * B, new)  # blocks 38, 39 and the short 40
    assert reported(t) == {blk(38, SIZE), blk(39, SIZE), (40 * B, SIZE)}
    t.shipped(38 * B, new)
    reported(t)
    assert reported(t) == set()


def test_shipped_at_unaligned_offset_is_ignored(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    t = tracker_factory(img, SIZE)
    t.known(current_leaves(img, SIZE))
    t.start()
    write(img, 6 * B, b"\x11" * B)
    t.shipped(6 * B + 512, b"\x11" * B)
    reported(t)
    assert reported(t) == {blk(6, SIZE)}


def test_shipped_before_start_fills_unknown_table(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    data = make_image(img, SIZE)
    t = tracker_factory(img, SIZE)
    t.shipped(0, data[: 4 * B])  # an initial copy shipped blocks 0-3 only
    t.start()
    for i in range(8):
        write(img, i * B, b"\x22" * B)
    assert reported(t) == {blk(i, SIZE) for i in range(4)}


def test_truncated_file_is_tracking_lost(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    t = tracker_factory(img, SIZE)
    t.known(current_leaves(img, SIZE))
    t.start()
    wait_scans(t, 1)
    os.truncate(img, SIZE - 1)
    wait_until(lambda: not scan_threads(img), "the scan thread to stop")
    with pytest.raises(TrackingLost, match="full scan of .*disk.img failed"):
        t.poll()
    with pytest.raises(TrackingLost):  # and it stays lost
        t.poll()


def test_removed_file_is_tracking_lost(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    t = tracker_factory(img, SIZE)
    t.start()
    wait_scans(t, 1)
    img.unlink()
    wait_until(lambda: not scan_threads(img), "the scan thread to stop")
    with pytest.raises(TrackingLost, match="disk.img"):
        t.poll()


def test_missing_file_at_start_is_tracking_lost(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "absent.img"
    t = tracker_factory(img, SIZE)
    t.start()
    wait_until(lambda: not scan_threads(img), "the scan thread to stop")
    with pytest.raises(TrackingLost):
        t.poll()


def test_close_stops_the_thread(tmp_path: Path, tracker_factory: Factory) -> None:
    img = tmp_path / "disk.img"
    make_image(img, SIZE)
    t = tracker_factory(img, SIZE)
    t.start()
    assert len(scan_threads(img)) == 1
    wait_scans(t, 1)
    t.close()
    assert scan_threads(img) == []
    scans = int(t.stats["scans"])
    time.sleep(3 * PAUSE)
    assert int(t.stats["scans"]) == scans
    t.close()  # twice is fine


def test_proves_no_order(tmp_path: Path) -> None:
    assert FullScanTracker.proves_order is False
    assert FullScanTracker(str(tmp_path / "x"), SIZE).proves_order is False
