"""Shared fixtures: real loop devices and clean-up that runs even when a test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tools import needs

HAVE_ROOT = os.geteuid() == 0
HAVE_LOSETUP = shutil.which("losetup") is not None


def _loop_devices_usable() -> bool:
    return HAVE_ROOT and HAVE_LOSETUP and os.path.exists("/dev/loop-control")


LOOP_OK = _loop_devices_usable()
needs_loop = pytest.mark.skipif(not LOOP_OK, reason="needs root, losetup and /dev/loop-control")
needs_qemu_img = needs("qemu-img")


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: make_loop(size_bytes, name='disk') -> '/dev/loopN' over a sparse file.

    Every device made is detached at teardown, even when the test failed.
    """
    made: list[str] = []

    def factory(size: int, name: str = "disk") -> str:
        if not LOOP_OK:
            pytest.skip("needs root, losetup and /dev/loop-control")
        backing = tmp_path / f"{name}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(backing)], check=True, capture_output=True, text=True
        ).stdout.strip()
        made.append(dev)
        return dev

    yield factory
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
