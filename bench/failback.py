#!/usr/bin/env python3
"""Benchmark: planned failback downtime with churn on the recovered machine, side by side with the failback
that stops first and copies every block (--sync full), in the same run. Writes JSON; never part of the tests.

    python3 bench/failback.py [--size 4G] [--repeat 3] [--rate 10] [--bs 4k]

The two-site deployment of bench/reprotect.py: the original disk protected into mtdr, failed over, committed;
the recovered disk (a loop over the replica) reprotected into the original one by agent `rec`, whose
shutdown_script stops the workload: fio random writes (O_DIRECT) at --rate MB/s, run under a shell that
writes its pid to a file (the script kills that pid and waits until it is gone). Then `standby failback src`
(sync before shutdown), wait for "synchronising: ready to complete" with the churn still on, and time
`standby failback src --complete`: the downtime the process server measures (from the start of the shutdown
step to the original disk failed over to the final point), bytes after the shutdown, the no-data-loss
check, and our own wall clock around the command. cmp then checks that the original disk equals the
recovered one. Each repeat is a whole round trip (commit, reverse replication, failover, commit, reprotect)
so that it starts from the same phase.

Baseline: the same with `--sync full` (the recovered machine stops first, every block is copied, then
--complete): downtime from the start of `standby failback src --sync full` to the end of --complete.
Target (reported, not asserted): downtime <= 5 s.

Needs root (loop devices, kernel tracker), fio.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from churn import (
    MB,
    RESULTS,
    Scratch,
    code_state,
    fio_args,
    identical,
    machine_facts,
    now_utc,
    sigterm_as_interrupt,
    write_result,
)
from reprotect import REC, SRC, Sites, build, cli, detach, fail_over, pristine_image, start_recovered, trip, wait_trip

from standby.admin.localdeploy import LocalDeployment
from standby.plumbing.config import parse_size

TARGET_DOWNTIME = 5.0


def stop_script(tmp: Path) -> Path:
    """The recovered machine's shutdown_script: stop the workload and wait until it has ended."""
    script = tmp / "stop-workload"
    script.write_text(f"#!/bin/sh\npid=$(cat {tmp / 'workload.pid'})\nkill -TERM $pid 2>/dev/null\n"
                      "while kill -0 $pid 2>/dev/null; do sleep 0.05; done\necho workload $pid stopped\n")
    script.chmod(0o700)
    return script


class Churn:
    """fio random writes at a rate on the recovered disk, under a shell that reaps it (so the shutdown script
    can wait for its end), its pid in workload.pid."""

    def __init__(self, tmp: Path, dev: str, rate_mb: float, bs: str) -> None:
        self.pidfile = tmp / "workload.pid"
        self.pidfile.unlink(missing_ok=True)
        self.out = tmp / "fio.json"
        self.out.unlink(missing_ok=True)
        cmd = shlex.join(fio_args(dev, self.out, seconds=3600, bs=bs, rate=int(rate_mb * MB), extra=("--thread",)))
        self.proc = subprocess.Popen(["sh", "-c", f"{cmd} & echo $! > {self.pidfile}; wait $!"],
                                     stdout=subprocess.DEVNULL, stderr=open(tmp / "fio.log", "ab"))
        deadline = time.monotonic() + 10
        while not self.pidfile.exists() or not self.pidfile.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"fio did not start (see {tmp / 'fio.log'})")
            time.sleep(0.05)

    def ended(self, timeout: float = 30) -> dict[str, Any]:
        """Wait for the workload (stopped by the shutdown script); what fio achieved."""
        self.proc.wait(timeout=timeout)
        try:
            text = self.out.read_text()
            w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
            return {"fio_MBps": round(w["bw_bytes"] / MB, 1), "fio_seconds": round(w["runtime"] / 1000, 1),
                    "fio_bytes": w["io_bytes"]}
        except (OSError, ValueError, KeyError, IndexError) as exc:
            return {"fio_report": f"unreadable: {exc!r}"}

    def stop(self) -> None:
        """Whatever happened: the fio this run started (its pid from the file), then its shell."""
        if self.proc.poll() is None:
            try:
                os.kill(int(self.pidfile.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                self.proc.kill()
            self.proc.wait(timeout=30)


def wait_state(dep: LocalDeployment, state: str, timeout: float) -> float:
    """Seconds until the round trip's state starts with `state` (churn goes on: nothing else asked)."""
    m0 = time.monotonic()
    dep.wait_for(lambda s: any(t["name"] == SRC and t["state"].startswith(state) for t in s["roundtrips"]),
                 timeout, f"round trip state {state!r}", interval=0.1)
    return round(time.monotonic() - m0, 2)


def reprotect(s: Sites, timeout: float) -> float:
    m0 = time.monotonic()
    cli(s.dep, "reprotect", SRC, "--agent", REC, "--mt", "mthome")
    wait_trip(s.dep, "ready to fail back", timeout)
    return round(time.monotonic() - m0, 2)


def one_failback(s: Sites, tmp: Path, sync: str, args: argparse.Namespace) -> dict[str, Any]:
    """Churn on the recovered disk, then the failback (sync before shutdown or full), timed."""
    churn = Churn(tmp, s.rec_dev, args.rate, args.bs)
    out: dict[str, Any] = {"sync": sync}
    try:
        time.sleep(args.warm)  # the churn runs a while before the failback starts
        m0 = time.monotonic()
        if sync == "full":
            cli(s.dep, "failback", SRC, "--sync", "full")
            out["shutdown_and_start_seconds"] = round(time.monotonic() - m0, 2)
        else:
            cli(s.dep, "failback", SRC)
        out["sync_seconds"] = wait_state(s.dep, "synchronising: ready to complete", args.timeout)
        if sync != "full":
            time.sleep(args.settle)  # still churning while ready: the final sync ships the last seconds
        c0 = time.monotonic()
        done = cli(s.dep, "failback", SRC, "--complete")
        end = time.monotonic()
        out.update(churn.ended())
    finally:
        churn.stop()
    r = done["result"]
    out.update({
        "downtime_seconds": r["downtime_seconds"] if sync != "full" else round(end - m0, 2),
        "complete_downtime_seconds": r["downtime_seconds"],
        "complete_wall_seconds": round(end - c0, 2),
        "bytes_after_shutdown": r["bytes_after_shutdown"],
        "no_data_loss": r["no_data_loss"],
        "final": r["final"],
        "history": phases_since_reprotect(s),
    })
    out.update(identical(s.orig, Path(s.rec_dev), "raw"))
    cli(s.dep, "commit", SRC)
    return out


def phases_since_reprotect(s: Sites) -> list[dict[str, Any]]:
    """The round trip's history from its last reprotect on: each phase's seconds, bytes and detail."""
    hist = trip(s.dep)["history"]
    last = max(i for i, h in enumerate(hist) if h["phase"] == "reprotecting")
    return [{"phase": h["phase"], "seconds": round((h["ended"] or time.time()) - h["started"], 2),
             "bytes": h["bytes"], "detail": h["detail"]} for h in hist[last:]]


def round_again(s: Sites, args: argparse.Namespace) -> dict[str, float]:
    """From a committed failback back to a reprotected recovered machine: reverse replication, failover,
    commit, reprotect (as test_roundtrip does); seconds of each step."""
    t: dict[str, float] = {}
    s.dep.kill(f"agent-{REC}", signal.SIGTERM)
    detach(s, s.rec_dev)
    s.rec_dev = ""
    s.dep.start("agent", SRC)
    m0 = time.monotonic()
    cli(s.dep, "reverse", SRC)
    wait_trip(s.dep, "protected", args.timeout, machine=SRC)
    s.dep.wait_caught_up(SRC, time.time(), timeout=300)
    t["reverse"] = round(time.monotonic() - m0, 2)
    fail_over(s)
    start_recovered(s)
    t["reprotect"] = reprotect(s, args.timeout)
    return t


def summary(runs: list[dict[str, Any]], full: list[dict[str, Any]]) -> dict[str, Any]:
    down = [r["downtime_seconds"] for r in runs]
    wall = [r["complete_wall_seconds"] for r in runs]
    out: dict[str, Any] = {
        "downtime_seconds": down,
        "downtime_median": round(statistics.median(down), 3) if down else None,
        "complete_wall_median": round(statistics.median(wall), 2) if wall else None,
        "bytes_after_shutdown_median": statistics.median([r["bytes_after_shutdown"] for r in runs]) if runs else None,
        "all_no_data_loss": all(r["no_data_loss"] for r in runs + full),
        "all_identical": all(r["identical"] for r in runs + full),
        "target_downtime_seconds": TARGET_DOWNTIME,
        "downtime_median_ok": bool(down) and statistics.median(down) <= TARGET_DOWNTIME,
        "downtime_max_ok": bool(down) and max(down) <= TARGET_DOWNTIME,
    }
    if full:
        out["full_downtime_seconds"] = [r["downtime_seconds"] for r in full]
        out["full_downtime_median"] = round(statistics.median(out["full_downtime_seconds"]), 2)
        if down:
            out["full_to_sync_before_shutdown"] = round(out["full_downtime_median"] / statistics.median(down), 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--repeat", type=int, default=3, help="failbacks with sync before shutdown")
    ap.add_argument("--full-repeat", type=int, default=1, help="failbacks with --sync full (0: none)")
    ap.add_argument("--rate", type=float, default=10.0, help="churn on the recovered disk, MB/s (10^6)")
    ap.add_argument("--bs", default="4k", help="fio block size")
    ap.add_argument("--warm", type=float, default=10.0, help="seconds of churn before the failback starts")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of churn once ready, before --complete")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "failback.json")
    args = ap.parse_args()
    size = parse_size(args.size)
    if os.geteuid() != 0:
        print("needs root (loop devices, kernel tracker)", file=sys.stderr)
        return 2
    sigterm_as_interrupt()
    results: dict[str, Any] = {
        "benchmark": "failback",
        "when": now_utc(),
        "machine": machine_facts(),
        "code": code_state(),
        "disk_bytes": size,
        "data_mix": "1 MiB regions: 3/8 text, 3/8 random, 2/8 zero (standby.admin.testdisk)",
        "churn": {"fio": "randwrite, O_DIRECT, libaio, iodepth 4, whole device", "MBps": args.rate, "bs": args.bs,
                  "warm_seconds": args.warm, "settle_seconds": args.settle},
        "sync_before_shutdown": [],
        "sync_full": [],
        "rounds": [],
    }
    with Scratch("standby-failback-") as scratch:
        pristine = pristine_image(scratch, size)
        s = build(scratch, pristine, "trip", {"shutdown_script": str(stop_script(scratch.root))})
        fail_over(s)
        start_recovered(s)
        results["rounds"].append({"reprotect": reprotect(s, args.timeout)})
        plan = ["before-shutdown"] * args.repeat + ["full"] * args.full_repeat
        for i, sync in enumerate(plan):
            if i:
                results["rounds"].append(round_again(s, args))
            r = one_failback(s, scratch.root, sync, args)
            results["sync_full" if sync == "full" else "sync_before_shutdown"].append(r)
            print(f"failback {i + 1} ({sync}): downtime {r['downtime_seconds']} s, --complete "
                  f"{r['complete_wall_seconds']} s, {r['bytes_after_shutdown']} B after the shutdown, "
                  f"no data loss {r['no_data_loss']}, identical {r['identical']}", file=sys.stderr, flush=True)
        s.dep.stop_all()
    results["summary"] = summary(results["sync_before_shutdown"], results["sync_full"])
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
    write_result(args.out, results)
    return 0 if results["summary"]["all_no_data_loss"] and results["summary"]["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
