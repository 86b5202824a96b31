"""What the round-trip tests share (test_roundtrip.py, test_roundtrip_variants.py): two sites on one machine
with loop devices, workloads checked by the write-order checker, and the round trip's steps as an
operator runs them through the `standby` CLI, each with the checks that must hold after it.

Two sites on one machine: master target `mtdr` holds the replica files at the recovery site; `mthome` is
the original site's master target, writing into the original loop devices. The recovered machine is a
loop device over each replica file with an agent of its own (`rec`). Each phase writes numbered records
into a region of its own (4 MiB each), so that after every phase the live disk can be checked region by
region.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from standby.plumbing.config import load_toml, save_toml
from tests import writeorder
from tests.deploy import LocalDeployment

from .conftest import MiB

SIZE = 64 * MiB
SLOTS = 1024  # 4 MiB per phase's region
REGIONS = 8
RUNNING: list[Phase] = []  # workloads started, stopped at teardown whatever happens


class Phase:
    """One workload run into region `index` of `dev`, in a shell that reaps it (so the shutdown script can
    wait for its end), its pid in `pidfile`. `tag` tells apart the workloads of one phase on several disks."""

    def __init__(self, tmp: Path, index: int, dev: str, tag: str = "") -> None:
        self.index, self.dev = index, dev
        self.log = tmp / f"writes-{index}{tag}.log"
        self.pidfile = tmp / f"workload-{index}{tag}.pid"
        cmd = (f"{sys.executable} -m tests.writeorder write {dev} --offset {self.offset} --slots {SLOTS} "
               f"--log {self.log} --rate 150 --seconds 600 --seed {100 + index}")
        # workload.pid: the running workload, which the shutdown script stops
        self.proc = subprocess.Popen(["sh", "-c", f"{cmd} & echo $! > {self.pidfile}; echo $! > {tmp}/workload.pid; "
                                                  "wait $!"],
                                     cwd=Path(__file__).resolve().parents[2])
        RUNNING.append(self)
        deadline = time.monotonic() + 30
        while not (self.log.exists() and writeorder.WriteLog.read(self.log).last >= 20):
            assert time.monotonic() < deadline and self.proc.poll() is None, "the workload did not start"
            time.sleep(0.1)

    @property
    def offset(self) -> int:
        return self.index * SLOTS * 4096

    def stop(self) -> int:
        if self.proc.poll() is None:
            try:
                os.kill(int(self.pidfile.read_text()), 15)  # the writer this phase started (sh reaps it)
            except (OSError, ValueError):
                self.proc.kill()
        self.proc.wait(timeout=30)
        return self.last

    @property
    def last(self) -> int:
        return writeorder.WriteLog.read(self.log).last

    def check(self, image: str) -> writeorder.Verdict:
        return writeorder.check(image, self.offset, SLOTS, self.log)


def stop_script(tmp: Path) -> Path:
    """The recovered machine's shutdown_script: stop the workloads (the pids in workload.pid, one a line) and
    wait until they have ended."""
    script = tmp / "stop-workload"
    script.write_text(f"#!/bin/sh\nfor pid in $(cat {tmp / 'workload.pid'}); do\n  kill -TERM $pid 2>/dev/null\n"
                      "  while kill -0 $pid 2>/dev/null; do sleep 0.05; done\n  echo workload $pid stopped\ndone\n")
    script.chmod(0o700)
    return script


def cli_json(dep: LocalDeployment, *args: str, timeout: float = 600) -> dict[str, Any]:
    res = dep.cli(*args, "--json", timeout=timeout)
    assert res.returncode == 0, f"{args}: {res.stdout} {res.stderr}"
    return json.loads(res.stdout)


def trip(dep: LocalDeployment) -> dict[str, Any]:
    return next(t for t in dep.status()["roundtrips"] if t["name"] == "src")


def wait_state(dep: LocalDeployment, state: str, timeout: float = 240) -> dict[str, Any]:
    dep.wait_for(lambda s: any(t["name"] == "src" and t["state"].startswith(state) for t in s["roundtrips"]),
                 timeout, f"round trip state {state!r}")
    return trip(dep)


def same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if x != y:
                return False
            if not x:
                return True


def wire(dep: LocalDeployment, machine: str) -> int:
    return sum(d["bytes_wire"] for d in dep.status()["disks"] if d["machine"] == machine)


def attach(image: Path) -> str:
    return subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                          text=True).stdout.strip()


def set_disk_path(dep: LocalDeployment, agent: str, dev: str, disk: str = "disk0") -> bool:
    """Point the agent's disk at `dev` (attached again: maybe another loop device); False if it has none."""
    conf = dep.root / f"agent-{agent}" / "agent.toml"
    raw = load_toml(conf)
    entries = [d for d in raw.get("disks") or [] if d["name"] == disk]
    if not entries:
        return False
    entries[0]["path"] = dev
    save_toml(conf, raw)
    return True


@contextmanager
def two_sites(deployment: LocalDeployment, make_loop: Any, tmp_path: Path,
              disks: int = 1) -> Iterator[tuple[list[str], list[Path], list[str]]]:
    """Original disks (loops disk0..) protected by agent src into raw replicas at mtdr; mthome at the original
    site; agent rec enrolled (not started). Yields (original devices, replica files, loops attached by the
    test to detach); stops everything at the end. The body of each test module's `sites` fixture."""
    origs = [make_loop(SIZE, f"original{n or ''}") for n in range(disks)]
    for mt in ("mtdr", "mthome"):
        deployment.enroll("mt", mt)
        deployment.start("mt", mt)
        deployment.wait_mt_connected(mt)
    deployment.enroll("agent", "src")
    for n, orig in enumerate(origs):
        deployment.add_disk("src", f"disk{n}", orig)
    deployment.set_agent_option("src", cut_interval=0.3)
    deployment.start("agent", "src")
    deployment.wait_disks_known("src", disks)
    (tmp_path / "replicas").mkdir()
    replicas = [tmp_path / "replicas" / f"src-disk{n}.img" for n in range(disks)]
    res = deployment.cli("protect", "src", "--mt", "mtdr", "--format", "raw",
                         *[a for n, r in enumerate(replicas) for a in ("--replica", f"disk{n}={r}")])
    assert res.returncode == 0, res.stderr
    deployment.wait_synced("src", timeout=120)
    deployment.enroll("agent", "rec")  # its disks are added once the recovered disks are attached
    loops: list[str] = []
    try:
        yield origs, replicas, loops
    finally:
        tear_down(deployment, loops)


def tear_down(dep: LocalDeployment, loops: list[str]) -> None:
    """Stop the workloads still running, every daemon, and detach the loop devices the test attached."""
    for ph in RUNNING:
        ph.stop()
    RUNNING.clear()
    dep.stop_all()
    for dev in loops:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


def forward_failover(dep: LocalDeployment, orig: str, replica: Path, tmp: Path, index: int,
                     commit: bool = True) -> tuple[Phase, int]:
    """Workload on the original; fail over to a point in the middle of it; commit (unless not `commit`).
    Returns the phase and the cut of its records the replica holds."""
    ph = Phase(tmp, index, orig)
    time.sleep(1.5)
    mark = time.time()
    dep.wait_caught_up("src", mark, timeout=120)
    points = cli_json(dep, "points", "src", "--limit", "0")["disks"][0]["points"]
    point = [p for p in points if p["time"] >= mark][0]
    time.sleep(1.5)  # written after the point: the original disk differs from the replica there
    last = ph.stop()
    dep.wait_caught_up("src", time.time(), timeout=120)
    cli_json(dep, "failover", "src", "--point", str(point["sequence"]))
    v = ph.check(str(replica))
    assert v.consistent and v.cut is not None and 0 < v.cut < last, v.to_json()
    if commit:
        cli_json(dep, "commit", "src")
    return ph, v.cut


def start_recovered(dep: LocalDeployment, replicas: list[Path], tmp: Path, loops: list[str]) -> list[str]:
    """The recovered machine: a loop device over each replica, agent rec with them as disk0.. and the
    shutdown script; started. Returns its devices."""
    devs = []
    for n, replica in enumerate(replicas):
        dev = attach(replica)
        loops.append(dev)
        devs.append(dev)
        if not set_disk_path(dep, "rec", dev, f"disk{n}"):
            dep.add_disk("rec", f"disk{n}", dev)
    dep.set_agent_option("rec", cut_interval=0.3, shutdown_script=str(stop_script(tmp)))
    dep.start("agent", "rec")
    return devs


def reprotect(dep: LocalDeployment, orig: str, replica: Path, tmp: Path, loops: list[str],
              index: int) -> tuple[str, Phase]:
    """The recovered machine (a loop over the replica, agent rec) runs a workload and reprotects into the
    original disk; returns its device and its running workload."""
    dep.kill("agent-src", 15)  # the original machine is down (a disaster, or the operator stopped it)
    rec_dev = start_recovered(dep, [replica], tmp, loops)[0]
    ph = Phase(tmp, index, rec_dev)
    wire0 = wire(dep, "rec")
    out = cli_json(dep, "reprotect", "src", "--agent", "rec", "--mt", "mthome")
    assert out["mode"] == "checksum" and out["disks"] == [{"disk": "disk0", "replica": orig}], out
    wait_state(dep, "ready to fail back")
    shipped = wire(dep, "rec") - wire0
    # Differences only: the workload's records and the records the original had after the point.
    assert shipped < SIZE // 4, f"reprotect shipped {shipped} bytes of a {SIZE}-byte disk"
    return rec_dev, ph


def complete_failback(dep: LocalDeployment, orig: str, rec_dev: str, ph: Phase) -> dict[str, Any]:
    """Planned failback with sync before shutdown; the shutdown script stops the workload. Checks that the
    original disk holds every record written (no data loss) and equals the recovered disk. Not committed."""
    res = dep.cli("failback", "src", "--complete")
    assert res.returncode == 1 and "no failback to complete" in res.stderr, res.stderr
    out = cli_json(dep, "failback", "src")
    assert out["phase"] == "synchronising", out
    wait_state(dep, "synchronising: ready to complete", timeout=120)
    done = cli_json(dep, "failback", "src", "--complete")
    r = done["result"]
    assert r["no_data_loss"] and not r["written_after_final"], done
    ph.proc.wait(timeout=10)  # the shutdown script stopped the workload
    last = ph.last
    v = ph.check(orig)
    assert v.consistent and v.cut == last, f"final point must hold the last write {last}: {v.to_json()}"
    assert same(orig, rec_dev), "the original disk equals the recovered disk at the final point"
    return r


def failback(dep: LocalDeployment, orig: str, rec_dev: str, ph: Phase) -> dict[str, Any]:
    """complete_failback, then commit."""
    r = complete_failback(dep, orig, rec_dev, ph)
    cli_json(dep, "commit", "src")
    assert trip(dep)["state"].startswith("failed back (committed)")
    return r


def reverse(dep: LocalDeployment, orig: str, replica: Path, rec_dev: str, loops: list[str], tmp: Path,
            index: int) -> Phase:
    """The recovered machine shuts down; the original runs a workload; reverse replication brings the
    replica back by differences only."""
    dep.kill("agent-rec", 15)
    subprocess.run(["losetup", "-d", rec_dev], check=True)
    loops.remove(rec_dev)
    dep.start("agent", "src")
    ph = Phase(tmp, index, orig)  # written before reverse: the comparison finds it
    wire0 = wire(dep, "src")
    out = cli_json(dep, "reverse", "src")
    assert out["mt"] == "mtdr" and out["disks"] == [{"disk": "disk0", "replica": str(replica)}], out
    wait_state(dep, "protected")
    last = ph.stop()
    dep.wait_caught_up("src", time.time(), timeout=120)
    assert wire(dep, "src") - wire0 < SIZE // 4, "reverse replication ships differences only"
    v = ph.check(str(replica))
    assert v.consistent and v.cut == last, v.to_json()
    assert same(orig, str(replica))
    return ph
