"""kill -9 of each daemon during the round trip (issue 12): during reprotect synchronisation and during the
final sync of a planned failback. No data loss: the reprotect completes by itself once the daemon is back
(the original disk equals the recovered one, the workload's region consistent), and the failback, completed
again by the operator, reports its final point after the last write (the original disk holds exactly the
last record the workload wrote).

The two-site set-up is tests/integration/test_roundtrip.py's (its helpers are imported, not copied): master
target `mtdr` at the recovery site, `mthome` writing into the original loop device, the recovered machine a
loop device over the replica with agent `rec`. The victims: the process server (`ps`), the original site's
master target (`mt-mthome`), the recovered machine's agent (`agent-rec`).

When the kill lands: reprotect — while status says "reprotecting NN %" with NN < 100 (the recovered machine
rewrote most of a 1 GiB disk, so the copy takes seconds); final sync — while the phase is shutting-down
(the shutdown script holds HOLD seconds after stopping the workload) or final-sync (the process server's
fail point ps.final_sync holds there, each disk held at its final point; STANDBY_FAILPOINTS arms it in
every daemon of the deployment, only the process server has it). When the original site's master target
is the victim, the test waits until more records than status calls caught up are waiting before starting
it again (an operator who takes a while): they must drain, not stay behind the failed attempt's hold.
Every case asserts that its kill landed in that window (a kill that missed would prove nothing).

Figures (DESIGN §13): STANDBY_ROUNDTRIP_FAULT_TRIALS=N runs every case N times (default 1: the whole file
in about four minutes); STANDBY_ROUNDTRIP_FAULTS_REPORT=PATH appends one JSON line per trial there (case,
victim, when the kill landed, how the CLI answered, the recovery's times, records lost).
"""

from __future__ import annotations

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

from standby.admin.localdeploy import command
from standby.processserver.tripstatus import CAUGHT_UP_RECORDS
from tests.conftest import needs_loop
from tests.deploy import LocalDeployment
from tests.integration import conftest as integration
from tests.integration.roundtrip_sites import (
    SLOTS,
    Phase,
    attach,
    cli_json,
    forward_failover,
    reprotect,
    same,
    stop_script,
    tear_down,
    trip,
    wait_state,
)

pytestmark = [needs_loop]
MiB = integration.MiB
deployment = integration.deployment  # the integration tests' fixture: a real deployment, its logs at teardown

VICTIMS = {"ps": ("ps", ""), "mt-mthome": ("mt", "mthome"), "agent-rec": ("agent", "rec")}
HOLD = 2.0  # seconds the shutdown script holds after the workload stopped: the shutting-down window
BIG = 1024 * MiB  # reprotect: the recovered machine rewrites most of it, so the copy takes seconds (384 MiB
# took 2 s once the resync hashed with O_DIRECT: the reprotect often ended before the test could kill)
SMALL = 64 * MiB  # failback: test_roundtrip's size (its reprotect helper checks differences against it)
CLI_LIMIT = 300.0  # an answer well before this, or the CLI hangs
TRIALS = range(int(os.environ.get("STANDBY_ROUNDTRIP_FAULT_TRIALS", "1")))


@pytest.fixture(autouse=True)
def hold_final_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arm the process server's ps.final_sync hold (the daemons inherit the environment at start)."""
    monkeypatch.setenv("STANDBY_FAILPOINTS", "ps.final_sync=100")


@pytest.fixture
def two_sites(deployment: LocalDeployment, make_loop, tmp_path: Path) -> Iterator[Any]:
    """Factory: two_sites(size) -> (original device, replica file, loops the test attached) — test_roundtrip's
    `sites` with the disk size as a parameter. Everything is stopped and detached at teardown."""
    loops: list[str] = []

    def factory(size: int) -> tuple[str, Path, list[str]]:
        orig = make_loop(size, "original")
        for mt in ("mtdr", "mthome"):
            deployment.enroll("mt", mt)
            deployment.start("mt", mt)
            deployment.wait_mt_connected(mt)
        deployment.enroll("agent", "src")
        deployment.add_disk("src", "disk0", orig)
        deployment.set_agent_option("src", cut_interval=0.3)
        deployment.start("agent", "src")
        deployment.wait_disks_known("src", 1)
        (tmp_path / "replicas").mkdir()
        replica = tmp_path / "replicas" / "src-disk0.img"
        res = deployment.cli("protect", "src", "--mt", "mtdr", "--format", "raw", "--replica", f"disk0={replica}")
        assert res.returncode == 0, res.stderr
        deployment.wait_synced("src", timeout=120)
        deployment.enroll("agent", "rec")
        return orig, replica, loops

    try:
        yield factory
    finally:
        tear_down(deployment, loops)


def record(**figures: Any) -> None:
    """One trial's figures: printed, and appended to STANDBY_ROUNDTRIP_FAULTS_REPORT when it is set."""
    line = json.dumps(figures, sort_keys=True)
    print(line)
    path = os.environ.get("STANDBY_ROUNDTRIP_FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def restart(dep: LocalDeployment, victim: str) -> None:
    kind, name = VICTIMS[victim]
    dep.start(kind, name)
    if kind == "mt":
        dep.wait_mt_connected(name, timeout=60)


def rewrite(dev: str, start: int, end: int, seed: int) -> None:
    """The recovered machine rewrites [start, end) with a mix of random data and text: differences that the
    reprotect's comparison finds and copies."""
    rng = random.Random(seed)
    with open(dev, "r+b", buffering=0) as f:
        f.seek(start)
        pos = start
        while pos < end:
            n = min(4 * MiB, end - pos)
            line = b"recovered %012d\n" % pos
            f.write(rng.randbytes(n) if rng.random() < 0.6 else (line * (n // len(line) + 1))[:n])
            pos += n
        os.fsync(f.fileno())


def wait_under_way(dep: LocalDeployment, timeout: float = 60) -> int:
    """Wait until the reprotect's comparison or copy is under way (the disk's resync has started, status
    says "reprotecting NN %" with NN < 100); returns NN."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"the reprotect never got under way: {trip(dep)}"
        status = dep.status()
        t = next(t for t in status["roundtrips"] if t["name"] == "src")
        m = re.fullmatch(r"reprotecting (\d+) %", t["state"])
        assert m is not None, f"the reprotect ended before the kill (make the rewritten region bigger): {t}"
        if int(m.group(1)) < 100 and any(d["machine"] == "rec" and d.get("resync") for d in status["disks"]):
            return int(m.group(1))
        time.sleep(0.05)


@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("victim", list(VICTIMS))
def test_kill_during_reprotect(deployment: LocalDeployment, two_sites, tmp_path: Path, victim: str,
                               trial: int) -> None:
    seed = 10 * trial + list(VICTIMS).index(victim)
    orig, replica, loops = two_sites(BIG)
    ph0, cut0 = forward_failover(deployment, orig, replica, tmp_path, 0)
    deployment.kill("agent-src", signal.SIGTERM)  # the original machine is down
    rec_dev = attach(replica)
    loops.append(rec_dev)
    rewrite(rec_dev, 2 * SLOTS * 4096, BIG - 8 * MiB, seed=seed)
    deployment.add_disk("rec", "disk0", rec_dev)
    deployment.set_agent_option("rec", cut_interval=0.3, shutdown_script=str(stop_script(tmp_path)))
    deployment.start("agent", "rec")
    ph = Phase(tmp_path, 1, rec_dev)
    out = cli_json(deployment, "reprotect", "src", "--agent", "rec", "--mt", "mthome")
    assert out["mode"] == "checksum", out
    pct = wait_under_way(deployment)
    deployment.kill(victim, signal.SIGKILL)
    time.sleep(1.0)  # the others notice it is gone
    assert "reprotecting complete" not in deployment.log_text("ps"), "the kill came after the reprotect ended"
    killed = time.monotonic()
    restart(deployment, victim)
    wait_state(deployment, "ready to fail back", timeout=300)
    ready = time.monotonic() - killed
    last = ph.stop()
    deployment.wait_caught_up("rec", time.time(), timeout=120)
    assert same(orig, rec_dev), "after catch-up the original disk equals the recovered disk"
    v = ph.check(orig)
    record(case="reprotect", victim=victim, trial=trial, killed_at_percent=pct, ready_after_kill_s=round(ready, 2),
           records=last, consistent=v.consistent, lost=last - (v.cut or 0))
    assert v.consistent and v.cut == last, f"the recovered workload's region on the original: {v.to_json()}"
    assert ph0.check(orig).cut == cut0, "the failover point's region, as the recovered machine had it"
    history = [h["phase"] for h in trip(deployment)["history"]]
    assert history[-1] == "reprotecting", history


def hold_script(tmp: Path) -> Path:
    """test_roundtrip's shutdown script, which then holds HOLD seconds (the shutdown step still under way)."""
    script = stop_script(tmp)
    script.write_text(f"#!/bin/sh\npid=$(cat {tmp / 'workload.pid'})\nkill -TERM $pid 2>/dev/null\n"
                      "while kill -0 $pid 2>/dev/null; do sleep 0.05; done\n"
                      f"sleep {HOLD}\necho workload $pid stopped\n")
    return script


def wait_phase(dep: LocalDeployment, proc: subprocess.Popen[str], phase: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while trip(dep)["phase"] != phase:
        assert proc.poll() is None, f"failback --complete ended before {phase}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"never in phase {phase}: {trip(dep)}"
        time.sleep(0.05)


def complete_again(dep: LocalDeployment) -> dict[str, Any]:
    """The operator completes the failback again once status says it is ready: that must succeed at once
    (status says ready only when the agent and the original site's master target are back)."""
    wait_state(dep, "synchronising: ready to complete", timeout=240)
    res = dep.cli("failback", "src", "--complete", "--json", timeout=CLI_LIMIT)
    assert res.returncode == 0, f"failback --complete again, after status said ready: {res.stderr}"
    return json.loads(res.stdout)


@pytest.mark.parametrize("trial", TRIALS)
@pytest.mark.parametrize("moment", ["shutting-down", "final-sync"])
@pytest.mark.parametrize("victim", list(VICTIMS))
def test_kill_during_final_sync(deployment: LocalDeployment, two_sites, tmp_path: Path, victim: str,
                                moment: str, trial: int) -> None:
    orig, replica, loops = two_sites(SMALL)
    forward_failover(deployment, orig, replica, tmp_path, 0)
    rec_dev, ph = reprotect(deployment, orig, replica, tmp_path, loops, 1)
    hold_script(tmp_path)  # the agent runs the script's path: its new text from now on
    out = cli_json(deployment, "failback", "src")
    assert out["phase"] == "synchronising", out
    wait_state(deployment, "synchronising: ready to complete", timeout=120)
    cmd = command("admin", "--admin", str(deployment.ps_dir / "admin"), "--server", deployment.server,
                  "failback", "src", "--complete", "--json")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_phase(deployment, proc, moment)
        deployment.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = proc.communicate(timeout=CLI_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    answered = time.monotonic() - killed
    if proc.returncode != 0:
        assert stderr.strip(), "an error says what went wrong"
    if victim == "mt-mthome":
        # The operator takes a while to start it again: meanwhile the recovered machine's records pile up
        # past what status calls caught up, and must drain once it is back (nothing held at the final point
        # of the attempt that failed).
        deployment.wait_for(lambda s: any(d["machine"] == "rec" and d["backlog_records"] > CAUGHT_UP_RECORDS
                                          for d in s["disks"]), 120, "records to pile up while mthome is down")
    restart(deployment, victim)
    # Exit 0: the kill did not stop the failback (an agent killed once its final point had arrived).
    done = json.loads(stdout) if proc.returncode == 0 else complete_again(deployment)
    r = done["result"]
    assert ph.proc.poll() is not None, "the shutdown script stopped the workload"
    last = ph.last
    v = ph.check(orig)
    record(case="final-sync", victim=victim, moment=moment, trial=trial, cli_answer_after_kill_s=round(answered, 2),
           cli_exit=proc.returncode, cli_error=stderr.strip()[:200], downtime_s=r["downtime_seconds"],
           no_data_loss=r["no_data_loss"], records=last, consistent=v.consistent, lost=last - (v.cut or 0))
    assert r["no_data_loss"] and not r["written_after_final"], done
    assert v.consistent and v.cut == last, f"the final point must hold the last write {last}: {v.to_json()}"
    assert same(orig, rec_dev), "the original disk equals the recovered disk at the final point"
    cli_json(deployment, "commit", "src")
    assert trip(deployment)["state"].startswith("failed back (committed)")
