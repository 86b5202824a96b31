#!/usr/bin/env python3
"""Benchmark: checksum resync after the agent was killed (-9) and --fraction of the disk was overwritten in
scattered 4 KiB blocks while no agent ran, side by side with rsync's delta transfer over ssh (zstd) from
the same source to a copy of the replica as it was before the resync. Writes JSON; never part of the tests.

    python3 bench/resync.py [--size 4G] [--fraction 0.01] [--standby-only] [--repeat N] [--profile DIR]
                            [--no-direct-io]

Measured for standby: wall time from the agent's restart until the resync is done (last_resync.done_at)
and everything is applied; bytes on the wire (status bytes_wire delta) plus the hash bytes the master
target sent back; bytes differing; seconds to each step (from the daemons' log lines). For rsync
(--copy-devices --inplace --no-whole-file --ignore-times, zstd, ssh to a private sshd on 127.0.0.1):
wall time and Total bytes sent + received. Caches are dropped before each contender. Targets are
reported, not asserted: standby time <= 0.5x rsync's; wire bytes <= 1.1x differing + 1 % of the disk.

--repeat N kills the agent, overwrites other blocks and resyncs N times on the same deployment (the
first run is `standby`, all runs are in `standby_runs` with their median): alternate runs of two builds
compare better than single runs on a busy machine. --profile DIR samples every daemon with py-spy during
each resync (bench/profiling.py). The source loop device reads its file with direct I/O, as in the
initial_replication and churn benches: reading it then costs the machine what a real disk costs (no
second copy through the file's page cache, which every contender paid); --no-direct-io for the buffered
loop device of earlier figures.

Needs root (loop device, kernel tracker, private sshd), rsync, sshd.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import re
import signal
import statistics
import subprocess
import sys
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
    identical,
    machine_facts,
    now_utc,
    sigterm_as_interrupt,
    usage,
    write_result,
)
from initial_replication import drop_caches, start_sshd
from profiling import Profiler

from standby.admin.localdeploy import LocalDeployment
from standby.admin.testdisk import make_test_disk
from standby.plumbing.config import parse_size
from standby.plumbing.errors import StandbyError

BLOCK = 4096


def scatter(dev: str, size: int, count: int, seed: int) -> int:
    """Overwrite `count` distinct random 4 KiB blocks with random data (O_DIRECT); returns bytes written."""
    rng = random.Random(seed)
    blocks = sorted(rng.sample(range(size // BLOCK), count))
    buf = mmap.mmap(-1, BLOCK)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        for b in blocks:
            buf.seek(0)
            buf.write(rng.randbytes(BLOCK))
            os.pwrite(fd, buf, b * BLOCK)
    finally:
        os.close(fd)
    return len(blocks) * BLOCK


# Log lines (asctime, local time) that mark the resync's steps, per daemon (the hashing lines are not
# logged by builds before them).
MARKS = {
    f"agent-{MACHINE}": {"resync_begin": " resync (generation ", "source_hashed": ": source hashed in ",
                         "replica_hashes_came": ": the replica's hashes came after ",
                         "compared": ": checksum comparison: ", "complete": ": resync complete: "},
    "mt-mt1": {"replica_hashing": ": hashing replica ", "replica_hashed": ": replica hashed in "},
}


def log_phases(dep: LocalDeployment, t0: float) -> dict[str, Any]:
    """Seconds from the agent's restart (t0, wall clock) to each step, from the daemons' logs; plus the
    resync's own duration as the agent logs it."""
    out: dict[str, Any] = {}
    for daemon, marks in MARKS.items():
        out.update(_marks(dep.log_text(daemon), marks, t0))
    return dict(sorted(out.items(), key=lambda kv: kv[1] if kv[0] != "agent_logged_resync_seconds" else 1e9))


def _marks(text: str, marks: dict[str, str], t0: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in text.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
        if not m:
            continue
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        if t < t0 - 0.001:
            continue
        for name, mark in marks.items():
            if mark in line and name not in out:
                out[name] = round(t - t0, 2)
                if name == "complete":
                    out["agent_logged_resync_seconds"] = float(line.rsplit(",", 1)[1].split()[0])
    return out


def run_standby(dep: LocalDeployment, dev: str, timeout: float, prof: Profiler | None = None) -> dict[str, Any]:
    """Restart the (killed) agent and follow the resync it starts until it is done and applied."""
    client = dep.admin()
    before = disk_of(client.call("status", machine=MACHINE))
    u0 = usage(dep)
    drop_caches()
    t0 = time.time()
    m0 = time.monotonic()
    agent = dep.start("agent", MACHINE)
    if prof is not None:
        for key, p in dep.procs.items():
            prof.attach(key, p.pid if key != f"agent-{MACHINE}" else agent.pid)
    done = None
    while time.monotonic() - m0 < timeout:
        try:
            d = disk_of(client.call("status", machine=MACHINE))
        except StandbyError:
            time.sleep(0.1)
            continue
        lr = d.get("last_resync") or {}
        if (lr.get("done_at") or 0) > t0 and d["replication"] == "Delta" and d["applied_seq"] == d["received_seq"]:
            done = d
            break
        time.sleep(0.1)
    elapsed = time.monotonic() - m0
    profiled = prof.stop() if prof is not None else None
    if done is None:
        return {"error": f"the resync did not complete within {timeout:.0f} s", "phases": log_phases(dep, t0)}
    u1 = usage(dep)
    # The agent's own report of this resync (sent every 2 s): bytes differing / shipped, hash bytes.
    report = dep.wait_for(lambda s: (disk_of(s).get("resync") or {}).get("phase") == "complete", 30,
                          "the agent's resync report")
    rep = disk_of(report)["resync"]
    wire = done["bytes_wire"] - before["bytes_wire"]
    return {
        "seconds": round(elapsed, 2),
        "mode": done["last_resync"]["mode"],
        "reason": done["last_resync"]["reason"],
        "phases": log_phases(dep, t0),
        "bytes_differing": rep["bytes_differing"],
        "bytes_shipped_logical": rep["bytes_shipped"],
        "bytes_wire_batches": wire,
        "hash_bytes": rep["hash_bytes"],
        "bytes_on_wire": wire + rep["hash_bytes"],
        "cpu_seconds": {**cpu_delta(u0, u1), "agent": u1[f"agent-{MACHINE}"]["cpu_seconds"]},
        **({"profile": profiled} if profiled else {}),
    }


def run_rsync(scratch: Scratch, dev: str, dest: Path) -> dict[str, Any]:
    proc, port, key = start_sshd(scratch.root)
    try:
        ssh = f"ssh -p {port} -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"
        drop_caches()
        t0 = time.monotonic()
        res = subprocess.run(["rsync", "--copy-devices", "--inplace", "--no-whole-file", "--ignore-times",
                              "--compress", "--compress-choice=zstd", "--stats", "-e", ssh, dev,
                              f"root@127.0.0.1:{dest}"], capture_output=True, text=True)
        elapsed = time.monotonic() - t0
        if res.returncode != 0:
            return {"error": res.stderr.strip()[-500:]}
        stats: dict[str, int] = {}
        for line in res.stdout.splitlines():
            for key_, name in (("Total bytes sent:", "sent"), ("Total bytes received:", "received"),
                               ("Literal data:", "literal"), ("Matched data:", "matched")):
                if line.startswith(key_):
                    stats[name] = int(line.split(":")[1].split()[0].replace(",", ""))
        return {
            "seconds": round(elapsed, 2),
            "bytes_sent": stats.get("sent"),
            "bytes_received": stats.get("received"),
            "bytes_on_wire": stats.get("sent", 0) + stats.get("received", 0),
            "literal_data_bytes": stats.get("literal"),
            "matched_data_bytes": stats.get("matched"),
            "version": subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
        }
    finally:
        proc.terminate()  # the sshd this run started, by its Popen
        proc.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--fraction", type=float, default=0.01, help="share of the disk overwritten in 4 KiB blocks")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--standby-only", action="store_true", help="skip the rsync baseline")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "resync.json")
    ap.add_argument("--repeat", type=int, default=1, help="resyncs on the same deployment, each after a kill")
    ap.add_argument("--profile", type=Path, help="py-spy profiles of every daemon during each resync, here")
    ap.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=True,
                    help="source loop device with direct I/O (default; --no-direct-io: buffered, as before)")
    args = ap.parse_args()
    size = parse_size(args.size)
    if os.geteuid() != 0:
        print("needs root (loop device, kernel tracker, private sshd)", file=sys.stderr)
        return 2
    sigterm_as_interrupt()
    count = int(size // BLOCK * args.fraction)
    results: dict[str, Any] = {
        "benchmark": "resync",
        "when": now_utc(),
        "machine": machine_facts(),
        "code": code_state(),
        "disk_bytes": size,
        "data_mix": "1 MiB regions: 3/8 text, 3/8 random, 2/8 zero (standby.admin.testdisk)",
        "changed": f"{count} scattered random 4 KiB blocks ({args.fraction:.2%} of the disk), written with O_DIRECT "
        "while the agent was killed (-9)",
        "bytes_changed": count * BLOCK,
        "source_device": "loop device" + (" with --direct-io=on" if args.direct_io else " (buffered)"),
    }
    with Scratch("standby-resync-") as scratch:
        image = scratch.root / "source.img"
        make_test_disk(image, size)
        dev = scratch.attach(image, direct_io=args.direct_io)
        dep, replica, synced = deploy(scratch, dev, "raw")
        results["initial_sync_seconds"] = synced
        dep.kill(f"agent-{MACHINE}", signal.SIGKILL)  # no clean-stop record: the restart must resync
        scatter(dev, size, count, args.seed)
        rsync_dest = scratch.root / "rsync-dest.img"
        if not args.standby_only:  # the replica as it is before the resync, for rsync to bring up to date
            subprocess.run(["cp", "--sparse=always", str(replica), str(rsync_dest)], check=True)
        runs = []
        for i in range(args.repeat):
            if i:
                dep.kill(f"agent-{MACHINE}", signal.SIGKILL)
                scatter(dev, size, count, args.seed + i)
            prof = Profiler(args.profile, f"resync-{i}") if args.profile else None
            runs.append(run_standby(dep, dev, args.timeout, prof))
            print(f"resync {i}: {runs[-1].get('seconds')} s {runs[-1].get('phases')}", file=sys.stderr)
        dep.stop_all()  # nothing runs beside the baseline
        st = runs[0]
        st.update(identical(dev, replica, "raw"))
        results["standby"] = st
        if args.repeat > 1:
            secs = [r["seconds"] for r in runs if "seconds" in r]
            results["standby_runs"] = {"seconds": secs, "median_seconds": statistics.median(secs) if secs else None,
                                       "runs": runs[1:]}
        if not args.standby_only:
            rs = run_rsync(scratch, dev, rsync_dest)
            if "error" not in rs:
                rs.update(identical(dev, rsync_dest, "raw"))
            results["rsync_ssh_zstd"] = rs
        if "error" not in st:
            budget = 1.1 * st["bytes_differing"] + 0.01 * size
            results["targets"] = {
                "wire_bytes_budget": int(budget),
                "wire_bytes_ok": st["bytes_on_wire"] <= budget,
                "differing_equals_changed": st["bytes_differing"] == count * BLOCK,
            }
            rs = results.get("rsync_ssh_zstd", {})
            if rs.get("seconds"):
                results["targets"]["time_ratio_standby_to_rsync"] = round(st["seconds"] / rs["seconds"], 3)
                results["targets"]["time_ok"] = st["seconds"] <= 0.5 * rs["seconds"]
                results["targets"]["wire_ratio_standby_to_rsync"] = round(st["bytes_on_wire"] / rs["bytes_on_wire"], 4)
    write_result(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
