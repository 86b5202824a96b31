"""Recovery points end to end (issue 4): the retention journal on the master target, `standby points`,
test failover while replication goes on, failover in place, changing the point (back and forward
again), commit. Every materialised point is judged against the source with the write-order records
(the replica equals the source after exactly the first N records for one N) — the same point always
gives the same N, and older points give smaller N."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import writeorder
from tests.tools import needs

from .conftest import MiB, qemu_info
from .test_delta import disk, start_workload, stop_workload

SLOTS = 2048  # 8 MiB of write-order records at the start of the disk


def points(dep, machine: str = "src") -> list[dict]:
    res = dep.cli("points", machine, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["disks"][0]["points"]


def wait_points(dep, count: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        pts = points(dep)
        if len(pts) >= count:
            return pts
        assert time.monotonic() < deadline, f"only {len(pts)} points after {timeout} s"
        time.sleep(0.5)


def cut_of(path: Path | str, log: Path) -> int:
    v = writeorder.check(str(path), 0, SLOTS, log)
    assert v.consistent, v.to_json()
    assert v.cut_lo is not None
    return v.cut_lo


def cli_json(dep, *args: str) -> dict:
    res = dep.cli(*args, "--json")
    assert res.returncode == 0, f"{args}: {res.stdout} {res.stderr}"
    return json.loads(res.stdout)


def test_failover_test_failover_change_point_commit(deployment, protected, tmp_path):
    dev, replica = protected("raw", 64 * MiB, fill=False, cut_interval=0.2)
    deployment.wait_synced("src", timeout=60)
    log = tmp_path / "writes.log"
    proc = start_workload(dev, log, SLOTS, rate=300, seconds=600)
    try:
        pts = wait_points(deployment, 15)
        # Test failover to an older point while the workload and replication go on.
        old = pts[len(pts) // 2]
        res = cli_json(deployment, "test-failover", "src", "--point", str(old["sequence"]))
        copy = Path(res["disks"][0]["path"])
        assert copy.exists() and copy != replica
        cut_old = cut_of(copy, log)
        assert deployment.cli("test-failover", "src", "--point", "latest-processed").returncode != 0  # one at a time
        gone = cli_json(deployment, "test-failover-cleanup", "src")
        assert str(copy) in gone["disks"][0]["removed"] and not copy.exists()
        time.sleep(1.0)
    finally:
        stop_workload(proc)
    last = writeorder.WriteLog.read(log).last
    assert 0 < cut_old < last
    # The agent has shipped a point after the last write (it may still be in the cache: `latest` drains it).
    end = time.time()
    deployment.wait_for(lambda s: (disk(s)["latest_point_time"] or 0) >= end, 60, "a point after the last write")

    # Failover to latest: the cache is drained first, so the replica holds every record.
    res = cli_json(deployment, "failover", "src", "--point", "latest")
    latest_seq = res["disks"][0]["sequence"]
    assert cut_of(replica, log) == last
    d = disk(deployment.status())  # at once, not at the master target's next report: status tells the truth
    assert d["replication"] == "FailedOver" and d["rpo_seconds"] is None, d
    assert d["failover"]["point"] == latest_seq and not d["failover"]["committed"], d["failover"]
    # Back to the older point, in place: the same instant as the test failover showed.
    cli_json(deployment, "failover", "src", "--point", str(old["sequence"]))
    assert cut_of(replica, log) == cut_old
    # Forward again to a point in between, then to latest: each is one instant, in order.
    listed = points(deployment)
    mid = next(p for p in listed if p["sequence"] > old["sequence"] + 5)
    cli_json(deployment, "failover", "src", "--point", str(mid["sequence"]))
    cut_mid = cut_of(replica, log)
    assert cut_old <= cut_mid <= last
    cli_json(deployment, "failover", "src", "--point", str(latest_seq))
    assert cut_of(replica, log) == last
    cli_json(deployment, "failover", "src", "--point", str(mid["sequence"]))
    assert cut_of(replica, log) == cut_mid
    # A resync would overwrite the failed-over replica: refused with the reason, nothing asked of the agent.
    bad = deployment.cli("resync", "src")
    assert bad.returncode == 1 and "src/disk0 is failed over: a resync would overwrite" in bad.stderr, bad.stderr
    assert disk(deployment.status())["resync_requested"] is None
    # Commit: newer history is gone, the replica stays at the point.
    res = cli_json(deployment, "commit", "src")
    assert res["disks"][0]["sequence"] == mid["sequence"]
    d = disk(deployment.status())
    assert d["replication"] == "Committed" and d["rpo_seconds"] is None, d
    assert d["failover"]["point"] == mid["sequence"] and d["failover"]["committed"], d["failover"]
    shown = deployment.cli("status").stdout
    assert "(committed)" in shown and "rpo:-(failed-over:nothing-replicates)" in shown, shown
    # A test failover of a committed machine says that nothing replicates (it said "replication goes on").
    tf = deployment.cli("test-failover", "src", "--point", "latest-processed")
    assert tf.returncode == 0 and "src is failed over and committed: nothing replicates" in tf.stdout, tf.stdout
    assert "replication goes on" not in tf.stdout
    cli_json(deployment, "test-failover-cleanup", "src")
    after = points(deployment)
    assert after and max(p["sequence"] for p in after) == mid["sequence"]
    assert cut_of(replica, log) == cut_mid
    # Contradictory or impossible requests are refused with a reason.
    bad = deployment.cli("failover", "src", "--point", "latest", "--at", "10m ago")
    assert bad.returncode == 2 and "not allowed with" in bad.stderr
    bad = deployment.cli("failover", "src", "--point", str(latest_seq))
    assert bad.returncode != 0 and "committed" in (bad.stdout + bad.stderr)
    bad = deployment.cli("resync", "src", "--full")
    assert bad.returncode == 1 and "src/disk0 is committed: its replica is the machine now" in bad.stderr, bad.stderr
    assert cut_of(replica, log) == cut_mid and disk(deployment.status())["resync_requested"] is None


def test_points_listing_and_choices(deployment, protected, tmp_path):
    dev, replica = protected("raw", 32 * MiB, fill=False, cut_interval=0.3)
    deployment.wait_synced("src", timeout=60)
    log = tmp_path / "writes.log"
    proc = start_workload(dev, log, SLOTS, rate=200, seconds=600)
    try:
        pts = wait_points(deployment, 6)
    finally:
        stop_workload(proc)
    text = deployment.cli("points", "src").stdout
    assert "crash-consistent" in text and str(pts[-1]["sequence"]) in text and "by age: <10m" in text
    two = deployment.cli("points", "src", "--limit", "2").stdout  # idle points keep coming: any total
    assert re.search(r"the newest 2 of \d+ listed", two) and two.count("crash-consistent  ") == 2, two
    assert len(cli_json(deployment, "points", "src", "--limit", "1")["disks"][0]["points"]) == 1
    later = deployment.cli("points", "src", "--since", str(time.time() + 3600)).stdout
    assert "no point listed since" in later, later
    assert all(a["time"] < b["time"] and a["sequence"] < b["sequence"] for a, b in zip(pts, pts[1:], strict=False))
    assert all(p["history_bytes"] >= q["history_bytes"] for p, q in zip(pts, pts[1:], strict=False))
    # --at picks the newest point at or before the time.
    target = pts[2]
    res = cli_json(deployment, "test-failover", "src", "--at", str(target["time"] + 0.0001))
    assert res["disks"][0]["sequence"] == target["sequence"]
    cli_json(deployment, "test-failover-cleanup", "src")
    res = deployment.cli("test-failover", "src", "--at", "2001-01-01 00:00")
    assert res.returncode != 0 and "no recovery point at or before" in res.stderr
    for verb in ("test-failover", "failover"):  # a time in the future names no point: refused, nothing moves
        res = deployment.cli(verb, "src", "--at", str(int(time.time()) + 3600))
        assert res.returncode == 2 and "is in the future" in res.stderr, res.stderr
    assert disk(deployment.status())["replication"] == "Delta"
    res = deployment.cli("test-failover", "src", "--point", "latest-app")
    assert res.returncode != 0 and "no app-consistent point" in res.stderr
    res = deployment.cli("test-failover", "src", "--point", "999999999")
    assert res.returncode != 0 and "no recovery point 999999999" in res.stderr
    res = deployment.cli("points", "nosuch")
    assert res.returncode != 0 and "unknown machine" in res.stderr
    # The master target reports history every few seconds.
    deployment.wait_for(lambda s: disk(s)["history_points"], 20, "history in status")
    status = deployment.cli("status", "src").stdout
    assert "history:" in status and "journal:" in status, status


def end_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group this test started (its own session): the shell and whatever it runs now."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had ended by itself
        pass
    proc.wait()


def umount(mnt: Path) -> None:
    """Unmount what the test mounted; a writer's last close may still be under way: try for a few seconds."""
    for _ in range(50):
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "--lazy", str(mnt)], check=False)  # never leave the mount behind


@needs("mkfs.ext4", "e2fsck")
def test_fsck_passes_at_a_crash_consistent_point(deployment, protected, tmp_path, make_loop):
    """ext4 under a live file workload: a test failover to a crash-consistent point is a file system
    `fsck -n` accepts (journal replay is what a crash leaves; fsck -n does not replay, so the copy's
    journal is recovered first by a read-only-safe e2fsck -p on a second copy)."""
    dev, replica = protected("raw", 128 * MiB, fill=False, cut_interval=0.3)
    deployment.wait_synced("src", timeout=60)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True)
    writer = subprocess.Popen(
        ["bash", "-c", f"i=0; while [ $i -lt 4000 ]; do head -c $((RANDOM * 4)) /dev/urandom > {mnt}/f$((i % 300)); "
         f"[ $((i % 20)) -eq 0 ] && sync -f {mnt}; i=$((i+1)); done"],
        start_new_session=True,  # its own group: the kill below also ends a `head` or `sync` under way
    )
    try:
        time.sleep(4)
        pts = wait_points(deployment, 3)
        res = cli_json(deployment, "test-failover", "src", "--point", str(pts[-2]["sequence"]))
    finally:
        end_group(writer)
        umount(mnt)
    copy = Path(res["disks"][0]["path"])
    # A crash-consistent image: the ext4 journal may need replaying (as after a power cut). Replay it
    # (e2fsck -p -E journal_only), then the file system must be clean for fsck -n.
    replay = subprocess.run(["e2fsck", "-f", "-p", "-E", "journal_only", str(copy)], capture_output=True, text=True)
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(copy)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cli_json(deployment, "test-failover-cleanup", "src")


@needs("mkfs.ext4", "e2fsck", "debugfs")
def test_app_consistent_point_and_failover_to_latest_app(deployment, protected, tmp_path):
    """`standby app-point` through the process server: the pre-script writes a marker file, the file
    system is frozen for the cut; failover to latest-app gives a replica whose file system is clean
    (no journal recovery needed: it was frozen) and holds the marker the pre-script wrote."""
    pre = tmp_path / "pre.sh"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pre.write_text(f"#!/bin/sh\necho \"quiesced $STANDBY_TAG\" > {mnt}/marker\n")
    pre.chmod(0o755)
    dev, replica = protected("raw", 64 * MiB, fill=False, cut_interval=0.3, pre_script=str(pre),
                             app_consistent_every=0)
    deployment.wait_synced("src", timeout=60)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
    subprocess.run(["mount", dev, str(mnt)], check=True)
    writer = subprocess.Popen(
        ["bash", "-c", f"i=0; while [ $i -lt 100000 ]; do echo line $i >> {mnt}/log; i=$((i+1)); done"],
        start_new_session=True,  # its own group, ended whole below
    )
    try:
        time.sleep(1.5)
        res = cli_json(deployment, "app-point", "src", "--tag", "nightly")
        d = res["disks"][0]
        assert d["consistency"] == "app-consistent", res
        assert 0 < d["freeze_seconds"] < 10
        text = deployment.cli("app-point", "src", "--tag", "again").stdout
        assert "app-consistent point" in text and "frozen" in text
        time.sleep(1.0)
    finally:
        end_group(writer)
        umount(mnt)
    listed = points(deployment)
    apps = [p for p in listed if p["consistency"] == "app-consistent"]
    assert [p["tag"] for p in apps] == ["nightly", "again"]
    assert "app-consistent" in deployment.cli("points", "src").stdout
    res = cli_json(deployment, "failover", "src", "--point", "latest-app")
    assert res["disks"][0]["sequence"] == apps[-1]["sequence"]
    # Frozen at the cut: the file system needs no journal recovery and is clean.
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(replica)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    out = subprocess.run(["debugfs", "-R", "cat /marker", str(replica)], capture_output=True, text=True)
    assert out.stdout.strip() == "quiesced again", out.stdout + out.stderr


def _protect_with_retention(dep, make_loop, tmp_path, **retention) -> tuple[str, Path]:
    dev = make_loop(32 * MiB, "source")
    dep.enroll("mt", "mt1")
    dep.set_mt_option("mt1", segment_size="256K", **retention)
    dep.start("mt", "mt1")
    dep.enroll("agent", "src")
    dep.add_disk("src", "disk0", dev)
    dep.set_agent_option("src", batch_size="1M", cut_interval=0.25)
    dep.start("agent", "src")
    dep.wait_disks_known("src", 1)
    dep.wait_mt_connected("mt1")
    rdir = tmp_path / "replicas"
    rdir.mkdir()
    res = dep.admin().call("protect", machine="src", mt="mt1", format="raw", replica_dir=str(rdir), replicas={})
    dep.wait_synced("src", timeout=60)
    return dev, Path(res["disks"][0]["replica"])


def _judge_all_listed(dep, replica: Path, log: Path, since: float) -> int:
    """Pause at a point and materialise every listed point newer than `since` from replica + journal."""
    from tests.journalcheck import disk_key, walk_points

    assert dep.cli("pause", "src", "--wait", "60").returncode == 0
    try:
        listed = dep.admin().call("points", machine="src")["disks"][0]
        want = {p["sequence"] for p in listed["points"] if p["time"] > since}
        key, uid = disk_key(dep.ps_dir, dep.root / "mt-mt1", listed["disk_id"])
        judged = 0
        for _, img in walk_points(dep.retention_dir("mt1"), listed["disk_id"], key, uid,
                                  bytearray(replica.read_bytes()), want, oldest=min(want)):
            v = writeorder.check(bytes(img[: SLOTS * writeorder.SLOT]), 0, SLOTS, log)
            assert v.consistent, v.to_json()[:2000]
            judged += 1
        assert judged == len(want)
        return judged
    finally:
        dep.cli("resume", "src")


def test_pruning_under_a_small_window_keeps_every_listed_point_restorable(deployment, make_loop, tmp_path):
    dev, replica = _protect_with_retention(deployment, make_loop, tmp_path, window="12s", tiers=[[4, 0], [12, 3]])
    log = tmp_path / "writes.log"
    proc = start_workload(dev, log, SLOTS, rate=300, seconds=600)
    ready = time.time()
    try:
        time.sleep(25)  # two windows: the oldest history must be gone
        listed = deployment.admin().call("points", machine="src")["disks"][0]
        now = time.time()
        pts = listed["points"]
        ages = [now - p["time"] for p in pts]
        assert pts and max(ages) < 12 + 7, f"points older than the window (+ one upkeep): {ages}"
        # Thinning: older than 4 s, at most one point per 3 s bucket (+ the oldest in the window).
        thinned = [p["time"] for p in pts if now - p["time"] > 5]
        buckets = [int(t // 3) for t in thinned]
        assert len(buckets) - len(set(buckets)) <= 1, f"not thinned: {thinned}"
        assert len([a for a in ages if a < 3.5]) >= 5, "recent points must all be kept"
        # Whole segments were deleted: the journal holds about a window of history, not all of it.
        segs = sorted((deployment.retention_dir("mt1") / next(iter(
            p.name for p in deployment.retention_dir("mt1").iterdir()))).glob("seg-*.jrn"))
        first_seq = int(segs[0].stem[4:])
        assert first_seq > 1, "no segment was ever pruned"
        _judge_all_listed(deployment, replica, log, ready)
    finally:
        stop_workload(proc)


def test_space_cap_prunes_oldest_first_with_an_alert(deployment, make_loop, tmp_path):
    dev, replica = _protect_with_retention(deployment, make_loop, tmp_path, space_cap="3M")
    log = tmp_path / "writes.log"
    proc = start_workload(dev, log, SLOTS, rate=300, seconds=600)
    ready = time.time()
    try:
        st = deployment.wait_for(
            lambda s: any("space pressure" in a for a in disk(s)["alerts"]), 90, "a retention space alert"
        )
        assert (disk(st)["journal_bytes"] or 0) < 3 * MiB + 2 * 256 * 1024 + 4 * MiB
        assert "retention space pressure" in deployment.log_text("mt-mt1")
        listed = deployment.admin().call("points", machine="src")["disks"][0]
        assert "space pressure" in listed["alert"]
        assert len(listed["points"]) >= 2 and listed["points"][0]["time"] > ready
        _judge_all_listed(deployment, replica, log, ready)
    finally:
        stop_workload(proc)


@needs("qemu-img")
@pytest.mark.parametrize("fmt", ["vmdk", "vmdk-sparse"])
def test_test_failover_copies_vmdk_replicas_qemu_reads_the_point(deployment, protected, tmp_path, fmt):
    """Flat VMDKs are copied by data range in the kernel, sparse ones block by block under the apply
    lock; either way the copy is a VMDK qemu-img reads, and it holds the point."""
    dev, replica = protected(fmt, 32 * MiB, fill=False, cut_interval=0.25)
    deployment.wait_synced("src", timeout=60)
    log = tmp_path / "writes.log"
    proc = start_workload(dev, log, SLOTS, rate=300, seconds=600)
    try:
        pts = wait_points(deployment, 8)
        res = cli_json(deployment, "test-failover", "src", "--point", str(pts[-4]["sequence"]))
        copy = Path(res["disks"][0]["path"])
        assert res["disks"][0]["format"] == fmt and copy.suffix == ".vmdk"
        time.sleep(1.0)
    finally:
        stop_workload(proc)
    assert qemu_info(copy)["format"] == "vmdk"
    raw = tmp_path / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(copy), str(raw)], check=True)
    cut_test = cut_of(raw, log)
    # The same point in place: the replica must say the same.
    cli_json(deployment, "failover", "src", "--point", str(pts[-4]["sequence"]))
    res = subprocess.run(["qemu-img", "compare", str(copy), str(replica)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert 0 < cut_test < writeorder.WriteLog.read(log).last
    removed = cli_json(deployment, "test-failover-cleanup", "src")["disks"][0]["removed"]
    assert removed and not any(Path(f).exists() for f in removed)
