"""The clean-stop record: a restart keeps the dirty map only if the same boot's write counters did not move."""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from standby.agent import cleanstop

from ..conftest import needs_loop

NAME = "disk0"
SIZE = 10 * 4096 + 512
EXTENTS = [(0, 4096), (8192, 12288), (40960, 512)]


@pytest.fixture
def image(tmp_path: Path) -> str:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    return str(img)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


class FakeKernel:
    """Stands in for the boot id and the block device's write counters."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.boot = "11111111-2222-3333-4444-555555555555"
        self.counters: list[int] | None = [10, 800, 2, 64]
        self.asked: list[str] = []
        monkeypatch.setattr(cleanstop, "boot_id", lambda: self.boot)
        monkeypatch.setattr(cleanstop, "write_counters", self._counters)

    def _counters(self, path: str) -> list[int] | None:
        self.asked.append(path)
        return None if self.counters is None else list(self.counters)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    return FakeKernel(monkeypatch)


def records(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.clean-stop.json"))


def save_now(state: Path, image: str, extents: list[tuple[int, int]] = EXTENTS) -> None:
    counters = cleanstop.write_counters(image)
    assert counters is not None
    cleanstop.save(state, NAME, image, SIZE, counters, extents)


# -- without a fake kernel ---------------------------------------------------------------------------------


def test_no_record(state: Path, image: str) -> None:
    extents, reason = cleanstop.load(state, NAME, image, SIZE)
    assert extents == [] and "did not stop cleanly" in reason


def test_image_file_has_no_counters(image: str) -> None:
    assert cleanstop.write_counters(image) is None


def test_image_file_record_never_proves_anything(state: Path, image: str) -> None:
    # even a record with plausible counters cannot be trusted for an image file: the kernel counts nothing
    cleanstop.save(state, NAME, image, SIZE, [0, 0, 0, 0], EXTENTS)
    extents, reason = cleanstop.load(state, NAME, image, SIZE)
    assert extents == [] and "written" in reason
    assert records(state) == []


def test_real_boot_id() -> None:
    if not cleanstop.BOOT_ID.exists():
        pytest.skip("no /proc boot id")
    b = cleanstop.boot_id()
    assert b == b.strip() and len(b) == 36 and b == cleanstop.boot_id()


# -- with a fake kernel ------------------------------------------------------------------------------------


def test_same_boot_same_counters_keeps_the_map_once(state: Path, image: str, kernel: FakeKernel) -> None:
    save_now(state, image)
    [rec] = records(state)
    assert stat.S_IMODE(rec.stat().st_mode) == 0o600
    extents, reason = cleanstop.load(state, NAME, image, SIZE)
    assert (extents, reason) == (EXTENTS, "")
    assert all(isinstance(e, tuple) for e in extents)
    assert records(state) == []  # used at most once
    extents, reason = cleanstop.load(state, NAME, image, SIZE)
    assert extents == [] and "did not stop cleanly" in reason


def test_empty_map_is_carried_over_too(state: Path, image: str, kernel: FakeKernel) -> None:
    save_now(state, image, [])
    assert cleanstop.load(state, NAME, image, SIZE) == ([], "")


def test_records_are_per_disk(state: Path, image: str, kernel: FakeKernel) -> None:
    save_now(state, image)
    extents, reason = cleanstop.load(state, "other", image, SIZE)
    assert extents == [] and "did not stop cleanly" in reason
    assert len(records(state)) == 1  # the other disk's load did not consume ours
    assert cleanstop.load(state, NAME, image, SIZE) == (EXTENTS, "")


def test_other_boot(state: Path, image: str, kernel: FakeKernel) -> None:
    save_now(state, image)
    kernel.boot = "99999999-2222-3333-4444-555555555555"
    extents, reason = cleanstop.load(state, NAME, image, SIZE)
    assert extents == [] and "restart" in reason
    assert records(state) == []


@pytest.mark.parametrize("field", range(4))
def test_moved_counters(state: Path, image: str, kernel: FakeKernel, field: int) -> None:
    save_now(state, image)
    assert kernel.counters is not None
    kernel.counters[field] += 1
    extents, reason = cleanstop.load(state, NAME, image, SIZE)
    assert extents == [] and "written" in reason
    assert records(state) == []


def test_counters_gone(state: Path, image: str, kernel: FakeKernel) -> None:
    save_now(state, image)
    kernel.counters = None  # e.g. the path is no longer a block device
    extents, reason = cleanstop.load(state, NAME, image, SIZE)
    assert extents == [] and reason


def test_size_changed(state: Path, image: str, kernel: FakeKernel) -> None:
    save_now(state, image)
    extents, reason = cleanstop.load(state, NAME, image, SIZE + 4096)
    assert extents == [] and "changed" in reason and str(SIZE + 4096) in reason
    assert records(state) == []


def test_path_changed(state: Path, image: str, kernel: FakeKernel, tmp_path: Path) -> None:
    save_now(state, image)
    extents, reason = cleanstop.load(state, NAME, str(tmp_path / "other.img"), SIZE)
    assert extents == [] and "changed" in reason


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        "[]",
        "null",
        '"text"',
        '{"path": "%s", "size": %d}',
        '{"path": "%s", "size": %d, "boot_id": "11111111-2222-3333-4444-555555555555", "counters": [10, 800, 2, 64],'
        ' "extents": [[0]]}',
        '{"path": "%s", "size": %d, "boot_id": "11111111-2222-3333-4444-555555555555", "counters": [10, 800, 2, 64],'
        ' "extents": [["a", 1]]}',
    ],
)
def test_record_of_wrong_shape(state: Path, image: str, kernel: FakeKernel, text: str) -> None:
    save_now(state, image)
    [rec] = records(state)
    rec.write_text(text % (image, SIZE) if "%s" in text else text)
    extents, reason = cleanstop.load(state, NAME, image, SIZE)
    assert extents == [] and reason
    assert records(state) == []


@pytest.mark.parametrize("content", [b"", b'{"path": "/dev/x", "si', b"\xff\xfe garbage"])
def test_unreadable_json(state: Path, image: str, kernel: FakeKernel, content: bytes) -> None:
    save_now(state, image)
    [rec] = records(state)
    rec.write_bytes(content)
    extents, reason = cleanstop.load(state, NAME, image, SIZE)
    assert extents == [] and "unreadable" in reason
    assert records(state) == []


# -- real counters of a loop device ------------------------------------------------------------------------


def _direct(dev: str, write: bool) -> None:
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    fd = os.open(dev, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        if write:
            buf.write(b"\x5a" * 4096)
            assert os.pwritev(fd, [buf], 8192) == 4096
        else:
            assert os.preadv(fd, [buf], 8192) == 4096
    finally:
        os.close(fd)
        buf.close()


@needs_loop
def test_loop_device_counters(make_loop: Callable[..., str]) -> None:
    dev = make_loop(1 << 20)
    before = cleanstop.write_counters(dev)
    assert before is not None and len(before) == 4
    _direct(dev, write=False)
    assert cleanstop.write_counters(dev) == before
    _direct(dev, write=True)
    after = cleanstop.write_counters(dev)
    assert after is not None and after != before
    assert after[0] > before[0]  # write I/Os
    assert after[1] >= before[1] + 8  # write sectors (4 KiB)


@needs_loop
def test_loop_device_clean_stop_cycle(make_loop: Callable[..., str], tmp_path: Path) -> None:
    dev = make_loop(1 << 20)
    counters = cleanstop.write_counters(dev)
    assert counters is not None
    cleanstop.save(tmp_path, NAME, dev, 1 << 20, counters, EXTENTS)
    _direct(dev, write=False)
    assert cleanstop.load(tmp_path, NAME, dev, 1 << 20) == (EXTENTS, "")

    counters = cleanstop.write_counters(dev)
    assert counters is not None
    cleanstop.save(tmp_path, NAME, dev, 1 << 20, counters, EXTENTS)
    _direct(dev, write=True)
    extents, reason = cleanstop.load(tmp_path, NAME, dev, 1 << 20)
    assert extents == [] and "written" in reason
