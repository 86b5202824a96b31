"""Initial replication end to end into every replica format, judged by qemu-img (an outside tool)."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests.conftest import needs_loop, needs_qemu_img

from .conftest import MiB, qemu_compare, qemu_info

pytestmark = [needs_loop, needs_qemu_img]

# An odd size (not a multiple of a 64 KiB grain or of the batch) exercises every tail.
SIZE = 40 * MiB + 12 * 1024
CREATE_TYPE = {
    "vmdk": "vmfs",
    "vmdk-thick": "vmfs",
    "vmdk-monolithic-flat": "monolithicFlat",
    "vmdk-sparse": "monolithicSparse",
}


@pytest.mark.parametrize("fmt", ["vmdk", "vmdk-thick", "vmdk-monolithic-flat", "vmdk-sparse", "raw"])
def test_replicate_into_file_replica(deployment, protected, fmt):
    source, replica = protected(fmt, SIZE)
    st = deployment.wait_synced("src", timeout=120)
    d = st["disks"][0]
    assert d["error"] is None
    assert d["bytes_applied"] == SIZE and d["progress"] == 1.0
    res = qemu_compare(source, replica, fmt)
    assert res.returncode == 0, res.stdout + res.stderr
    if fmt == "raw":
        return
    info = qemu_info(replica)
    assert info["format"] == "vmdk"
    assert info["virtual-size"] == SIZE
    assert info["format-specific"]["data"]["create-type"] == CREATE_TYPE[fmt]
    qcheck = subprocess.run(["qemu-img", "check", str(replica)], capture_output=True, text=True)
    assert qcheck.returncode == 0, qcheck.stdout + qcheck.stderr
    if fmt == "vmdk-sparse":
        import pyvmdk

        from tests.vmdkcheck import check

        deployment.kill("mt-mt1", signal.SIGTERM)  # a clean stop closes the replica: flag cleared
        report = check(replica, expect_clean=True)  # tables equal, entries in range, aligned, unique
        assert report.allocated, "a disk with data must have allocated grains"
        h = pyvmdk.handle()
        h.open(str(replica))
        h.open_extent_data_files()
        try:
            with open(source, "rb") as f:
                for off in range(0, SIZE, 4 * MiB):
                    n = min(4 * MiB, SIZE - off)
                    assert h.read_buffer_at_offset(n, off) == f.read(n), f"libvmdk differs at {off}"
        finally:
            h.close()
    if fmt == "vmdk":
        flat = replica.with_name(replica.stem + "-flat.vmdk")
        assert 'ddb.thinProvisioned = "1"' in replica.read_text()
        assert flat.stat().st_blocks * 512 < SIZE, "a thin flat extent must stay sparse (zeros not written)"


def test_replicate_into_block_device(deployment, protected, make_loop):
    target = make_loop(SIZE, "target")
    source, replica = protected("device", SIZE, replica=target)
    deployment.wait_synced("src", timeout=120)
    res = qemu_compare(source, replica, "device")
    assert res.returncode == 0, res.stdout + res.stderr
