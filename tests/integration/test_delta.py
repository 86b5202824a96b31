"""Continuous delta replication end to end, on loop devices with the kernel (tracefs) tracker: live
workloads, honest crash-consistent points (checked against the write-order records), RPO in status,
pull ahead while the master target is away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import writeorder
from tests.conftest import needs_loop
from tests.tools import need, needs

from .conftest import HAVE_QEMU, MiB, qemu_compare

pytestmark = needs_loop


def disk(status: dict, name: str = "disk0") -> dict:
    return next(d for d in status["disks"] if d["disk"] == name)


def fio(dev: str, seconds: float, bs: str = "4k/50:64k/50", rate: str | None = None, size: str | None = None) -> None:
    need("fio")
    args = [
        "fio",
        "--name=churn",
        f"--filename={dev}",
        "--rw=randwrite",
        f"--bssplit={bs}",
        "--direct=1",
        "--ioengine=psync",
        "--time_based",
        f"--runtime={seconds}",
        "--randrepeat=0",
        "--output-format=terse",
    ]
    if rate:
        args.append(f"--rate={rate}")
    if size:
        args.append(f"--size={size}")
    subprocess.run(args, check=True, capture_output=True, timeout=seconds + 60)


def assert_identical(dev: str, replica: Path, fmt: str) -> None:
    if HAVE_QEMU:
        res = qemu_compare(dev, replica, fmt)
        assert res.returncode == 0, f"qemu-img compare: {res.stdout} {res.stderr}"
    else:  # raw only
        assert subprocess.run(["cmp", dev, str(replica)]).returncode == 0


def start_workload(dev: str, log: Path, slots: int, rate: int, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.writeorder",
            "write",
            dev,
            "--offset",
            "0",
            "--slots",
            str(slots),
            "--log",
            str(log),
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--seed",
            "11",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", line
    return proc


def stop_workload(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@needs("fio", "qemu-img")
def test_live_fio_workload_replica_identical_and_rpo_shown(deployment, protected):
    dev, replica = protected("vmdk", 256 * MiB, cut_interval=0.5)
    deployment.wait_synced("src", timeout=120)
    fio(dev, 6)
    end = time.time()
    st = deployment.wait_caught_up("src", end, timeout=60)
    d = disk(st)
    assert d["tracker"] == "tracefs"
    assert d["rpo_seconds"] is not None and d["rpo_seconds"] < 30
    # Unthrottled random writes on a small disk leave few epochs clean; once they stop, points come
    # every cut again.
    d = disk(deployment.wait_for(lambda s: disk(s)["points_last_minute"] >= 3, 20, "points after the workload"))
    assert d["alerts"] == [] and d["error"] is None
    assert d["last_resync"] is None, d["last_resync"]  # nothing was lost: no resync happened
    assert_identical(dev, replica, "vmdk")
    out = deployment.cli("status", "src").stdout
    assert "rpo:" in out and "points/min:" in out and "tracker:tracefs" in out


def test_write_order_every_paused_point_is_one_instant(deployment, protected, tmp_path):
    """Promise 4, checked 100+ times in one run: the replica, paused at each crash-consistent point, equals
    the source after exactly the first N records of a live write-order workload (for one N)."""
    slots = 2048  # 8 MiB of records at the start of the disk
    dev, replica = protected("raw", 64 * MiB, fill=False, cut_interval=0.2)
    deployment.wait_synced("src", timeout=60)
    log = tmp_path / "writes.log"
    proc = start_workload(dev, log, slots, rate=300, seconds=600)
    # Records written before protection are in the initial copy; start checking at the first point after.
    cuts: list[int] = []
    checked = 0
    try:
        deadline = time.monotonic() + 400
        while checked < 100:
            assert time.monotonic() < deadline, f"only {checked} points checked"
            res = deployment.cli("pause", "src", "--wait", "30")
            assert res.returncode == 0, res.stderr
            verdict = writeorder.check(str(replica), 0, slots, log)
            assert verdict.consistent, f"point {checked}: {verdict.to_json()}"
            if cuts:
                assert verdict.cut >= cuts[-1], "a later point went back in time"
            cuts.append(verdict.cut)
            checked += 1
            assert deployment.cli("resume", "src").returncode == 0
            time.sleep(0.1)
    finally:
        stop_workload(proc)
        deployment.cli("resume", "src")
    assert len(set(cuts)) > 50, f"points did not move with the workload: {cuts[:20]}..."
    end = time.time()
    deployment.wait_caught_up("src", end, timeout=60)
    final = writeorder.check(str(replica), 0, slots, log)
    assert final.consistent and final.cut == writeorder.WriteLog.read(log).last
    assert_identical(dev, replica, "raw")


@needs("fio")
def test_pull_ahead_master_target_away_then_catch_up(make_loop, tmp_path):
    """The master target is stopped and the cache fills while writes go on: the agent keeps tracking in
    its dirty map, the source is never blocked, nothing is lost, and it all catches up."""
    from .test_faults import own_deployment

    size = 128 * MiB
    dev = make_loop(size, "source")
    with own_deployment(tmp_path / "deploy", cache_quota=16 * MiB) as dep:
        dep.enroll("mt", "mt1")
        dep.start("mt", "mt1")
        dep.enroll("agent", "src")
        dep.add_disk("src", "disk0", dev)
        dep.set_agent_option("src", batch_size="1M", cut_interval=0.3)
        dep.start("agent", "src")
        dep.wait_disks_known("src", 1)
        dep.wait_mt_connected("mt1")
        rdir = tmp_path / "replicas"
        rdir.mkdir()
        res = dep.admin().call("protect", machine="src", mt="mt1", format="raw", replica_dir=str(rdir), replicas={})
        replica = Path(res["disks"][0]["replica"])
        dep.wait_caught_up("src", time.time(), timeout=60)
        dep.kill("mt-mt1", signal.SIGTERM)
        t0 = time.monotonic()
        fio(dev, 8, bs="64k")  # far more than the 16 MiB cache takes
        fio_seconds = time.monotonic() - t0
        assert fio_seconds < 30, "the source's writes were held back"
        st = dep.wait_for(
            lambda s: (disk(s)["dirty_bytes"] or 0) > 0 and "busy" in dep.log_text("agent-src"),
            30,
            "the agent to keep changes in its dirty map",
        )
        assert st["cache_bytes"] <= 16 * MiB
        assert disk(st)["rpo_seconds"] is not None
        dep.start("mt", "mt1")
        end = time.time()
        dep.wait_caught_up("src", end, timeout=120)
        assert subprocess.run(["cmp", dev, str(replica)]).returncode == 0
        assert disk(dep.status())["last_resync"] is None  # nothing was lost: no resync needed


def test_rpo_alert_when_points_stop(make_loop, tmp_path):
    from .test_faults import own_deployment

    dev = make_loop(32 * MiB, "source")
    with own_deployment(tmp_path / "deploy", cache_quota=1 << 30) as dep:
        dep.kill("ps", signal.SIGTERM)
        dep.set_ps_option(rpo_threshold=2.0)
        dep.start("ps")
        dep.enroll("mt", "mt1")
        dep.start("mt", "mt1")
        dep.enroll("agent", "src")
        dep.add_disk("src", "disk0", dev)
        dep.start("agent", "src")
        dep.wait_disks_known("src", 1)
        dep.wait_mt_connected("mt1")
        rdir = tmp_path / "replicas"
        rdir.mkdir()
        dep.admin().call("protect", machine="src", mt="mt1", format="raw", replica_dir=str(rdir), replicas={})
        dep.wait_caught_up("src", time.time(), timeout=60)
        assert disk(dep.status())["alerts"] == []
        dep.kill("mt-mt1", signal.SIGTERM)
        st = dep.wait_for(lambda s: disk(s)["alerts"], 30, "an RPO alert")
        assert "RPO" in disk(st)["alerts"][0]
        assert "ALERT: RPO" in dep.cli("status").stdout
        dep.wait_for(lambda s: "ALERT" in dep.log_text("ps"), 20, "the alert in the process server's log")
        dep.start("mt", "mt1")
        dep.wait_for(lambda s: not disk(s)["alerts"], 60, "the alert to clear once points arrive again")


def test_clean_restart_needs_no_resync_but_unclean_does(deployment, protected):
    dev, replica = protected("raw", 64 * MiB)
    deployment.wait_synced("src", timeout=60)
    deployment.wait_caught_up("src", time.time(), timeout=60)
    # Clean stop, no writes meanwhile: the clean-stop record is accepted.
    deployment.kill("agent-src", signal.SIGTERM)
    deployment.start("agent", "src")
    deployment.wait_caught_up("src", time.time(), timeout=60)
    assert disk(deployment.status())["last_resync"] is None
    assert "clean-stop record accepted" in deployment.log_text("agent-src")
    # Clean stop, then a write while no agent runs: the counters moved, so a resync with that reason.
    deployment.kill("agent-src", signal.SIGTERM)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        buf.write(b"x" * 4096)
        os.pwrite(fd, buf, 5 * MiB)
    finally:
        os.close(fd)
    deployment.start("agent", "src")
    st = deployment.wait_for(
        lambda s: (disk(s)["last_resync"] or {}).get("done_at"), 60, "a resync after writes while stopped"
    )
    assert "written while the agent was stopped" in disk(st)["last_resync"]["reason"]
    deployment.wait_caught_up("src", time.time(), timeout=60)
    assert subprocess.run(["cmp", dev, str(replica)]).returncode == 0
