#!/usr/bin/env python3
"""Benchmark: what change tracking costs the protected machine's writes. fio randwrite 4 KiB O_DIRECT
(psync iodepth 1 and libaio iodepth 16) on a loop device, alternating runs without and with tracking
(A B A B ...). Two kinds of "with":

- tracker: the kernel tracker alone (standby.agent.tracker.tracefs.TracefsTracker), polled every 100 ms
  from a thread of this process, as the agent polls it; isolates tracing + parsing.
- agent: a real deployment protecting the device (agent, process server, master target, raw replica):
  tracking plus reading, compressing, encrypting and shipping the changed blocks on the same 2 cores.
  For the "without" runs the agent is stopped cleanly (the restart resyncs what was written meanwhile,
  outside the measured runs).

Reports IOPS and latency p50/p99 per run and per configuration, the overhead in %, and the tracker's own
CPU seconds and events. Writes JSON; never part of the tests.

    python3 bench/tracker_overhead.py [--size 1G] [--seconds 10] [--reps 2] [--modes tracker,agent]

Needs root (loop device, tracefs), fio.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from churn import (
    MACHINE,
    RESULTS,
    Scratch,
    code_state,
    cpu_delta,
    deploy,
    disk_of,
    fio,
    fio_result,
    identical,
    machine_facts,
    now_utc,
    sigterm_as_interrupt,
    stop_proc,
    usage,
    write_result,
)

from standby.agent.tracker.base import TrackingLost
from standby.agent.tracker.tracefs import TracefsTracker
from standby.plumbing.config import parse_size

JOBS = {"psync-qd1": ("psync", 1), "libaio-qd16": ("libaio", 16)}
POLL = 0.1


class PolledTracker:
    """A TracefsTracker on `dev`, polled every 100 ms in a thread (as the agent's Tracking.run does)."""

    def __init__(self, dev: str, buffer_kb: int) -> None:
        self.tracker = TracefsTracker(dev, f"standby-bench-{os.getpid()}", buffer_kb_per_cpu=buffer_kb)
        self.stop = threading.Event()
        self.lost: str | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def poll(self) -> None:
        try:
            self.tracker.poll()
            take = getattr(self.tracker, "take_queued", None)
            if take is not None:
                take()  # submissions: the agent keeps them only while it checks an epoch
        except TrackingLost as exc:
            self.lost = str(exc)

    def run(self) -> None:
        while not self.lost and not self.stop.wait(POLL):
            self.poll()

    def __enter__(self) -> PolledTracker:
        self.tracker.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        if not self.lost:
            self.poll()  # what the run left in the buffer counts too
        self.tracker.close()


def fio_run(dev: str, tmp: Path, job: str, seconds: float) -> dict[str, Any]:
    engine, depth = JOBS[job]
    out = tmp / "fio.json"
    load = os.getloadavg()[0]  # others' work on a shared machine shows here
    proc = fio(dev, out, seconds=seconds, bs="4k", engine=engine, iodepth=depth, extra=("--lat_percentiles=1",))
    try:
        w = fio_result(proc, out)
    finally:
        stop_proc(proc)
    pct = (w.get("lat_ns") or {}).get("percentile") or w["clat_ns"]["percentile"]
    return {
        "iops": round(w["iops"]),
        "lat_p50_us": round(pct["50.000000"] / 1000, 1),
        "lat_p99_us": round(pct["99.000000"] / 1000, 1),
        "lat_mean_us": round(w["lat_ns"]["mean"] / 1000, 1),
        "fio_sys_cpu_pct": round(w["sys_cpu"], 1),
        "fio_usr_cpu_pct": round(w["usr_cpu"], 1),
        "loadavg_1m_before": round(load, 2),
    }


def summarize(runs: list[dict[str, Any]], base: str, other: str) -> dict[str, Any]:
    """Per job: mean IOPS and median latencies of each configuration, and the overhead of `other`."""
    out: dict[str, Any] = {}
    for job in JOBS:
        per: dict[str, Any] = {}
        for cfg in (base, other):
            rs = [r for r in runs if r["job"] == job and r["config"] == cfg]
            if not rs:
                continue
            per[cfg] = {
                "runs": len(rs),
                "iops_mean": round(statistics.mean(r["iops"] for r in rs)),
                "iops_min": min(r["iops"] for r in rs),
                "iops_max": max(r["iops"] for r in rs),
                "lat_p50_us": round(statistics.median(r["lat_p50_us"] for r in rs), 1),
                "lat_p99_us": round(statistics.median(r["lat_p99_us"] for r in rs), 1),
            }
        if base in per and other in per:
            a, b = per[base], per[other]
            per["iops_overhead_pct"] = round(100 * (a["iops_mean"] - b["iops_mean"]) / a["iops_mean"], 1)
            per["lat_p50_increase_pct"] = round(100 * (b["lat_p50_us"] - a["lat_p50_us"]) / a["lat_p50_us"], 1)
            per["lat_p99_increase_pct"] = round(100 * (b["lat_p99_us"] - a["lat_p99_us"]) / a["lat_p99_us"], 1)
        out[job] = per
    return out


def phase_tracker(dev: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for job in JOBS:
        fio_run(dev, tmp, job, min(3.0, args.seconds))  # warm-up, not counted
    for rep in range(args.reps):
        for job in JOBS:
            r = {"job": job, "rep": rep, "config": "none", **fio_run(dev, tmp, job, args.seconds)}
            runs.append(r)
            log(r)
            with PolledTracker(dev, args.buffer_kb) as pt:
                t0 = time.monotonic()
                res = fio_run(dev, tmp, job, args.seconds)
                wall = time.monotonic() - t0
            s = pt.tracker.stats
            r = {"job": job, "rep": rep, "config": "tracker", **res,
                 "tracker_cpu_seconds": round(float(s["cpu_seconds"]), 3),
                 "tracker_cpu_pct_of_core": round(100 * float(s["cpu_seconds"]) / wall, 2),
                 "tracker_events": int(s["events"]), "tracker_records": int(s["records"]),
                 "tracker_polls": int(s["polls"]), "tracker_max_page_fill": round(float(s["max_page_fill"]), 4),
                 "tracker_bytes_read": int(s["bytes_read"]), "tracking_lost": pt.lost}
            runs.append(r)
            log(r)
    return {"poll_interval_seconds": POLL, "buffer_kb_per_cpu": args.buffer_kb, "runs": runs,
            "summary": summarize(runs, "none", "tracker")}


def phase_agent(scratch: Scratch, dev: str, args: argparse.Namespace) -> dict[str, Any]:
    dep, replica, _ = deploy(scratch, dev, "raw")
    client = dep.admin()
    runs: list[dict[str, Any]] = []
    resyncs = []
    for job in JOBS:
        fio_run(dev, scratch.root, job, min(3.0, args.seconds))  # warm-up with the agent running
    dep.wait_caught_up(MACHINE, time.time(), timeout=300)
    for rep in range(args.reps):
        for job in JOBS:
            dep.kill(f"agent-{MACHINE}", signal.SIGTERM)  # clean stop: its tracker is gone
            r = {"job": job, "rep": rep, "config": "none", **fio_run(dev, scratch.root, job, args.seconds)}
            runs.append(r)
            log(r)
            t0 = time.time()
            dep.start("agent", MACHINE)  # written meanwhile: a checksum resync, outside the measured runs
            st = dep.wait_for(lambda s, t0=t0: ((disk_of(s)["last_resync"] or {}).get("done_at") or 0) > t0, 600,
                              "the resync after the stopped run")
            resyncs.append({"reason": disk_of(st)["last_resync"]["reason"], "seconds": round(time.time() - t0, 1)})
            dep.wait_caught_up(MACHINE, time.time(), timeout=600)
            time.sleep(2.5)  # a fresh agent report (every 2 s) for the tracker's CPU counter
            d0 = disk_of(client.call("status", machine=MACHINE))
            u0 = usage(dep)
            res = fio_run(dev, scratch.root, job, args.seconds)
            u1 = usage(dep)
            end = time.time()
            dep.wait_caught_up(MACHINE, end, timeout=600)
            catch_up = round(time.time() - end, 2)
            time.sleep(2.5)
            d1 = disk_of(client.call("status", machine=MACHINE))
            r = {"job": job, "rep": rep, "config": "agent", **res,
                 "daemon_cpu_seconds_during_run": cpu_delta(u0, u1),
                 "catch_up_seconds": catch_up,
                 "tracker_cpu_seconds_incl_catch_up": round(
                     (d1["tracker_cpu_seconds"] or 0) - (d0["tracker_cpu_seconds"] or 0), 3),
                 "epochs": (d1["epochs"] or 0) - (d0["epochs"] or 0),
                 "epochs_without_point": (d1["inconsistent_epochs"] or 0) - (d0["inconsistent_epochs"] or 0)}
            runs.append(r)
            log(r)
    dep.kill(f"agent-{MACHINE}", signal.SIGTERM)
    return {"runs": runs, "resyncs_between_runs": resyncs, "final_compare": identical(dev, replica, "raw"),
            "summary": summarize(runs, "none", "agent")}


def log(r: dict[str, Any]) -> None:
    print(f"  {r['job']:<12} {r['config']:<8} {r['iops']:>7} IOPS  p50 {r['lat_p50_us']} us  p99 {r['lat_p99_us']} us",
          file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each fio run")
    ap.add_argument("--reps", type=int, default=2, help="A B pairs per job and mode")
    ap.add_argument("--modes", default="tracker,agent")
    ap.add_argument("--buffer-kb", type=int, default=16384, help="ring buffer per CPU (the agent's default 16M)")
    ap.add_argument("--out", type=Path, default=RESULTS / "tracker_overhead.json")
    args = ap.parse_args()
    size = parse_size(args.size)
    modes = args.modes.split(",")
    if os.geteuid() != 0:
        print("needs root (loop device, tracefs)", file=sys.stderr)
        return 2
    sigterm_as_interrupt()
    results: dict[str, Any] = {
        "benchmark": "tracker_overhead",
        "when": now_utc(),
        "machine": machine_facts(),
        "code": code_state(),
        "disk_bytes": size,
        "device": "loop device (buffered, the default losetup mode) over a fully written file",
        "fio": {"rw": "randwrite", "bs": "4k", "direct": 1, "seconds_per_run": args.seconds,
                "jobs": {k: {"ioengine": e, "iodepth": d} for k, (e, d) in JOBS.items()}},
        "order": "per rep and job: without, then with (A B A B ...)",
    }
    with Scratch("standby-trkovh-") as scratch:
        image = scratch.root / "source.img"
        subprocess.run(["dd", "if=/dev/zero", f"of={image}", "bs=16M", f"count={size // (16 << 20)}",
                        "conv=fsync", "status=none"], check=True)  # allocated: no first-write costs in a run
        dev = scratch.attach(image)
        if "tracker" in modes:
            print("kernel tracker alone, polled every 100 ms in a thread", file=sys.stderr, flush=True)
            results["tracker"] = phase_tracker(dev, scratch.root, args)
        if "agent" in modes:
            print("a protected disk: agent + process server + master target", file=sys.stderr, flush=True)
            results["agent"] = phase_agent(scratch, dev, args)
    write_result(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
