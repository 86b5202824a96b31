"""`standby demo`'s verdict on a replica comes from outside readers: qemu-img and plain read-only files
(standby.admin.demo.verify). It says identical only for the same guest data, in every replica format."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from standby.admin.demo import verify

MiB = 1 << 20
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


def source(tmp_path: Path, size: int = 4 * MiB) -> Path:
    path = tmp_path / "source.img"
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MiB)
        f.write(os.urandom(MiB))
        f.seek(3 * MiB + 512)
        f.write(b"text " * 1000)
    return path


def qemu_copy(src: Path, dst: Path, fmt: str, *options: str) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(src), str(dst)], check=True,
                   capture_output=True)
    return dst


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@needs_qemu_img
@pytest.mark.parametrize("subformat", ["monolithicSparse", "monolithicFlat"])
def test_a_vmdk_replica_is_read_by_qemu_img(tmp_path: Path, subformat: str, capsys: pytest.CaptureFixture) -> None:
    src = source(tmp_path)
    fmt = "vmdk-sparse" if subformat == "monolithicSparse" else "vmdk-monolithic-flat"
    replica = qemu_copy(src, tmp_path / "replica.vmdk", "vmdk", "-o", f"subformat={subformat}")
    assert verify(str(src), replica, fmt, 4 * MiB)
    out = capsys.readouterr().out
    assert "Images are identical" in out and "identical (read by qemu-img convert)" in out
    assert sorted(p.name for p in tmp_path.iterdir() if "verify" in p.name) == []  # the raw copy is gone
    flip_byte(src, MiB + 4096)
    assert not verify(str(src), replica, fmt, 4 * MiB)
    assert "DIFFERENT" in capsys.readouterr().out


@needs_qemu_img
def test_a_raw_replica_is_read_as_a_plain_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = source(tmp_path)
    replica = tmp_path / "replica.img"
    shutil.copy(src, replica)
    assert verify(str(src), replica, "raw", 4 * MiB)
    assert "identical (read as a plain file)" in capsys.readouterr().out
    flip_byte(replica, 3 * MiB + 600)
    assert not verify(str(src), replica, "raw", 4 * MiB)
    with open(replica, "r+b") as f:
        f.truncate(2 * MiB)  # a short replica is no copy either
    assert not verify(str(src), replica, "raw", 4 * MiB)
