#!/usr/bin/env python3
"""Benchmark: sustained churn on a protected loop device. After the initial sync, fio randwrites at
increasing rates (per block size, each level --seconds long) while status is sampled every 0.5 s: RPO
p50/p99, points, dirty bytes, cache backlog, CPU of each daemon, the rate fio achieved. Between levels the
replica catches up. Reports the highest rate per block size whose RPO p99 <= --rpo-target. At the end the
replica is compared with the source. Writes JSON; never part of the tests.

    python3 bench/churn.py [--size 4G] [--fill 1G] [--seconds 20] [--rates 10,25,50,100,150]
                           [--block-sizes 4k,64k] [--cut-interval 1.0[,0.25]] [--format raw|vmdk]

Needs root (loop device, the kernel tracker), fio, qemu-img (for --format vmdk).

Also the home of the helpers bench/resync.py and bench/tracker_overhead.py share (scratch directory with
loop devices, fio runs, a protected deployment, machine facts); the rest comes from initial_replication.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from profiling import Profiler, proc_usage

from standby.admin.localdeploy import LocalDeployment
from standby.admin.testdisk import make_test_disk
from standby.plumbing.config import parse_size
from standby.plumbing.errors import StandbyError

RESULTS = Path(__file__).resolve().parent / "results"
MACHINE = "bench"
MB = 1_000_000
REPORT_INTERVAL = 2.0  # the agent reports its counters (epochs, dirty bytes, tracker CPU) this often


# -- shared helpers -------------------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def code_state() -> dict[str, Any]:
    """The code measured: the checkout the imported standby packages come from (not necessarily this bench
    script's), its commit and the source files changed on top of it (uncommitted work shows in figures too).
    Running an older checkout's install under these scripts (a before/after in one harness) names that one."""
    import standby.agent

    repo = Path(standby.agent.__file__).resolve().parents[1]
    source = [".", ":!bench", ":!tests", ":!*.md"]

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True).stdout

    diff = git("diff", "HEAD", "--", *source)
    return {
        "checkout": str(repo),
        "commit": git("rev-parse", "HEAD").strip(),
        "src_modified": [line[3:] for line in git("status", "--porcelain", "--", *source).splitlines()],
        "src_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sigterm_as_interrupt() -> None:
    """SIGTERM (e.g. from `timeout`) cleans up like Ctrl-C: daemons, fio, loop devices, temporary directory."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


class Scratch:
    """A temporary directory and the loop devices attached to files in it; all removed on exit."""

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.loops: list[str] = []
        self.deployments: list[LocalDeployment] = []

    def attach(self, image: Path, direct_io: bool = False) -> str:
        """A loop device over `image`; `direct_io`: it reads and writes the file with direct I/O, which
        costs the machine what a real disk costs (no copy through the file's page cache; see
        initial_replication.LOOP_MODE)."""
        mode = ["--direct-io=on"] if direct_io else []
        dev = subprocess.run(
            ["losetup", "--find", "--show", *mode, str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.loops.append(dev)
        return dev

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        for dep in self.deployments:
            try:
                dep.stop_all()  # SIGTERM by PID (the Popen objects it started)
            except Exception as e:  # cleanup goes on whatever failed
                print(f"stopping the deployment: {e!r}", file=sys.stderr)
            for p in dep.procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for dev in self.loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def source_image(path: Path, size: int, fill: int) -> None:
    """A sparse image of `size` bytes whose first `fill` bytes hold the demo's data mix, the rest zeros."""
    make_test_disk(path, fill)
    os.truncate(path, size)


def fio(dev: str, out: Path, *, seconds: float, bs: str, engine: str = "libaio", iodepth: int = 4,
        rate: int | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """Start fio randwrite (O_DIRECT, time based) on `dev`; its JSON report goes to `out`."""
    args = fio_args(dev, out, seconds=seconds, bs=bs, engine=engine, iodepth=iodepth, rate=rate, extra=extra)
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def fio_args(dev: str, out: Path, *, seconds: float, bs: str, engine: str = "libaio", iodepth: int = 4,
             rate: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """fio's command line for fio() (bench/failback.py runs it under a shell that records its pid)."""
    args = ["fio", "--name=bench", f"--filename={dev}", "--rw=randwrite", f"--bs={bs}", "--direct=1",
            f"--ioengine={engine}", f"--iodepth={iodepth}", "--time_based", f"--runtime={seconds}",
            "--randrepeat=0", "--norandommap", "--output-format=json", f"--output={out}", *extra]
    if rate:
        args.append(f"--rate={rate}")
    return args


def fio_result(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    """Wait for fio; its job's `write` section plus the job's CPU figures."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    text = out.read_text()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    return {**job["write"], "usr_cpu": job["usr_cpu"], "sys_cpu": job["sys_cpu"]}


def stop_proc(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def disk_of(st: dict[str, Any], machine: str = MACHINE) -> dict[str, Any]:
    return next(d for d in st["disks"] if d["machine"] == machine)


def deploy(scratch: Scratch, dev: str, fmt: str = "raw", cache_quota: int = 8 << 30,
           **agent_options: Any) -> tuple[LocalDeployment, Path, float]:
    """Process server, master target mt1 and agent `bench` protecting `dev`; returns once the replica is
    synced and caught up: (deployment, replica path, seconds of the initial sync)."""
    dep = LocalDeployment(scratch.root / "standby", cache_quota=cache_quota)
    scratch.deployments.append(dep)
    dep.init()
    dep.start("ps")
    dep.enroll("mt", "mt1")
    dep.start("mt", "mt1")
    dep.enroll("agent", MACHINE)
    dep.add_disk(MACHINE, "disk0", dev)
    if agent_options:
        dep.set_agent_option(MACHINE, **agent_options)
    dep.start("agent", MACHINE)
    dep.wait_disks_known(MACHINE, 1)
    dep.wait_mt_connected("mt1")
    rdir = scratch.root / "replicas"
    rdir.mkdir()
    t0 = time.monotonic()
    res = dep.admin().call("protect", machine=MACHINE, mt="mt1", format=fmt, replica_dir=str(rdir), replicas={})
    dep.wait_synced(MACHINE, timeout=3600)
    synced = time.monotonic() - t0
    dep.wait_caught_up(MACHINE, time.time(), timeout=300)
    return dep, Path(res["disks"][0]["replica"]), round(synced, 2)


def restart_agent(dep: LocalDeployment, sig: int = signal.SIGTERM) -> None:
    dep.kill(f"agent-{MACHINE}", sig)
    dep.start("agent", MACHINE)


def identical(dev: str, replica: Path, fmt: str) -> dict[str, Any]:
    """Compare the source with the replica: cmp for raw, qemu-img compare otherwise."""
    if fmt in ("raw", "device"):
        res = subprocess.run(["cmp", dev, str(replica)], capture_output=True, text=True)
        tool = "cmp"
    else:
        res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", dev, str(replica)],
                             capture_output=True, text=True)
        tool = "qemu-img compare"
    out = {"identical": res.returncode == 0, "tool": tool}
    if res.returncode != 0:
        out["output"] = (res.stdout + res.stderr).strip()[-300:]
    return out


def usage(dep: LocalDeployment) -> dict[str, dict[str, float]]:
    return {k: proc_usage(p.pid) for k, p in dep.procs.items() if p.poll() is None}


def cpu_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k.split("-")[0]: round(after[k]["cpu_seconds"] - before[k]["cpu_seconds"], 2) for k in after if k in before}


def percentile(values: list[float], p: float) -> float:
    """Nearest rank."""
    if not values:
        return math.inf
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def finite(x: float | None, digits: int = 2) -> float | None:
    return None if x is None or math.isinf(x) else round(x, digits)


def write_result(out: Path, results: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


# -- churn ----------------------------------------------------------------------------------------------------


def run_level(dep: LocalDeployment, dev: str, tmp: Path, bs: str, rate_mb: float, args: argparse.Namespace,
              ) -> dict[str, Any]:
    client = dep.admin()
    prof = Profiler(args.profile or tmp, f"churn-{bs}-{rate_mb:g}")
    if args.profile and rate_mb == args.profile_rate:
        for key, p in dep.procs.items():
            prof.attach(key, p.pid)
    u0 = usage(dep)
    samples: list[dict[str, Any]] = []
    t0 = time.time()
    out = tmp / "fio.json"
    proc = fio(dev, out, seconds=args.seconds, bs=bs, engine=args.engine, iodepth=args.iodepth,
               rate=int(rate_mb * MB))
    try:
        while proc.poll() is None:
            tick = time.monotonic()
            try:
                d = disk_of(client.call("status", machine=MACHINE))
                samples.append({"t": time.time() - t0, **{k: d.get(k) for k in (
                    "rpo_seconds", "dirty_bytes", "backlog_bytes", "last_point_seq", "epochs", "inconsistent_epochs",
                    "tracker_cpu_seconds", "bytes_wire", "replication")}})
            except StandbyError as exc:
                samples.append({"t": time.time() - t0, "error": str(exc)})
            time.sleep(max(0.0, args.sample - (time.monotonic() - tick)))
        f = fio_result(proc, out)
    finally:
        stop_proc(proc)
    t1 = time.time()
    profiled = prof.stop()
    u1 = usage(dep)
    caught_up = None
    try:
        dep.wait_caught_up(MACHINE, t1, timeout=args.catchup_timeout)
        caught_up = round(time.time() - t1, 2)
    except StandbyError:
        pass
    u2 = usage(dep)
    ok = [s for s in samples if "error" not in s]
    rpo = [math.inf if s["rpo_seconds"] is None else s["rpo_seconds"] for s in ok]
    seqs = {s["last_point_seq"] for s in ok}
    epochs = [s["epochs"] for s in ok if s.get("epochs") is not None]
    incons = [s["inconsistent_epochs"] for s in ok if s.get("inconsistent_epochs") is not None]
    tcpu = [s["tracker_cpu_seconds"] for s in ok if s.get("tracker_cpu_seconds") is not None]
    dur = t1 - t0
    # The agent's counters are per agent process: a negative delta means a restart's stale report; drop it.
    ep = (epochs[-1] - epochs[0]) if len(epochs) > 1 and epochs[-1] >= epochs[0] else None
    inc = (incons[-1] - incons[0]) if len(incons) > 1 and incons[-1] >= incons[0] and ep is not None else None
    points = ep - inc if ep is not None and inc is not None else None
    level = {
        "block_size": bs,
        "target_MBps": rate_mb,
        "achieved_MBps": round(f["bw_bytes"] / MB, 1),
        "achieved_iops": round(f["iops"]),
        "fio_clat_p99_us": round(f["clat_ns"]["percentile"]["99.000000"] / 1000, 1),
        "seconds": round(dur, 2),
        "samples": len(samples),
        "status_errors": len(samples) - len(ok),
        "rpo_p50": finite(percentile(rpo, 50)),
        "rpo_p99": finite(percentile(rpo, 99)),
        "rpo_max": finite(max(rpo, default=math.inf)),
        "rpo_missing_samples": sum(1 for r in rpo if math.isinf(r)),
        # Distinct newest points seen in the samples: a lower bound when points come faster than samples.
        "points_seen": max(len(seqs) - 1, 0),
        "points_per_minute_seen": round(max(len(seqs) - 1, 0) / dur * 60, 1),
        # From the agent's report (refreshed every 2 s, so over about the level): epochs completed, those that
        # made no point, and points (the rest).
        "agent_epochs": ep,
        "agent_epochs_without_point": inc,
        "agent_points": points,
        "points_per_minute": round(points / dur * 60, 1) if points is not None else None,
        "seconds_per_epoch": round(dur / ep, 2) if ep else None,
        "dirty_bytes_max": max((s["dirty_bytes"] or 0 for s in ok), default=None),
        "cache_backlog_bytes_max": max((s["backlog_bytes"] or 0 for s in ok), default=None),
        "wire_bytes": (ok[-1]["bytes_wire"] - ok[0]["bytes_wire"]) if len(ok) > 1 else None,
        "cpu_seconds_during_level": cpu_delta(u0, u1),
        "cpu_seconds_catching_up": cpu_delta(u1, u2),
        "tracker_cpu_seconds": round(tcpu[-1] - tcpu[0], 3) if len(tcpu) > 1 and tcpu[-1] >= tcpu[0] else None,
        "catch_up_seconds": caught_up,
        **({"profile": profiled} if profiled else {}),
    }
    level["passed"] = (level["rpo_p99"] is not None and level["rpo_p99"] <= args.rpo_target
                       and level["status_errors"] == 0)
    # Clearly failing: most samples over the target, no catch-up, or the source itself could not write that fast.
    p50 = level["rpo_p50"]
    level["clearly_failed"] = (p50 is None or p50 > args.rpo_target or caught_up is None
                               or level["achieved_MBps"] < 0.8 * rate_mb)
    return level


def sweep(dep: LocalDeployment, dev: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bs in args.block_sizes:
        levels = []
        for rate in args.rates:
            level = run_level(dep, dev, tmp, bs, rate, args)
            levels.append(level)
            print(f"  bs {bs} {rate:g} MB/s: achieved {level['achieved_MBps']} MB/s, RPO p50 {level['rpo_p50']} "
                  f"p99 {level['rpo_p99']}, points seen {level['points_seen']}, epochs {level['agent_epochs']} "
                  f"(no point {level['agent_epochs_without_point']}), cpu {level['cpu_seconds_during_level']}, "
                  f"catch-up {level['catch_up_seconds']} s", file=sys.stderr, flush=True)
            if level["catch_up_seconds"] is None:
                dep.wait_caught_up(MACHINE, time.time(), timeout=1800)  # before anything else runs
            if level["clearly_failed"]:
                break
        best = [lv["achieved_MBps"] for lv in levels if lv["passed"]]
        out[bs] = {
            "highest_target_MBps_passing": max((lv["target_MBps"] for lv in levels if lv["passed"]), default=None),
            "highest_achieved_MBps_passing": max(best, default=None),
            "levels": levels,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="source disk size (sparse file)")
    ap.add_argument("--fill", default="1G", help="how much of it holds data first (demo mix)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each rate level")
    ap.add_argument("--rates", default="10,25,50,100,150", help="fio rates to try, MB/s (10^6), increasing")
    ap.add_argument("--block-sizes", default="4k,64k")
    ap.add_argument("--cut-interval", default="1.0", help="agent cut_interval(s), comma separated: one sweep each")
    ap.add_argument("--batch", default=None, help="agent batch size, e.g. 2M (default: the agent's default)")
    ap.add_argument("--format", default="raw", choices=["raw", "vmdk"])
    ap.add_argument("--engine", default="libaio", choices=["libaio", "psync"])
    ap.add_argument("--iodepth", type=int, default=4)
    ap.add_argument("--sample", type=float, default=0.5, help="status sampling interval, seconds")
    ap.add_argument("--rpo-target", type=float, default=5.0)
    ap.add_argument("--catchup-timeout", type=float, default=300.0)
    ap.add_argument("--profile", type=Path, default=None,
                    help="attach py-spy to each daemon during the --profile-rate levels; summaries go here")
    ap.add_argument("--profile-rate", type=float, default=100.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "churn.json")
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.block_sizes = args.block_sizes.split(",")
    cuts = [float(c) for c in args.cut_interval.split(",")]
    size, fill = parse_size(args.size), parse_size(args.fill)
    if os.geteuid() != 0:
        print("needs root (loop device, kernel tracker)", file=sys.stderr)
        return 2
    sigterm_as_interrupt()
    results: dict[str, Any] = {
        "benchmark": "churn",
        "when": now_utc(),
        "machine": machine_facts(),
        "code": code_state(),
        "disk_bytes": size,
        "filled_bytes": fill,
        "data_mix": "first --fill bytes: 1 MiB regions 3/8 text, 3/8 random, 2/8 zero (standby.admin.testdisk); "
        "the rest zeros",
        "replica_format": args.format,
        "fio": {"rw": "randwrite", "direct": 1, "ioengine": args.engine, "iodepth": args.iodepth,
                "seconds_per_level": args.seconds, "range": "whole device"},
        "rpo_target_seconds": args.rpo_target,
        "sample_interval_seconds": args.sample,
    }
    with Scratch("standby-churn-") as scratch:
        image = scratch.root / "source.img"
        source_image(image, size, fill)
        dev = scratch.attach(image, direct_io=True)
        results["source_device"] = "loop device with --direct-io=on over a sparse file"
        options: dict[str, Any] = {"cut_interval": cuts[0]}
        if args.batch is not None:
            options["batch_size"] = args.batch
        results["agent_batch_size"] = args.batch or "the agent's default"
        dep, replica, synced = deploy(scratch, dev, args.format, **options)
        results["initial_sync_seconds"] = synced
        results["runs"] = []
        for i, cut in enumerate(cuts):
            if i:
                dep.set_agent_option(MACHINE, cut_interval=cut)
                restart_agent(dep)  # clean stop, no writes meanwhile: no resync
                dep.wait_caught_up(MACHINE, time.time(), timeout=300)
                time.sleep(REPORT_INTERVAL + 0.5)  # the new agent's report replaces the old one's counters
            d = disk_of(dep.status())
            print(f"cut_interval {cut} s (tracker {d['tracker']})", file=sys.stderr, flush=True)
            run = {"cut_interval": cut, "tracker": d["tracker"], "by_block_size": sweep(dep, dev, scratch.root, args)}
            run["resyncs"] = disk_of(dep.status())["last_resync"]
            results["runs"].append(run)
        dep.wait_caught_up(MACHINE, time.time(), timeout=1800)
        dep.kill(f"agent-{MACHINE}", signal.SIGTERM)  # nothing writes any more; compare a still replica
        results["final_compare"] = identical(dev, replica, args.format)
        results["summary"] = {
            f"cut {r['cut_interval']} s, bs {bs}": v["highest_target_MBps_passing"]
            for r in results["runs"] for bs, v in r["by_block_size"].items()
        }
    write_result(args.out, results)
    return 0 if results["final_compare"]["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
