"""The whole round trip, twice in a row (issue 12), with real daemons, loop devices and the write-order
checker: protect -> workload -> failover to a point -> commit -> workload on the recovered copy ->
reprotect to the original location (differences only) -> planned failback with sync before shutdown (the
agent's shutdown_script stops the workload) -> commit -> workload on the original -> reverse replication
(differences only) -> failover again.

Two sites on one machine: master target `mtdr` holds the replica file at the recovery site; `mthome` is the
original site's master target, writing into the original loop device. The recovered machine is a loop
device over the replica file with an agent of its own (`rec`). Each phase writes numbered records into a
region of its own (4 MiB each), so after every phase the live disk is checked region by region: the
regions of earlier phases hold the cut the phase ended at, the current one a consistent cut — and after a
planned failback exactly its last record (no data loss).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import needs_loop
from tests.deploy import LocalDeployment

from .roundtrip_sites import REGIONS, Phase, cli_json, failback, forward_failover, reprotect, reverse, trip, two_sites

pytestmark = [needs_loop]


@pytest.fixture
def sites(deployment: LocalDeployment, make_loop, tmp_path: Path):
    """Original disk (loop) protected by agent src into a raw replica at mtdr; mthome at the original site;
    agent rec enrolled (not started). Yields (original device, replica file, loops attached by the test to
    detach)."""
    with two_sites(deployment, make_loop, tmp_path) as (origs, replicas, loops):
        yield origs[0], replicas[0], loops


def test_round_trip_twice_in_a_row(deployment: LocalDeployment, sites, tmp_path: Path) -> None:
    orig, replica, loops = sites
    held: list[tuple[Phase, int]] = []  # each finished phase and the cut its region holds now
    region = 0
    for n in range(2):
        ph, cut = forward_failover(deployment, orig, replica, tmp_path, region)
        held.append((ph, cut))
        region += 1
        rec_dev, ph = reprotect(deployment, orig, replica, tmp_path, loops, region)
        for old, c in held:  # the recovered disk holds each earlier region at its cut
            assert old.check(rec_dev).cut == c
        if n == 0:
            check_test_failover_back_home(deployment, tmp_path, held, ph)
        r = failback(deployment, orig, rec_dev, ph)
        held.append((ph, ph.last))
        region += 1
        for old, c in held:
            assert old.check(orig).cut == c, f"round trip {n + 1}: region {old.index}"
        ph = reverse(deployment, orig, replica, rec_dev, loops, tmp_path, region)
        held.append((ph, ph.last))
        region += 1
        for old, c in held:
            assert old.check(str(replica)).cut == c
        t = trip(deployment)
        assert t["direction"] == "forward" and t["round_trips"] == n + 1, t
        phases = [h["phase"] for h in t["history"]]
        assert phases[-6:] == ["reprotecting", "synchronising", "shutting-down", "final-sync", "failed-back",
                               "reversing"], phases
        print(f"round trip {n + 1}: failback downtime {r['downtime_seconds']:.2f} s, "
              f"{r['bytes_after_shutdown']} bytes after the shutdown; history:")
        print("    write-order verdicts on the live disk, region: cut of records (last written): "
              + ", ".join(f"{old.index}: {old.check(orig).cut} ({old.last})" for old, _ in held))
        for h in t["history"][-6:]:
            took = (h["ended"] or time.time()) - h["started"]
            print(f"    {h['phase']:<14} {took:7.2f} s {h['bytes'] or 0:>10} bytes  {h['detail']}")
    assert region <= REGIONS
    status = deployment.cli("status", "src").stdout
    assert "round-trip direction:forward (src) phase:reversing state:protected round-trips-done:2" in status, status
    assert "no data loss (checked)" in status, status


def check_test_failover_back_home(dep: LocalDeployment, tmp: Path, held: list[tuple[Phase, int]], ph: Phase) -> None:
    """Test failover works in the reverse direction too: a copy of the original site's newest point, taken
    while the recovered machine goes on replicating back, holds every earlier region at its cut and the
    running workload's region at one cut."""
    (tmp / "tf").mkdir()
    dep.wait_caught_up("rec", time.time(), timeout=60)  # a point made after the comparison ended
    out = cli_json(dep, "test-failover", "src", "--point", "latest-processed", "--dir", str(tmp / "tf"))
    [d] = out["disks"]
    for old, c in held:
        assert old.check(d["path"]).cut == c
    v = ph.check(d["path"])
    assert v.consistent and v.cut is not None and v.cut <= ph.last, v.to_json()
    assert ph.proc.poll() is None, "the recovered machine's workload goes on"
    cli_json(dep, "test-failover-cleanup", "src")
    assert not Path(d["path"]).exists()
