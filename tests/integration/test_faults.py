"""Fault tests (DESIGN.md promises 1, 2 and 8, section 13): kill -9 of each daemon in the middle of an
initial replication, repeated random kills, a full process-server cache and a full replica file system.

Real daemons as processes, real loop devices, real TLS. The oracle is `qemu-img compare` of the source
device against the replica (an outside tool), plus the daemons' own logs and durable state.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from standby.proto.frames import scan_records
from tests.conftest import needs_loop, needs_qemu_img
from tests.deploy import LocalDeployment
from tests.tools import needs

from .conftest import MiB, qemu_compare

pytestmark = [needs_loop, needs_qemu_img]

# Big enough that an initial replication of (incompressible) random data takes several seconds on two
# cores, so that a kill lands in the middle of it; small enough that each test stays well under a minute.
BIG = 384 * MiB
BATCH = "1M"
RESUME = re.compile(r"resuming initial replication at (\d+) of (\d+) bytes")
DAEMONS = {"ps": ("ps", ""), "mt-mt1": ("mt", "mt1"), "agent-src": ("agent", "src")}


# -- helpers ------------------------------------------------------------------------------------------
def fill_random(path: str, size: int, zero_every: int = 8) -> None:
    """Mostly random (incompressible) data; every `zero_every`-th 4 MiB chunk stays zero (zero extents)."""
    chunk = 4 * MiB
    with open(path, "r+b", buffering=0) as f:
        for i, off in enumerate(range(0, size, chunk)):
            if zero_every and i % zero_every == zero_every - 1:
                continue
            f.seek(off)
            f.write(os.urandom(min(chunk, size - off)))
        os.fsync(f.fileno())


def protect(
    dep: LocalDeployment,
    dev: str,
    fmt: str,
    replica_dir: Path,
    replica: str | None = None,
    batch: str = BATCH,
) -> Path:
    """Enroll and start mt1 and agent src (one disk, `dev`), protect it; return the replica path."""
    dep.enroll("mt", "mt1")
    dep.start("mt", "mt1")
    dep.enroll("agent", "src")
    dep.add_disk("src", "disk0", dev)
    dep.set_agent_option("src", batch_size=batch, compression_level=1)
    dep.start("agent", "src")
    dep.wait_disks_known("src", 1)
    dep.wait_mt_connected("mt1")
    replica_dir.mkdir(exist_ok=True)
    res = dep.admin().call(
        "protect",
        machine="src",
        mt="mt1",
        format=fmt,
        replica_dir=None if replica else str(replica_dir),
        replicas={"disk0": replica} if replica else {},
    )
    return Path(res["disks"][0]["replica"])


def disk_status(st: dict[str, Any]) -> dict[str, Any]:
    disks = [d for d in st["disks"] if d["machine"] == "src"]
    assert len(disks) == 1, st
    return disks[0]


def wait_progress(dep: LocalDeployment, lo: float, hi: float = 0.7, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the applied progress is at least `lo`; it must not have run past `hi` (nor finished)."""
    st = dep.wait_for(
        lambda s: any(d["machine"] == "src" and d["progress"] >= lo for d in s["disks"]),
        timeout,
        f"progress >= {lo:.0%}",
        interval=0.05,
    )
    d = disk_status(st)
    assert d["replication"] != "Delta" and d["progress"] <= hi, (
        f"replication ran past {hi:.0%} before the fault could be injected ({d['progress']:.0%}): "
        "make the disk bigger or the batch smaller"
    )
    return d


def resume_cursors(text: str) -> list[int]:
    return [int(m.group(1)) for m in RESUME.finditer(text)]


def assert_identical(source: str, replica: Path, fmt: str) -> None:
    res = qemu_compare(source, replica, fmt)
    assert res.returncode == 0, res.stdout + res.stderr


def mt_state(dep: LocalDeployment, disk_id: int) -> dict[str, Any]:
    return json.loads((dep.root / "mt-mt1" / "disks" / f"{disk_id}.json").read_text())


def only_disk_id(dep: LocalDeployment) -> int:
    files = sorted((dep.root / "mt-mt1" / "disks").glob("*.json"))
    assert len(files) == 1, files
    return int(files[0].stem)


@contextlib.contextmanager
def own_deployment(root: Path, cache_quota: int) -> Iterator[LocalDeployment]:
    """Like the `deployment` fixture, with a cache quota of our own; stopped and logged even on failure."""
    dep = LocalDeployment(root, cache_quota=cache_quota)
    try:
        dep.init()
        dep.start("ps")
        yield dep
    finally:
        dep.stop_all()
        for log in sorted(dep.logs.glob("*.log")):
            text = log.read_text(errors="replace")
            print(f"----- {log.name} (last 60 lines) -----")
            print("\n".join(text.splitlines()[-60:]))


# -- 1..3: kill -9 of one daemon mid-replication ------------------------------------------------------
def test_kill9_process_server_mid_replication(deployment, make_loop, tmp_path):
    dev = make_loop(BIG, "source")
    fill_random(dev, BIG)
    replica = protect(deployment, dev, "vmdk", tmp_path / "replicas")
    before = wait_progress(deployment, 0.10)
    agent_log_at = len(deployment.log_text("agent-src"))
    deployment.kill("ps")  # SIGKILL: the cache must be durable for whatever was acked
    deployment.start("ps")
    st = deployment.wait_synced("src", timeout=90)
    assert disk_status(st)["error"] is None
    cursors = resume_cursors(deployment.log_text("agent-src")[agent_log_at:])
    assert cursors, "the agent did not log a resumed initial replication after the process server restart"
    # Everything applied before the kill had been received (and fsynced) by the process server first.
    assert cursors[0] > 0 and cursors[0] >= before["bytes_done"], (cursors, before["bytes_done"])
    assert cursors[0] < BIG
    assert_identical(dev, replica, "vmdk")


@pytest.mark.parametrize("fmt", ["vmdk", "vmdk-sparse"])
def test_kill9_master_target_mid_replication(deployment, make_loop, tmp_path, fmt):
    dev = make_loop(BIG, "source")
    fill_random(dev, BIG)
    replica = protect(deployment, dev, fmt, tmp_path / "replicas")
    before = wait_progress(deployment, 0.10)
    deployment.kill("mt-mt1")  # SIGKILL
    # Promise 1 on the master target's side: every sequence it acked is in its durable state.
    state = mt_state(deployment, only_disk_id(deployment))
    assert state["applied_seq"] >= before["applied_seq"] > 0, (state, before)
    deployment.start("mt", "mt1")
    st = deployment.wait_synced("src", timeout=90)
    d = disk_status(st)
    assert d["error"] is None and d["bytes_applied"] >= BIG
    assert "resuming initial replication" not in deployment.log_text("agent-src"), "the agent had no reason to"
    if fmt == "vmdk-sparse":
        from tests.vmdkcheck import check

        deployment.kill("mt-mt1", signal.SIGTERM)  # a clean stop closes the replica: flag cleared
        report = check(replica, expect_clean=True)
        assert report.allocated
    assert_identical(dev, replica, fmt)


def test_kill9_agent_mid_replication(deployment, make_loop, tmp_path):
    dev = make_loop(BIG, "source")
    fill_random(dev, BIG)
    replica = protect(deployment, dev, "vmdk", tmp_path / "replicas")
    before = wait_progress(deployment, 0.10)
    agent_log_at = len(deployment.log_text("agent-src"))
    deployment.kill("agent-src")  # SIGKILL
    deployment.start("agent", "src")
    st = deployment.wait_synced("src", timeout=90)
    assert disk_status(st)["error"] is None
    cursors = resume_cursors(deployment.log_text("agent-src")[agent_log_at:])
    assert cursors, "the restarted agent did not resume the initial replication"
    assert cursors[0] > 0 and cursors[0] >= before["bytes_done"], (cursors, before["bytes_done"])
    assert cursors[0] < BIG
    assert_identical(dev, replica, "vmdk")


def cached_twice(dep: LocalDeployment) -> list[int]:
    """Sequence numbers present more than once in the process server's cache segments."""
    seen: collections.Counter[int] = collections.Counter()
    for seg in sorted((dep.ps_dir / "cache").glob("disk-*/seg-*.log")):
        records, _, _ = scan_records(seg.read_bytes())  # a torn tail (append in progress) is left out
        seen.update(r.header.sequence for r in records)
    return sorted(s for s, n in seen.items() if n > 1)


def test_agent_kill9_never_caches_a_sequence_twice(deployment, make_loop, tmp_path):
    """Promise 2: one sequence, one record. Kill -9 the agent while it streams into the cache (the master
    target is stopped, so the cache keeps everything) until some kill lands during an append."""
    size = 160 * MiB
    dev = make_loop(size, "source")
    fill_random(dev, size, zero_every=0)
    replica = protect(deployment, dev, "vmdk", tmp_path / "replicas")
    mt_pid = deployment.procs["mt-mt1"].pid
    os.kill(mt_pid, signal.SIGSTOP)
    dups: list[int] = []
    kills = 0
    try:
        mark = 0
        while kills < 30 and mark + 8 * MiB < size:
            want = mark + 4 * MiB  # the restarted agent is streaming again
            st = deployment.wait_for(
                lambda s, want=want: disk_status(s)["received_cursor"] >= want, 60, "the agent to stream", 0.02
            )
            deployment.kill("agent-src")  # SIGKILL
            kills += 1
            deployment.start("agent", "src")
            mark = disk_status(st)["received_cursor"]
            dups = cached_twice(deployment)
            if dups:
                break
    finally:
        os.kill(mt_pid, signal.SIGCONT)
    print(f"{kills} agent kills; sequences cached twice: {dups}")
    deployment.wait_synced("src", timeout=90)
    assert_identical(dev, replica, "vmdk")  # the data survives either way
    assert not dups, f"after {kills} agent kills the cache holds sequences {dups} twice"
    assert "bad-ack" not in deployment.log_text("ps"), "the process server dropped its master target"


# -- 4: repeated random kills -------------------------------------------------------------------------
def test_repeated_random_kills(deployment, make_loop, tmp_path):
    seed = int(os.environ.get("STANDBY_FAULT_SEED", random.randrange(1 << 32)))
    print(f"random kill schedule seed: {seed} (rerun with STANDBY_FAULT_SEED={seed})")
    rng = random.Random(seed)
    # Five kills need room: at ~150 MB/s a 384 MiB disk is copied in under 3 s, faster than five kills
    # and restarts (seen: the last kill point was overtaken). 1 GiB, kill points up to 70 %.
    size = 1024 * MiB
    dev = make_loop(size, "source")
    fill_random(dev, size)
    replica = protect(deployment, dev, "vmdk", tmp_path / "replicas")
    # Five kills at random moments, spread over the replication (random progress points, random victims).
    points = sorted(rng.uniform(0.03, 0.7) for _ in range(5))
    kills: list[tuple[str, float]] = []
    for p in points:
        d = wait_progress(deployment, p, hi=0.97, timeout=60)
        time.sleep(rng.uniform(0.0, 0.3))
        victim = rng.choice(sorted(DAEMONS))
        deployment.kill(victim)  # SIGKILL
        kills.append((victim, d["progress"]))
        time.sleep(rng.uniform(0.0, 0.5))
        deployment.start(*DAEMONS[victim])
    print(f"kills (daemon, progress): {kills}")
    st = deployment.wait_synced("src", timeout=120)
    d = disk_status(st)
    assert d["error"] is None and d["progress"] == 1.0
    assert_identical(dev, replica, "vmdk")


# -- 5: the process server's cache reaches its quota ----------------------------------------------------
def test_cache_quota_backpressure(make_loop, tmp_path):
    quota = 24 * MiB
    size = 64 * MiB
    dev = make_loop(size, "source")
    fill_random(dev, size, zero_every=0)
    with own_deployment(tmp_path / "deploy", cache_quota=quota) as dep:
        replica = protect(dep, dev, "vmdk", tmp_path / "replicas")
        mt_pid = dep.procs["mt-mt1"].pid
        os.kill(mt_pid, signal.SIGSTOP)  # the master target applies nothing: the cache can only grow
        try:
            st = dep.wait_for(
                lambda s: s["cache_bytes"] >= quota - 3 * MiB and "busy" in dep.log_text("agent-src"),
                60,
                "the cache to fill up and the agent to be told 'busy'",
                interval=0.1,
            )
            assert st["cache_quota"] == quota
            s1 = disk_status(dep.status())
            time.sleep(3.0)
            s2 = disk_status(dep.status())
            total = dep.status()["cache_bytes"]
            assert total <= quota, f"cache holds {total} bytes, over its quota of {quota}"
            for k in ("received_seq", "received_cursor", "bytes_received", "cache_bytes", "applied_seq"):
                assert s1[k] == s2[k], f"{k} moved while the cache was full: {s1[k]} -> {s2[k]}"
            assert s2["received_cursor"] < size
            assert s2["replication"] != "Delta"
            assert dep.procs["agent-src"].poll() is None, "the agent must wait, not exit"
            assert s2["refused_records"] > s1["refused_records"], "the agent stopped retrying"
            assert "over quota" in dep.log_text("ps")
        finally:
            os.kill(mt_pid, signal.SIGCONT)
        st = dep.wait_synced("src", timeout=60)
        d = disk_status(st)
        assert d["error"] is None and d["bytes_applied"] == size
        assert_identical(dev, replica, "vmdk")


# -- 6: the replica's file system is full -------------------------------------------------------------
@contextlib.contextmanager
def mounted_ext4(dev: str, mountpoint: Path) -> Iterator[Path]:
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    mountpoint.mkdir()
    subprocess.run(["mount", dev, str(mountpoint)], check=True, capture_output=True)
    try:
        yield mountpoint
    finally:
        res = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if res.returncode != 0:  # never leave a mount behind the loop device the fixture detaches
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@needs("mkfs.ext4")
def test_replica_file_system_full(deployment, make_loop, tmp_path):
    size = 64 * MiB
    dev = make_loop(size, "source")
    fill_random(dev, size, zero_every=0)
    small = make_loop(24 * MiB, "small")
    with mounted_ext4(small, tmp_path / "mnt") as mnt:
        try:
            replica = protect(deployment, dev, "vmdk", tmp_path / "replicas", replica=str(mnt / "r.vmdk"))
            st = deployment.wait_for(
                lambda s: any(
                    d["machine"] == "src"
                    and d["error"]
                    and any(w in d["error"] for w in ("No space left", "write-failed", "cannot write replica"))
                    for d in s["disks"]
                ),
                60,
                "the master target to report the full file system",
                interval=0.1,
            )
            d = disk_status(st)
            assert d["replication"] != "Delta", d
            # The agent keeps going: everything ends up in the cache, nothing is dropped there.
            st = deployment.wait_for(
                lambda s: disk_status(s)["received_cursor"] == size, 60, "the whole disk to reach the cache"
            )
            d = disk_status(st)
            assert d["backlog_records"] > 0 and d["cache_bytes"] > 0, d
            assert d["replication"] != "Delta", d
            disk_id = only_disk_id(deployment)
            state = mt_state(deployment, disk_id)
            done = d["bytes_done"]
            assert 0 < done < size, d
            assert state["applied_seq"] == d["applied_seq"], (state, d)
            assert done == d["applied_seq"] * MiB, "1 MiB batches: sequence n ends at n MiB"
            # Everything acknowledged as applied is really in the replica's extent, byte for byte.
            flat = replica.with_name(replica.stem + "-flat.vmdk")
            with open(dev, "rb") as src, open(flat, "rb") as rep:
                off = 0
                while off < done:
                    n = min(4 * MiB, done - off)
                    a, b = src.read(n), rep.read(n)
                    assert a == b, f"replica differs from the source in [{off}, {off + n}) though acknowledged"
                    off += n
            # Still stuck a retry later, and still not claiming to be up to date.
            time.sleep(1.0)
            d = disk_status(deployment.status())
            assert d["replication"] != "Delta" and d["applied_seq"] == state["applied_seq"]
            assert "No space left" in deployment.log_text("mt-mt1")
        finally:
            deployment.kill("mt-mt1", signal.SIGTERM)  # it holds the replica open: stop it before umount


def journal_fds(pid: int, retention: Path) -> list[str]:
    """What the process `pid` holds open under the retention directory (readlink of /proc/PID/fd)."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(retention)):
                held.append(target)
    return held


def test_reconnects_leave_no_retention_journal_open(deployment, make_loop, tmp_path):
    """Every reconnect of the master target (here: the process server killed) drops its disk workers; their
    retention journals must be closed with them. Left open, the segments pruning deletes stay allocated
    and a small retention volume fills up with deleted files (found by the fault campaign)."""
    size = 32 * MiB
    dev = make_loop(size, "source")
    fill_random(dev, size, zero_every=0)
    protect(deployment, dev, "raw", tmp_path / "replicas")
    deployment.wait_synced("src", timeout=120)
    mt_pid = deployment.procs["mt-mt1"].pid
    retention = deployment.retention_dir("mt1")
    for n in range(3):
        since = time.time()
        with open(dev, "r+b", buffering=0) as f:  # history after the point: the journal is appended to
            f.seek(n * MiB)
            f.write(os.urandom(MiB))
            os.fsync(f.fileno())
        deployment.wait_caught_up("src", since, timeout=60)
        assert journal_fds(mt_pid, retention), "the test needs a journal segment open for appending"
        deployment.kill("ps")
        deployment.start("ps")
        deployment.wait_mt_connected("mt1")
    since = time.time()
    with open(dev, "r+b", buffering=0) as f:
        f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    deployment.wait_caught_up("src", since, timeout=60)
    held = journal_fds(mt_pid, retention)
    assert len(held) == 1 and not any(h.endswith("(deleted)") for h in held), (
        f"after 3 reconnects the master target holds {len(held)} files of one disk's journal open: {held}")


def fill_up(path: Path) -> int:
    """Fill the file system of `path` to the last block with the file `path` (root ignores the reserve:
    written until ENOSPC). Returns its size."""
    st = os.statvfs(path.parent)
    with open(path, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), 0, st.f_bfree * st.f_frsize)
        f.seek(0, os.SEEK_END)
        block = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
        os.fsync(f.fileno())
    return path.stat().st_size


def test_a_quarantine_that_fills_the_cache_volume_gives_way(make_loop, tmp_path):
    """Damaged cache segments are set aside in quarantine/ for inspection. If they fill the cache volume
    (repeated damage: the fault campaign stalled after some), they are deleted, oldest first, when a
    record cannot be written: replication comes first, and the log says which copies went."""
    size = 32 * MiB
    dev = make_loop(size, "source")
    fill_random(dev, size, zero_every=0)
    cachefs = make_loop(96 * MiB, "cachefs")
    with mounted_ext4(cachefs, tmp_path / "cachefs") as mnt:
        dep = LocalDeployment(tmp_path / "deploy")
        try:
            dep.init()
            dep.set_ps_option(cache_dir=str(mnt / "cache"))
            dep.start("ps")
            protect(dep, dev, "raw", tmp_path / "replicas")
            dep.wait_synced("src", timeout=120)
            qdir = next((mnt / "cache").glob("disk-*")) / "quarantine"
            qdir.mkdir()
            old = qdir / "seg-00000000000000000001.log.20261201-000000"
            old.write_bytes(os.urandom(MiB))
            os.utime(old, (time.time() - 3600, time.time() - 3600))
            ballast = fill_up(qdir / "seg-00000000000000000002.log.20261201-000001")
            # ext4 keeps a few clusters for its own metadata even from root: "full" leaves about 2 MiB.
            assert os.statvfs(mnt).f_bfree * os.statvfs(mnt).f_frsize < 4 * MiB, "the volume must be full"
            since = time.time()
            with open(dev, "r+b", buffering=0) as f:
                f.write(os.urandom(8 * MiB))
                os.fsync(f.fileno())
            dep.wait_caught_up("src", since, timeout=90)
            text = dep.log_text("ps")
            assert "No space left on device" in text, "the test must have filled the cache volume"
            assert not old.exists(), "the oldest quarantined copy goes first"
            assert "set aside earlier for inspection" in text
            assert ballast > 32 * MiB
        finally:
            dep.stop_all()
            for log in sorted(dep.logs.glob("*.log")):
                print(f"----- {log.name} (last 40 lines) -----")
                print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
