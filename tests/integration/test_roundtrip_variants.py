"""The round trip's other ways (issue 12), beside the basic one test_roundtrip.py runs twice: reprotect to an
alternate location with a full download at failback; failbacks cancelled (before the shutdown step, and
during a full download after it) and started again; every refusal of reprotect, failback and reverse, each
before any change; a clone of the original agent's identity on the recovered disks, refused at the door;
and a machine with two disks, which moves as one.

The same two sites on one machine as test_roundtrip.py (tests/integration/roundtrip_sites.py). Every
catch-up is checked by comparing the disks byte for byte and with the write-order checker: a region of
the live disk holds a consistent cut of the records its phase wrote, and after a planned failback exactly
the last record (no data loss).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_loop
from tests.deploy import LocalDeployment
from tests.tools import need

from .roundtrip_sites import (
    SIZE,
    Phase,
    attach,
    cli_json,
    complete_failback,
    failback,
    forward_failover,
    reprotect,
    reverse,
    same,
    set_disk_path,
    start_recovered,
    trip,
    two_sites,
    wait_state,
    wire,
)

pytestmark = [needs_loop]


@pytest.fixture
def sites(deployment: LocalDeployment, make_loop, tmp_path: Path):
    """One original disk protected into a raw replica at mtdr (see roundtrip_sites.two_sites)."""
    with two_sites(deployment, make_loop, tmp_path) as (origs, replicas, loops):
        yield origs[0], replicas[0], loops


@pytest.fixture
def sites2(deployment: LocalDeployment, make_loop, tmp_path: Path):
    """The same with two original disks, disk0 and disk1."""
    with two_sites(deployment, make_loop, tmp_path, disks=2) as built:
        yield built


@contextmanager
def frozen(dep: LocalDeployment, key: str) -> Iterator[None]:
    """A daemon frozen (SIGSTOP) for a while: a copy it must apply stays unfinished, for certain, however fast
    the machine; it goes on where it was at SIGCONT."""
    pid = dep.procs[key].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def trip_state_has(dep: LocalDeployment, words: str, timeout: float = 60) -> dict[str, Any]:
    dep.wait_for(lambda s: any(t["name"] == "src" and words in t["state"] for t in s["roundtrips"]), timeout,
                 f"round trip state with {words!r}")
    return trip(dep)


def received(dep: LocalDeployment, machine: str) -> int:
    return sum(d["bytes_received"] for d in dep.status()["disks"] if d["machine"] == machine)


def phases(dep: LocalDeployment) -> list[str]:
    return [h["phase"] for h in trip(dep)["history"]]


def test_alternate_location_with_full_download(deployment: LocalDeployment, sites, tmp_path: Path) -> None:
    """The original disk is lost: reprotect into a new replica file (a full copy), fail back with a full
    download (the workload stops first, every block is copied), complete with no data loss, commit, and
    reverse into the recovery site's replica by differences only."""
    dep = deployment
    orig, replica, loops = sites
    first, cut = forward_failover(dep, orig, replica, tmp_path, 0)
    dep.kill("agent-src", 15)
    rec_dev = start_recovered(dep, [replica], tmp_path, loops)[0]
    ph = Phase(tmp_path, 1, rec_dev)
    home = tmp_path / "home"
    home.mkdir()
    new = home / "src-disk0.img"
    out = cli_json(dep, "reprotect", "src", "--agent", "rec", "--mt", "mthome", "--location", "alternate",
                   "--replica-dir", str(home), "--format", "raw")
    assert out["mode"] == "full" and out["disks"] == [{"disk": "disk0", "replica": str(new)}], out
    t = wait_state(dep, "ready to fail back")
    assert t["location"] == "alternate" and "alternate location, full" in t["history"][-1]["detail"], t

    got0 = received(dep, "rec")
    with frozen(dep, "mt-mthome"):  # the copy cannot finish while the test looks at it
        stopped, wire0 = time.time(), wire(dep, "rec")
        out = cli_json(dep, "failback", "src", "--sync", "full")
        assert out["phase"] == "synchronising" and "every block" in out["message"], out
        ph.proc.wait(timeout=10)  # the shutdown step came first: the workload stopped
        t = trip_state_has(dep, "(full download)")
        assert t["state"].startswith("synchronising"), t
        res = dep.cli("failback", "src", "--complete")
        assert res.returncode == 1 and "not ready to fail back" in res.stderr, (res.returncode, res.stderr)
    wait_state(dep, "synchronising: ready to complete", timeout=120)
    assert received(dep, "rec") - got0 >= SIZE, "a full download copies every block"
    completing = time.time()
    done = cli_json(dep, "failback", "src", "--complete")
    assert done["result"]["no_data_loss"], done
    # A full download's downtime and bytes count from its shutdown, which came before the copy.
    assert done["result"]["downtime_seconds"] >= completing - stopped, (done["result"], completing - stopped)
    assert done["result"]["bytes_after_shutdown"] >= 0.9 * (wire(dep, "rec") - wire0), done["result"]
    last = ph.last
    v = ph.check(str(new))
    assert v.consistent and v.cut == last, f"the new replica must hold the last write {last}: {v.to_json()}"
    assert first.check(str(new)).cut == cut
    assert same(str(new), rec_dev)
    cli_json(dep, "commit", "src")

    # The original machine runs from the new disk now; reverse replication compares, ships differences.
    new_dev = attach(new)
    loops.append(new_dev)
    assert set_disk_path(dep, "src", new_dev)
    back = reverse(dep, new_dev, replica, rec_dev, loops, tmp_path, 2)
    for p, c in ((first, cut), (ph, last), (back, back.last)):
        assert p.check(str(replica)).cut == c
    assert phases(dep)[-7:] == ["reprotecting", "shutting-down", "synchronising", "shutting-down", "final-sync",
                                "failed-back", "reversing"], phases(dep)


def test_cancelled_failbacks_and_started_again(deployment: LocalDeployment, sites, tmp_path: Path) -> None:
    """A failback cancelled before the shutdown step changes only the phase (the workload runs and
    replicates on); one cancelled during a full download's copy starts the workload again (start_script) and
    says the original disk is inconsistent; a failback started again completes with no data loss."""
    dep = deployment
    orig, replica, loops = sites
    first, cut = forward_failover(dep, orig, replica, tmp_path, 0)
    marker = tmp_path / "workload-started"
    start = tmp_path / "start-workload"
    start.write_text(f"#!/bin/sh\necho \"started ($STANDBY_PHASE)\" > {marker}\n")
    start.chmod(0o700)
    dep.set_agent_option("rec", start_script=str(start))
    rec_dev, ph = reprotect(dep, orig, replica, tmp_path, loops, 1)

    assert cli_json(dep, "failback", "src")["phase"] == "synchronising"
    res = dep.cli("failback", "src", "--cancel")
    assert res.returncode == 0 and "cancelled" in res.stdout and "inconsistent" not in res.stdout, res
    assert trip(dep)["phase"] == "reprotecting" and ph.proc.poll() is None, "the workload still runs"
    before = received(dep, "rec")
    dep.wait_caught_up("rec", time.time(), timeout=60)  # and replicates: a newer point is applied
    assert received(dep, "rec") > before and not marker.exists()

    with frozen(dep, "mt-mthome"):
        cli_json(dep, "failback", "src", "--sync", "full")
        ph.proc.wait(timeout=10)  # stopped by the shutdown step
        trip_state_has(dep, "(full download)")
        res = dep.cli("failback", "src", "--cancel")
        assert res.returncode == 0, res.stderr
        assert "the original disks are inconsistent (disk0" in res.stdout, res.stdout
        assert "the workload was started again" in res.stdout, res.stdout
        assert marker.read_text().startswith("started"), "start_script ran"
        assert trip(dep)["phase"] == "reprotecting"
    wait_state(dep, "ready to fail back", timeout=120)  # the copy went on while rec replicates

    again = Phase(tmp_path, 2, rec_dev)  # the workload, started again
    failback(dep, orig, rec_dev, again)
    for p, c in ((first, cut), (ph, ph.last), (again, again.last)):
        assert p.check(orig).cut == c, f"region {p.index}"
    assert phases(dep)[-10:] == ["reprotecting", "synchronising", "reprotecting", "shutting-down", "synchronising",
                                 "reprotecting", "synchronising", "shutting-down", "final-sync", "failed-back"]


def snapshot(dep: LocalDeployment) -> Any:
    """What a refused command must leave as it was: the round trips with their history, and src's disks
    (forward protection: state, master target, replica)."""
    s = dep.status()
    disks = [(d["disk"], d["replication"], d["mt"], d["replica"]) for d in s["disks"] if d["machine"] == "src"]
    return s["roundtrips"], disks


def digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def refused(dep: LocalDeployment, code: int, words: str, *args: str) -> None:
    before = snapshot(dep)
    res = dep.cli(*args)
    assert res.returncode == code and words in res.stderr, f"{args}: exit {res.returncode}: {res.stderr}"
    assert snapshot(dep) == before, f"{args} changed something"


@contextmanager
def mounted(dev: str, where: Path) -> Iterator[None]:
    need("mkfs.ext4")
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    where.mkdir()
    subprocess.run(["mount", dev, str(where)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


def test_refusals_change_nothing(deployment: LocalDeployment, sites, make_loop, tmp_path: Path) -> None:
    """Each refusal answers with the README's exit code and the reason, and leaves status, history and the
    forward replica as they were; the round trip then goes on as usual."""
    dep = deployment
    orig, replica, loops = sites
    rp = ("reprotect", "src", "--mt", "mthome")
    refused(dep, 1, "reprotect follows a committed failover", *rp, "--agent", "rec")
    refused(dep, 1, "run standby reprotect first", "failback", "src")
    refused(dep, 1, "run standby reprotect first", "reverse", "src")
    first, cut = forward_failover(dep, orig, replica, tmp_path, 0, commit=False)
    refused(dep, 1, "src: disk0 FailedOver", *rp, "--agent", "rec")
    cli_json(dep, "commit", "src")
    rec_dev = start_recovered(dep, [replica], tmp_path, loops)[0]
    kept = digest(replica)
    refused(dep, 1, "src's agent is connected", *rp, "--agent", "rec")
    dep.kill("agent-src", 15)
    refused(dep, 2, "its own agent identity", *rp, "--agent", "src")
    refused(dep, 2, "does not exist", *rp, "--agent", "rec", "--replica", "disk0=/dev/standby-no-such-disk")
    smaller = make_loop(SIZE // 2, "smaller")
    refused(dep, 2, "smaller than", *rp, "--agent", "rec", "--replica", f"disk0={smaller}")
    busy = make_loop(SIZE, "busy")
    with mounted(busy, tmp_path / "mnt"):
        refused(dep, 1, "in use", *rp, "--agent", "rec", "--replica", f"disk0={busy}")
    assert digest(replica) == kept, "the forward replica is intact"
    assert first.check(rec_dev).cut == cut

    ph = Phase(tmp_path, 1, rec_dev)
    cli_json(dep, *rp, "--agent", "rec")
    wait_state(dep, "ready to fail back")  # (status changes while the comparison runs)
    refused(dep, 2, "is already protected", *rp, "--agent", "rec")
    refused(dep, 1, "follows a committed failback", "reverse", "src")
    complete_failback(dep, orig, rec_dev, ph)  # refuses --complete before a start first
    refused(dep, 1, "follows a committed failback", "reverse", "src")
    cli_json(dep, "commit", "src")
    refused(dep, 1, "still runs", "reverse", "src")
    back = reverse(dep, orig, replica, rec_dev, loops, tmp_path, 2)
    for p, c in ((first, cut), (ph, ph.last), (back, back.last)):
        assert p.check(str(replica)).cut == c

    # The next round trip: rec, set aside by reverse, is let in only by a reprotect that goes ahead.
    forward_failover(dep, orig, replica, tmp_path, 3)
    dep.kill("agent-src", 15)
    start_recovered(dep, [replica], tmp_path, loops)
    refused(dep, 2, "does not exist", *rp, "--agent", "rec", "--replica", "disk0=/dev/standby-no-such-disk")
    refused(dep, 1, "rec is set aside", "protect", "rec", "--mt", "mtdr", "--replica", "disk0=/nonexistent/r.img")
    cli_json(dep, *rp, "--agent", "rec")
    wait_state(dep, "ready to fail back")


def test_clone_of_the_original_agent_is_set_aside(deployment: LocalDeployment, sites, tmp_path: Path) -> None:
    """A copy of src's identity and state on the recovered machine (as a cloned VM has) starts while rec
    reprotects: refused at the door, and nothing of it reaches the original disk."""
    dep = deployment
    orig, replica, loops = sites
    first, cut = forward_failover(dep, orig, replica, tmp_path, 0)
    dep.kill("agent-src", 15)
    rec_dev = start_recovered(dep, [replica], tmp_path, loops)[0]
    ph = Phase(tmp_path, 1, rec_dev)
    cli_json(dep, "reprotect", "src", "--agent", "rec", "--mt", "mthome")
    shutil.copytree(dep.root / "agent-src", dep.root / "agent-clone", symlinks=True)
    assert set_disk_path(dep, "clone", rec_dev)
    dep.start("agent", "clone")  # stopped by the fixture's stop_all, as every agent
    try:
        dep.wait_for(lambda s: "refused: agent src is set aside" in dep.log_text("ps"), 30, "the clone refused")
        assert "set aside" in dep.log_text("agent-clone")
        wait_state(dep, "ready to fail back")
        failback(dep, orig, rec_dev, ph)
    finally:
        dep.kill("agent-clone", 15)
    for p, c in ((first, cut), (ph, ph.last)):
        assert p.check(orig).cut == c, f"region {p.index}"


def both(phs: list[Phase], devs: list[str]) -> None:
    """Each disk's workload has stopped and the disk holds its last record."""
    for p, dev in zip(phs, devs, strict=True):
        v = p.check(dev)
        assert v.consistent and v.cut == p.last, f"{dev}: {v.to_json()}"


def workloads(tmp: Path, index: int, devs: list[str]) -> list[Phase]:
    """One workload a disk; workload.pid names them all (the shutdown script stops every one)."""
    phs = [Phase(tmp, index, dev, f"-disk{n}") for n, dev in enumerate(devs)]
    (tmp / "workload.pid").write_text("".join(p.pidfile.read_text() for p in phs))
    return phs


def test_two_disks_move_together(deployment: LocalDeployment, sites2, tmp_path: Path) -> None:
    """A machine with two disks: failover, reprotect, failback (a final point on each), commit and reverse
    move both at once; after each phase both disks hold their workload's last record and equal their copy."""
    dep = deployment
    origs, replicas, loops = sites2
    reps = [str(r) for r in replicas]
    phs = workloads(tmp_path, 0, origs)
    time.sleep(1.0)
    for p in phs:
        p.stop()
    dep.wait_caught_up("src", time.time())
    cli_json(dep, "failover", "src", "--point", "latest")
    cli_json(dep, "commit", "src")
    both(phs, reps)
    assert all(same(o, r) for o, r in zip(origs, reps, strict=True))

    dep.kill("agent-src", 15)
    rec_devs = start_recovered(dep, replicas, tmp_path, loops)
    phs = workloads(tmp_path, 1, rec_devs)
    out = cli_json(dep, "reprotect", "src", "--agent", "rec", "--mt", "mthome")
    assert sorted(out["disks"], key=lambda d: d["disk"]) == [{"disk": f"disk{n}", "replica": o}
                                                             for n, o in enumerate(origs)], out
    wait_state(dep, "ready to fail back")
    cli_json(dep, "failback", "src")
    wait_state(dep, "synchronising: ready to complete", timeout=120)
    r = cli_json(dep, "failback", "src", "--complete")["result"]
    assert r["no_data_loss"] and sorted(f["disk"] for f in r["final"]) == ["disk0", "disk1"], r
    assert sorted(d["disk"] for d in r["failover"]) == ["disk0", "disk1"], r
    for p in phs:
        p.proc.wait(timeout=10)
    both(phs, origs)
    assert all(same(o, d) for o, d in zip(origs, rec_devs, strict=True))
    cli_json(dep, "commit", "src")
    rec = sorted(d["replication"] for d in dep.status()["disks"] if d["machine"] == "rec")
    assert rec == ["Committed", "Committed"], rec

    dep.kill("agent-rec", 15)
    for dev in rec_devs:
        subprocess.run(["losetup", "-d", dev], check=True)
        loops.remove(dev)
    dep.start("agent", "src")
    phs = workloads(tmp_path, 2, origs)
    out = cli_json(dep, "reverse", "src")
    assert sorted(d["replica"] for d in out["disks"]) == reps, out
    wait_state(dep, "protected")
    for p in phs:
        p.stop()
    dep.wait_caught_up("src", time.time())
    both(phs, reps)
    assert all(same(o, r) for o, r in zip(origs, reps, strict=True))
