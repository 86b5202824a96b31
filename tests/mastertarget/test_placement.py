"""Where a new replica may go (mastertarget.placement): an existing file is never overwritten, and the
refusal names the option that uses it instead (--existing, offline seeding)."""

from __future__ import annotations

from pathlib import Path

import pytest

from standby.mastertarget.placement import check_replica_path

SIZE = 1 << 20


@pytest.mark.parametrize("fmt, present", [
    ("raw", "disk.img"),
    ("vmdk", "disk.vmdk"),
    ("vmdk", "disk-flat.vmdk"),
    ("vmdk-sparse", "disk.vmdk"),
])
def test_an_existing_replica_is_refused_and_the_refusal_names_existing(tmp_path: Path, fmt: str, present: str):
    path = tmp_path / ("disk.img" if fmt == "raw" else "disk.vmdk")
    (tmp_path / present).write_bytes(b"someone's disk")
    code, message = check_replica_path(str(path), fmt, SIZE, set())
    assert code == "replica-exists"
    assert f"replica path {tmp_path / present} already exists on the master target" in message
    assert f"if {path} holds a copy of this disk" in message and "protect with --existing" in message
    assert (tmp_path / present).read_bytes() == b"someone's disk"


def test_a_new_path_is_fine(tmp_path: Path):
    assert check_replica_path(str(tmp_path / "disk.vmdk"), "vmdk", SIZE, set()) == ("", "")
