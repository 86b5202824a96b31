"""Issue 9's findings, each reproduced end to end with real daemons (each failed on commit 47f798a).

1. An epoch lost when the agent's connection is reset in the middle of a cut.
2. Apply groups of large incompressible writes (a file copy, fio bs=4M) over the frame limit: applying
   stopped without a word; the same for failovers over tens of MiB (and ≥ 1 GiB: see test_big_failover).
3. A cache quota smaller than the churn: livelock, sequence-gap disconnects, points that lied.
4. A damaged acknowledged last cache record cut off as a torn tail; the replica waited for it for ever.
5. Poisoned values from an enrolled peer: tasks died, start-up crashed, SQLite got junk.
7. Errors that outlived their cause; a slow SIGTERM without a clean-stop record; a retention volume too
   small for one journal segment. (6 is in test_exposure.py; the tampered batch and the damaged segment
   in test_tamper.py; scripts writable by others in tests/agent/test_freeze.py.)

Each test states the oracle it uses: source == replica after catch-up (byte for byte), the write-order
checker for points, and the daemons' own status and logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from standby.proto.frames import HEADER_SIZE, scan_records
from tests import writeorder
from tests.conftest import needs_loop
from tests.deploy import LocalDeployment
from tests.tools import need, needs

from .conftest import MiB
from .test_delta import disk, start_workload, stop_workload

pytestmark = [needs_loop]


def burst(dev: str, total: int, chunk: int, seed: int, region: tuple[int, int], direct: bool = True) -> None:
    """`total` bytes of random (incompressible) writes of `chunk` bytes at random offsets in `region`,
    with O_DIRECT by default: each write reaches the device (and the change tracker) at once, as fio's
    do, instead of waiting in the page cache for a flush."""
    import mmap
    import random

    rng = random.Random(seed)
    lo, hi = region
    fd = os.open(dev, os.O_WRONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    try:
        for _ in range(total // chunk):
            off = lo + rng.randrange(0, (hi - lo - chunk) // 4096 + 1) * 4096
            buf[:] = os.urandom(chunk)
            os.pwrite(fd, buf, off)
        os.fsync(fd)
    finally:
        buf.close()
        os.close(fd)


def same(a: str | Path, b: str | Path, size: int) -> int:
    """How many 4 KiB blocks differ between two images (0: identical)."""
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for _ in range(0, size, MiB):
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                n += sum(1 for i in range(0, len(x), 4096) if x[i : i + 4096] != y[i : i + 4096])
    return n


def reset_connections(dep: LocalDeployment) -> str:
    """Reset every TCP connection to the process server's port (agent, master target, admin), as a
    network failure would: `ss -K` sends RSTs to both ends."""
    need("ss")
    res = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{dep.port}"], capture_output=True,
                         text=True, timeout=10)
    return res.stdout


# -- 1 --------------------------------------------------------------------------------------------------
@needs("ss")
def test_an_epoch_survives_a_connection_reset_in_the_middle_of_a_cut(deployment, protected):
    """The finding's reproduction: batch_size 1M, a 150 MiB burst of random writes, the connections reset
    0.3 s later; after a point newer than the last write the replica must equal the source. On 47f798a 4
    of 4 trials lost 7,936-16,384 blocks while status said up to date with a fresh point."""
    size = 320 * MiB
    dev, replica = protected("raw", size, fill=False, batch="1M")
    deployment.wait_synced("src", timeout=120)
    for trial in range(3):
        t0 = time.monotonic()
        import threading

        writer = threading.Thread(target=burst, args=(dev, 150 * MiB, 1 * MiB, trial, (0, size)))
        writer.start()
        time.sleep(0.3)
        reset_connections(deployment)  # the finding's moment; then a few more while the burst is shipped
        for _ in range(3):
            time.sleep(0.7)
            reset_connections(deployment)
        writer.join(timeout=120)
        end = time.time()
        deployment.wait_caught_up("src", end, timeout=180)
        differ = same(dev, replica, size)
        assert differ == 0, f"trial {trial}: {differ} blocks differ after a point newer than the last write"
        d = disk(deployment.status())
        assert d["last_resync"] is None, f"trial {trial}: nothing was lost, no resync was needed: {d['last_resync']}"
        print(f"trial {trial}: caught up {time.monotonic() - t0:.1f} s after the burst began")


# -- 2 --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def mounted(dev: str, where: Path) -> Iterator[Path]:
    need("mkfs.ext4")
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", dev, str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


@needs("mkfs.ext4", "e2fsck")
def test_a_file_copy_with_large_writes_is_applied(deployment, protected, tmp_path):
    """mkfs.ext4 + mount + copy 20 MiB of incompressible files onto a freshly synced 512 MiB disk, then
    4 MiB random writes: apply groups whose old contents are far over the 32 MiB frame limit. On
    47f798a the master target's apply task died and status kept saying `applying: running`."""
    size = 512 * MiB
    dev, replica = protected("vmdk", size, batch="8M")  # filled with mixed data: old contents that matter
    deployment.wait_synced("src", timeout=120)
    with mounted(dev, tmp_path / "mnt") as mnt:
        for i in range(10):
            (mnt / f"file{i}").write_bytes(os.urandom(2 * MiB))
        subprocess.run(["sync"], check=True)
    end = time.time()
    deployment.wait_caught_up("src", end, timeout=180)
    burst(dev, 96 * MiB, 4 * MiB, 5, (0, size))  # fio bs=4M of random data, as in the finding
    end = time.time()
    d = disk(deployment.wait_caught_up("src", end, timeout=180))
    assert d["error"] is None and d["applying"] == "running", d
    assert "frame limit" not in deployment.log_text("mt-mt1") and "Traceback" not in deployment.log_text("mt-mt1")
    flat = replica.with_name(replica.stem + "-flat.vmdk")
    assert same(dev, flat, size) == 0
    subprocess.run(["e2fsck", "-fn", dev], check=True, capture_output=True)


# -- 3 --------------------------------------------------------------------------------------------------
SLOTS = 1024  # 4 MiB of write-order records at the start of the disk


def test_replication_converges_under_a_cache_quota_smaller_than_the_churn(make_loop, tmp_path):
    """A 48 MiB cache quota and a churn of random writes far above what the master target drains in the
    meantime: on 47f798a the agent re-sent its whole dirty map for ever (0 points/min), BUSY during the
    initial copy closed the session for a 'sequence gap', and points labelled crash-consistent differed
    from the source. Now: no gap, and once the churn stops everything is applied and the replica equals
    the source; every point made under pressure is judged by the write-order records."""
    from tests.journalcheck import disk_key, walk_points

    size = 256 * MiB
    dev = make_loop(size, "source")
    burst(dev, 128 * MiB, 1 * MiB, 1, (SLOTS * 4096, size))
    dep = LocalDeployment(tmp_path / "deploy", cache_quota=48 * MiB)
    dep.init()
    dep.start("ps")
    try:
        dep.enroll("mt", "mt1")
        dep.start("mt", "mt1")
        dep.enroll("agent", "src")
        dep.add_disk("src", "disk0", dev)
        dep.set_agent_option("src", batch_size="1M", cut_interval=0.2)
        dep.start("agent", "src")
        dep.wait_disks_known("src", 1)
        dep.wait_mt_connected("mt1")
        (tmp_path / "replicas").mkdir()
        res = dep.admin().call("protect", machine="src", mt="mt1", format="raw", replica_dir=str(tmp_path / "replicas"),
                               replicas={})
        replica = Path(res["disks"][0]["replica"])
        dep.wait_synced("src", timeout=240)  # the initial copy (128 MiB of random data) goes through the quota
        log = tmp_path / "writes.log"
        proc = start_workload(dev, log, SLOTS, rate=200, seconds=120)
        ready = time.time()  # the region is formatted: points from here on are judged
        try:
            # 24 s of incompressible churn at about 24 MB/s; for the first 10 s the master target is frozen, so
            # the cache fills up to its quota and the agent is refused (BUSY) while the churn goes on.
            mt = dep.procs["mt-mt1"].pid
            os.kill(mt, signal.SIGSTOP)
            t_churn = time.monotonic()
            i = 0
            try:
                while time.monotonic() - t_churn < 24:
                    burst(dev, 6 * MiB, 1 * MiB, 100 + i, (SLOTS * 4096, size))
                    i += 1
                    time.sleep(max(0.0, t_churn + i * 0.25 - time.monotonic()))
                    if i == 40:
                        during = disk(dep.status())
                        assert during["cache_bytes"] <= 48 * MiB and "busy" in dep.log_text("agent-src"), during
                        os.kill(mt, signal.SIGCONT)
            finally:
                os.kill(mt, signal.SIGCONT)
            churn_s = time.monotonic() - t_churn
        finally:
            stop_workload(proc)
        stopped = time.monotonic()
        end = time.time()
        d = disk(dep.wait_caught_up("src", end, timeout=300))
        catch_up = time.monotonic() - stopped
        listed_now = json.loads(dep.cli("points", "src", "--json").stdout)["disks"][0]["points"]
        print(f"cache quota 48 MiB: churn {i * 6} MiB in {churn_s:.1f} s (master target frozen the first 10 s); "
              f"caught up {catch_up:.1f} s after it stopped; dirty while refused: {during.get('dirty_bytes')} "
              f"bytes; points listed: {len(listed_now)}")
        assert "sequence gap" not in dep.log_text("ps")
        assert d["last_resync"] is None, d["last_resync"]  # nothing was lost: no resync was needed
        assert same(dev, replica, size) == 0
        # Every point made under back-pressure equals the source at one cut of the write-order records.
        assert dep.cli("pause", "src", "--wait", "60").returncode == 0
        listed = json.loads(dep.cli("points", "src", "--json").stdout)["disks"][0]
        key, uid = disk_key(dep.ps_dir, dep.root / "mt-mt1", listed["disk_id"])
        image = bytearray(replica.read_bytes())
        want = {p["sequence"] for p in listed["points"] if p["time"] >= ready}
        judged = 0
        for seq, img in walk_points(dep.retention_dir("mt1"), listed["disk_id"], key, uid, image, want):
            v = writeorder.check(bytes(img[: SLOTS * 4096]), 0, SLOTS, log)
            assert v.consistent, f"point {seq}: {v.to_json()}"
            judged += 1
        assert judged == len(want) and judged > 0
    finally:
        dep.stop_all()


# -- 4 --------------------------------------------------------------------------------------------------
def test_a_damaged_acknowledged_last_record_is_resynced_not_waited_for(deployment, protected):
    """On 47f798a the damaged last record was cut off as 'never acknowledged' although the agent had been
    told it was durable (and forgot the blocks); the master target then waited for it for ever with no
    error. Now: the damage is reported, the records are set aside, the disk resyncs by itself."""
    size = 64 * MiB
    dev, replica = protected("raw", size, fill=False, batch="1M")
    deployment.wait_synced("src", timeout=60)
    deployment.kill("mt-mt1", signal.SIGKILL)  # nothing is applied: the new records stay in the cache
    burst(dev, 8 * MiB, 1 * MiB, 3, (0, size))
    end = time.time()
    deployment.wait_for(lambda s: (disk(s)["dirty_bytes"] == 0 and disk(s)["backlog_records"] > 3), 60,
                        "the changes to be acknowledged by the process server")
    deployment.kill("agent-src", signal.SIGTERM)
    deployment.kill("ps", signal.SIGKILL)
    segs = sorted((deployment.ps_dir / "cache").glob("disk-*/seg-*.log"))
    data = bytearray(segs[-1].read_bytes())
    recs, _, problem = scan_records(bytes(data))
    assert problem is None and recs
    last = recs[-1]
    data[last.offset + HEADER_SIZE + (last.end - last.offset - HEADER_SIZE) // 2] ^= 0xFF
    segs[-1].write_bytes(bytes(data))
    db = sqlite3.connect(deployment.ps_dir / "registry.sqlite")
    (acked,) = db.execute("SELECT received_seq FROM disks").fetchone()
    db.close()
    assert acked == last.header.sequence, "test set-up: the damaged record had been acknowledged"
    deployment.start("ps")
    d = disk(deployment.status())
    assert d["error"] and "damaged" in d["error"], d
    assert d["resync_requested"] is not None, d
    deployment.start("mt", "mt1")
    deployment.start("agent", "src")
    st = deployment.wait_caught_up("src", max(end, time.time()), timeout=180)
    assert disk(st)["last_resync"] and "damaged" in disk(st)["last_resync"]["reason"], disk(st)["last_resync"]
    assert not disk(st)["error"], disk(st)
    assert same(dev, replica, size) == 0
    # It pulls again once, learns the lost records are passed over, and goes on: no loop.
    assert deployment.log_text("mt-mt1").count("pulling again") <= 2, deployment.log_text("mt-mt1")[-3000:]


# -- 7 --------------------------------------------------------------------------------------------------
def test_an_error_clears_with_its_cause_and_stays_listed_with_its_times(deployment, protected):
    """A master target that is gone while records wait: status says `stalled` (with why) within the
    watchdog's 30 s, never `running`; once it is back and applies, the error is gone from `error` and
    listed under `cleared` with when it began and ended. On 47f798a errors stayed after their cause."""
    dev, _ = protected("raw", 32 * MiB, fill=False)
    deployment.wait_synced("src", timeout=60)
    deployment.kill("mt-mt1", signal.SIGKILL)
    burst(dev, 4 * MiB, 64 * 1024, 4, (0, 32 * MiB))
    st = deployment.wait_for(lambda s: "stalled" in (disk(s)["error"] or ""), 60, "the watchdog to say stalled")
    d = disk(st)
    assert "not connected" in d["error"] and d["applying"] in ("stopped", "stalled"), d
    deployment.start("mt", "mt1")
    st = deployment.wait_caught_up("src", time.time(), timeout=60)
    d = disk(st)
    assert d["error"] is None and d["applying"] == "running", d
    [c] = [c for c in d["cleared"] if c["key"] == "stalled"]
    assert c["since"] < c["cleared_at"] <= time.time()
    assert "cleared" in deployment.cli("status").stdout


def test_sigterm_under_load_stops_the_agent_quickly_and_cleanly(deployment, protected):
    """On 47f798a an agent under load took 80 s to exit on SIGTERM and wrote no clean-stop record, so its
    next start resynced. Now it stops promptly while it ships a large backlog, records its dirty map
    (what was not acknowledged included), and the restart trusts the record: no resync, nothing lost."""
    size = 512 * MiB
    dev, replica = protected("raw", size, fill=False, batch="8M")
    deployment.wait_synced("src", timeout=120)
    burst(dev, 256 * MiB, 4 * MiB, 9, (0, size))  # a large backlog, then SIGTERM while it is shipped
    proc = deployment.procs.pop("agent-src")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the agent did not stop within 60 s of SIGTERM") from None
    took = time.monotonic() - t0
    print(f"agent stopped {took:.1f} s after SIGTERM while shipping a 256 MiB backlog")
    assert proc.returncode == 0, proc.returncode
    assert (deployment.root / "agent-src" / "disks" / "disk0.clean-stop.json").exists(), (
        deployment.log_text("agent-src")[-3000:])
    assert took < 30, f"the agent took {took:.1f} s to stop"
    deployment.start("agent", "src")
    d = disk(deployment.wait_caught_up("src", time.time(), timeout=180))
    assert "clean-stop record accepted" in deployment.log_text("agent-src")
    assert d["last_resync"] is None, d["last_resync"]
    assert same(dev, replica, size) == 0


@needs("mkfs.ext4")
def test_a_small_retention_volume_prunes_instead_of_filling(make_loop, tmp_path):
    """A 64 MiB retention volume: with the default 64 MiB journal segment nothing could ever be pruned
    (pruning frees whole segments, never the newest) and applying stopped when it filled. Now segments are
    a small part of the volume, the oldest points go first with an alert, and replication goes on."""
    vol = make_loop(64 * MiB, "retention")
    src = make_loop(128 * MiB, "source")
    dep = LocalDeployment(tmp_path / "deploy", cache_quota=1 << 30)
    dep.init()
    dep.start("ps")
    with mounted(vol, tmp_path / "deploy" / "retention-mt1"):
        try:
            dep.enroll("mt", "mt1")
            dep.set_mt_option("mt1", reserve="8M")
            dep.start("mt", "mt1")
            dep.enroll("agent", "src")
            dep.add_disk("src", "disk0", src)
            dep.set_agent_option("src", batch_size="1M", cut_interval=0.2)
            dep.start("agent", "src")
            dep.wait_disks_known("src", 1)
            dep.wait_mt_connected("mt1")
            (tmp_path / "replicas").mkdir()
            res = dep.admin().call("protect", machine="src", mt="mt1", format="raw",
                                   replica_dir=str(tmp_path / "replicas"), replicas={})
            replica = Path(res["disks"][0]["replica"])
            dep.wait_synced("src", timeout=120)
            for i in range(6):  # 6 x 32 MiB of incompressible churn: 3 times the volume in undo records
                burst(src, 32 * MiB, 1 * MiB, 20 + i, (0, 128 * MiB))
                time.sleep(1.0)
            end = time.time()
            d = disk(dep.wait_caught_up("src", end, timeout=240))
            assert d["error"] is None, d
            assert same(src, replica, 128 * MiB) == 0
            assert "space pressure" in dep.log_text("mt-mt1") or any("space" in a for a in d["alerts"]), (
                dep.log_text("mt-mt1")[-3000:])
            points = json.loads(dep.cli("points", "src", "--json").stdout)["disks"][0]["points"]
            assert points, "history was pruned to nothing: the newest points must stay"
        finally:
            dep.stop_all()
