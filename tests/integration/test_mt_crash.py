"""Promise 5: the master target survives kill -9 at any instant (issue 4's fault test).

A write-order workload runs on the source the whole time; the master target is killed with SIGKILL at
a random moment while it applies (undo append, replica write, sync, group end append — wherever it is),
then started again. After each restart applying is paused at a point and the listed recovery points are
materialised from the replica and the journal and judged against the source (the replica equals the
source after exactly the first N records for one N). A point seen before must still be listed after
every later crash and must give the same N (never lost, never altered); later points never go back.

Trials: STANDBY_MT_KILL_TRIALS (default 50; the long run uses more). Besides every new point, each trial
judges 10 older ones at random, and all of them every tenth trial (in a run of more than 100 trials, 100
of them every fiftieth: judging is linear in the write log, which keeps growing). Every tenth trial also
checks one point through the product path (`standby test-failover`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

from tests import writeorder
from tests.journalcheck import disk_key, walk_points

from .conftest import MiB
from .test_delta import start_workload, stop_workload

SLOTS = 1024  # 4 MiB of records
TRIALS = int(os.environ.get("STANDBY_MT_KILL_TRIALS", "50"))


def judge(image: bytes | bytearray, log: Path) -> int:
    v = writeorder.check(bytes(image[: SLOTS * writeorder.SLOT]), 0, SLOTS, log)
    assert v.consistent, v.to_json()
    assert v.cut_lo is not None
    return v.cut_lo


def test_master_target_survives_kill_9_during_apply(deployment, protected, tmp_path):
    dev, replica = protected("raw", 16 * MiB, fill=False, cut_interval=0.2)
    deployment.wait_synced("src", timeout=60)
    listed = deployment.admin().call("points", machine="src")["disks"][0]
    assert listed["disk"] == "disk0"
    disk_no = listed["disk_id"]
    log = tmp_path / "writes.log"
    proc = start_workload(dev, log, SLOTS, rate=300, seconds=max(600, TRIALS * 8))
    ready = time.time()  # points cut before the region was formatted are not judged (still never lost)
    rng = random.Random(int(os.environ.get("STANDBY_MT_KILL_SEED", "4")))
    known: dict[int, int] = {}  # point sequence -> N, as first judged
    rollbacks = 0
    key = uid = None
    early: set[int] = set()
    try:
        for trial in range(TRIALS):
            # Applying under a live workload: half the kills land in the catch-up burst right after a resume
            # (the master target busiest), half anywhere later.
            time.sleep(rng.uniform(0.0, 0.3) if trial % 2 else rng.uniform(0.05, 1.2))
            deployment.kill("mt-mt1", signal.SIGKILL)
            before = deployment.log_text("mt-mt1").count("rolled back the open group")
            deployment.start("mt", "mt1")
            deployment.wait_mt_connected("mt1")
            res = deployment.cli("pause", "src", "--wait", "60")
            assert res.returncode == 0, f"trial {trial}: {res.stdout} {res.stderr}"
            rollbacks += deployment.log_text("mt-mt1").count("rolled back the open group") - before
            listed = json.loads(deployment.cli("points", "src", "--json").stdout)["disks"][0]
            seqs = [p["sequence"] for p in listed["points"]]
            assert seqs, f"trial {trial}: no points listed"
            lost = (set(known) | early) - set(seqs)
            assert not lost, f"trial {trial}: points {sorted(lost)[:10]} were lost by the crash"
            if key is None:
                key, uid = disk_key(deployment.ps_dir, deployment.root / "mt-mt1", disk_no)
            image = bytearray(replica.read_bytes())
            # Every new point, and a sample of the older ones (all of them every tenth trial).
            early |= {p["sequence"] for p in listed["points"] if p["time"] < ready}
            seqs = [s for s in seqs if s not in early]
            new = {s for s in seqs if s not in known}
            old = [s for s in seqs if s in known]
            # All older points every tenth trial; in a long run (judging is linear in the write log, which
            # keeps growing) 100 of them every fiftieth instead.
            if TRIALS <= 100 and trial % 10 == 9:
                sample = set(old)
            else:
                many = 100 if trial % 50 == 49 or trial == TRIALS - 1 else 10
                sample = set(rng.sample(old, min(len(old), many)))
            want = new | sample
            if not want:
                assert deployment.cli("resume", "src").returncode == 0
                continue
            judged = 0
            prev_cut = None
            for seq, img in walk_points(deployment.retention_dir("mt1"), disk_no, key, uid, image, want,
                                        oldest=min(want)):
                cut = judge(img, log)
                if seq in known:
                    assert known[seq] == cut, f"trial {trial}: point {seq} changed from N={known[seq]} to N={cut}"
                known[seq] = cut
                if prev_cut is not None:
                    assert cut <= prev_cut, f"trial {trial}: point {seq} is newer than a later point"
                prev_cut = cut
                judged += 1
            assert judged == len(want), f"trial {trial}: judged {judged} of {len(want)} points"
            if trial % 10 == 9:
                pick = rng.choice(seqs)
                out = deployment.cli("test-failover", "src", "--point", str(pick), "--json")
                assert out.returncode == 0, out.stderr
                copy = Path(json.loads(out.stdout)["disks"][0]["path"])
                assert judge(copy.read_bytes(), log) == known[pick]
                assert deployment.cli("test-failover-cleanup", "src").returncode == 0
            assert deployment.cli("resume", "src").returncode == 0
    finally:
        stop_workload(proc)
        deployment.cli("resume", "src")
    print(f"kill -9 trials: {TRIALS}, points judged: {len(known)}, open groups rolled back: {rollbacks}")
    assert len(known) > TRIALS, "too few points were made to mean anything"
    # In the end everything catches up and the newest state is the source's.
    end = time.time()
    deployment.wait_caught_up("src", end, timeout=60)
    assert judge(replica.read_bytes(), log) == writeorder.WriteLog.read(log).last
