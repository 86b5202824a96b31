"""Resync end to end (promise 3): after the agent was killed, after the tracker lost events, when the
operator asks, and offline seeding into an existing replica. The replica converges to the source and
a checksum resync ships about the bytes that differ, not the disk."""

from __future__ import annotations

import mmap
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import needs_loop
from tests.tools import needs

from .conftest import MiB, fill_mixed
from .test_delta import disk, fio

pytestmark = needs_loop
BLOCK = 4096


def scatter(dev: str, size: int, count: int, seed: int) -> set[int]:
    """Overwrite `count` random distinct 4 KiB blocks of the device with O_DIRECT; returns their numbers."""
    rng = random.Random(seed)
    blocks = set(rng.sample(range(size // BLOCK), count))
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        for b in sorted(blocks):
            buf.seek(0)
            buf.write(rng.randbytes(BLOCK))
            os.pwrite(fd, buf, b * BLOCK)
    finally:
        os.close(fd)
    return blocks


def wait_resync_done(dep, after: float, timeout: float = 120.0) -> dict:
    st = dep.wait_for(
        lambda s: ((disk(s)["last_resync"] or {}).get("done_at") or 0) > after
        and disk(s)["replication"] == "Delta"
        and disk(s)["applied_seq"] == disk(s)["received_seq"],
        timeout,
        "a resync to complete",
    )
    return disk(st)


def resync_report(dep) -> dict:
    """The agent's report of its last resync (bytes differing / shipped / hash bytes)."""
    st = dep.wait_for(lambda s: (disk(s)["resync"] or {}).get("phase") == "complete", 30, "the agent's resync report")
    return disk(st)["resync"]


def cmp(dev: str, replica: Path) -> None:
    res = subprocess.run(["cmp", dev, str(replica)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_resync_after_agent_kill9_ships_about_what_differs(deployment, protected):
    size = 128 * MiB
    dev, replica = protected("raw", size)
    deployment.wait_caught_up("src", time.time(), timeout=120)
    deployment.kill("agent-src", signal.SIGKILL)
    changed = scatter(dev, size, 300, seed=5)  # written while no agent runs: nobody tracked these
    t0 = time.time()
    deployment.start("agent", "src")
    d = wait_resync_done(deployment, t0)
    assert d["last_resync"]["mode"] == "checksum"
    assert "did not stop cleanly" in d["last_resync"]["reason"]
    cmp(dev, replica)
    rep = resync_report(deployment)
    differing = len(changed) * BLOCK
    assert rep["bytes_differing"] == differing, rep
    assert rep["bytes_shipped"] <= 1.1 * differing, rep
    assert rep["hash_bytes"] < size // 100, rep  # the comparison costs well under 1 % of the disk
    deployment.wait_caught_up("src", time.time(), timeout=60)  # points again after the resync


@needs("fio")
def test_tracking_loss_turns_into_resync_never_a_wrong_replica(deployment, protected):
    """A deliberately tiny ring buffer under load: the tracker must notice the loss and resync."""
    size = 128 * MiB
    dev, replica = protected("raw", size, trace_buffer="64K", cut_interval=0.5)
    deployment.wait_caught_up("src", time.time(), timeout=120)
    t0 = time.time()
    fio(dev, 4, bs="4k")
    d = deployment.wait_for(
        lambda s: ((disk(s)["last_resync"] or {}).get("started_at") or 0) > t0, 60, "a resync after tracking loss"
    )
    assert "tracking lost" in disk(d)["last_resync"]["reason"], disk(d)["last_resync"]
    end = time.time()
    deployment.wait_caught_up("src", end, timeout=120)
    cmp(dev, replica)
    assert "change tracking lost" in deployment.log_text("agent-src")


def test_operator_full_resync(deployment, protected):
    size = 32 * MiB
    dev, replica = protected("raw", size)
    deployment.wait_caught_up("src", time.time(), timeout=60)
    t0 = time.time()
    res = deployment.cli("resync", "src", "--full")
    assert res.returncode == 0, res.stderr
    assert "full resync requested" in res.stdout
    d = wait_resync_done(deployment, t0)
    assert d["last_resync"] == {**d["last_resync"], "mode": "full", "reason": "requested by the operator"}
    assert resync_report(deployment)["bytes_shipped"] == size
    cmp(dev, replica)
    out = deployment.cli("status", "src").stdout
    assert "last-resync:full reason: requested by the operator" in out
    assert deployment.cli("resync", "nosuch").returncode != 0


def test_offline_seeding_ships_only_differences(deployment, make_loop, tmp_path):
    """Protect into a replica restored from an older copy: a checksum resync, not a full copy."""
    size = 128 * MiB
    dev = make_loop(size, "source")
    fill_mixed(dev, size)
    rdir = tmp_path / "replicas"
    rdir.mkdir()
    replica = rdir / "restored.img"
    shutil.copyfile(dev, replica)  # yesterday's backup ...
    changed = scatter(dev, size, 200, seed=9)  # ... and what changed since
    deployment.enroll("mt", "mt1")
    deployment.start("mt", "mt1")
    deployment.enroll("agent", "src")
    deployment.add_disk("src", "disk0", dev)
    deployment.start("agent", "src")
    deployment.wait_disks_known("src", 1)
    deployment.wait_mt_connected("mt1")
    res = deployment.cli("protect", "src", "--mt", "mt1", "--format", "raw", "--existing", "--replica",
                         f"disk0={replica}")
    assert res.returncode == 0, res.stderr
    assert "seeding" in res.stdout
    d = wait_resync_done(deployment, 0)
    assert "offline seeding" in d["last_resync"]["reason"]
    rep = resync_report(deployment)
    assert rep["bytes_differing"] == len(changed) * BLOCK, rep
    assert rep["bytes_shipped"] <= 1.1 * len(changed) * BLOCK
    assert d["bytes_received"] < size // 10, d  # no full copy travelled
    cmp(dev, replica)
    deployment.wait_caught_up("src", time.time(), timeout=60)


def test_disk_grows_replica_resized_and_resynced(deployment, protected, tmp_path):
    """The source disk is extended: the master target resizes the VMDK (descriptor and extent), a
    checksum resync fills in the new part, and delta replication goes on at the new size."""
    from .conftest import HAVE_QEMU, qemu_compare, qemu_info

    size, bigger = 64 * MiB, 96 * MiB
    dev, replica = protected("vmdk", size)
    deployment.wait_caught_up("src", time.time(), timeout=60)
    backing = tmp_path / "source.img"
    os.truncate(backing, bigger)
    subprocess.run(["losetup", "-c", dev], check=True)
    changed = scatter(dev, bigger, 50, seed=3)
    assert any(b * BLOCK >= size for b in changed)
    t0 = time.time()
    d = wait_resync_done(deployment, t0)
    assert d["last_resync"]["reason"] == f"disk size changed from {size} to {bigger} bytes"
    assert d["size"] == bigger
    deployment.wait_caught_up("src", time.time(), timeout=60)
    if HAVE_QEMU:
        assert qemu_info(replica)["virtual-size"] == bigger
        res = qemu_compare(dev, replica, "vmdk")
        assert res.returncode == 0, res.stdout + res.stderr
    assert "resized from" in deployment.log_text("mt-mt1")


def test_resync_waits_for_an_absent_master_target(deployment, protected):
    """A checksum resync needs the master target's hashes: while it is away the agent keeps tracking and
    retries; when it is back the resync completes and nothing written meanwhile is lost."""
    size = 64 * MiB
    dev, replica = protected("raw", size)
    deployment.wait_caught_up("src", time.time(), timeout=60)
    deployment.kill("mt-mt1", signal.SIGTERM)
    t0 = time.time()
    assert deployment.cli("resync", "src").returncode == 0
    deployment.wait_for(
        lambda s: "resync cannot go on now" in deployment.log_text("agent-src"), 30, "the agent to wait and retry"
    )
    scatter(dev, size, 100, seed=21)  # written while the resync waits
    deployment.start("mt", "mt1")
    wait_resync_done(deployment, t0, timeout=90)
    deployment.wait_caught_up("src", time.time(), timeout=60)
    cmp(dev, replica)
