#!/usr/bin/env python3
"""Benchmark: reprotect after a failover — the recovered machine replicates back into the original disk,
which still holds what it held at the failover, so only the blocks that differ should travel. Side by side,
on the same data, in the same run: rsync's delta transfer over ssh (zstd) from the recovered disk to a copy
of the original disk as it was before the reprotect, dd over ssh (every byte), and `standby reprotect --full`
(every block). Writes JSON; never part of the tests.

    python3 bench/reprotect.py [--size 4G] [--fractions 0.01,0.1] [--standby-only]

Per fraction: a two-site deployment on one machine (as tests/integration/test_roundtrip.py builds it): the
original disk (a loop device over a sparse file with standby.admin.testdisk's data mix) protected by agent
`src` into a raw replica at master target `mtdr`; failover --point latest-processed, commit, `src` stopped;
the replica attached as the recovered disk (a second loop device), agent `rec` on it; --fraction of the disk
overwritten there in scattered random 4 KiB blocks (O_DIRECT); then `standby reprotect src --agent rec --mt
mthome` timed until the round trip says "ready to fail back" and everything is applied. Wire bytes: the
status bytes_wire delta of rec's disk plus the hash bytes its agent reports. The --full contender needs a
round trip of its own (a fresh copy of the same original, the same changes: same seed). Caches are dropped
before each contender; after each, cmp checks that the target equals the recovered disk. Targets are reported,
not asserted: wire bytes <= 1.1x bytes differing + 1 % of the disk; standby at least 3x faster than rsync.

Needs root (loop devices, kernel tracker, private sshd on 127.0.0.1), rsync, sshd.
Also the home of the round-trip helpers bench/failback.py uses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from churn import (
    RESULTS,
    Scratch,
    code_state,
    disk_of,
    identical,
    machine_facts,
    now_utc,
    sigterm_as_interrupt,
    write_result,
)
from initial_replication import drop_caches, start_sshd
from resync import BLOCK, run_rsync, scatter

from standby.admin.localdeploy import LocalDeployment
from standby.admin.testdisk import make_test_disk
from standby.plumbing.config import load_toml, parse_size, save_toml
from standby.plumbing.errors import StandbyError

SRC, REC = "src", "rec"


# -- the two sites (bench/failback.py uses these too) ----------------------------------------------------------


@dataclass
class Sites:
    """One deployment with both sites: the original disk `orig` (loop over `orig_img`), the raw replica file
    at mtdr, and the recovered disk `rec_dev` (a loop over the replica) once attached."""

    scratch: Scratch
    dep: LocalDeployment
    orig: str
    orig_img: Path
    replica: Path
    rec_dev: str = ""


def cli(dep: LocalDeployment, *args: str, timeout: float = 900, as_json: bool = True) -> dict[str, Any]:
    """`standby ARGS [--json]` as the deployment's admin (as an operator runs it); its answer."""
    res = dep.run("admin", "--admin", str(dep.ps_dir / "admin"), "--server", dep.server, *args,
                  *(["--json"] if as_json else []), check=False, timeout=timeout)
    if res.returncode != 0:
        raise StandbyError(f"standby {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return json.loads(res.stdout) if as_json else {"output": res.stdout}


def trip(dep: LocalDeployment) -> dict[str, Any]:
    return next(t for t in dep.status()["roundtrips"] if t["name"] == SRC)


def copy_image(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def build(scratch: Scratch, pristine: Path, tag: str, rec_options: dict[str, Any] | None = None) -> Sites:
    """A fresh deployment whose original disk is a copy of `pristine`, protected by `src` into mtdr and
    synced; `rec` enrolled (its disk added once the recovered disk is attached) with `rec_options`."""
    root = scratch.root / tag
    root.mkdir()
    orig_img = root / "original.img"
    copy_image(pristine, orig_img)
    orig = scratch.attach(orig_img)
    dep = LocalDeployment(root / "standby", cache_quota=8 << 30)
    scratch.deployments.append(dep)
    dep.init()
    dep.start("ps")
    for mt in ("mtdr", "mthome"):
        dep.enroll("mt", mt)
        dep.start("mt", mt)
        dep.wait_mt_connected(mt)
    dep.enroll("agent", SRC)
    dep.add_disk(SRC, "disk0", orig)
    dep.start("agent", SRC)
    dep.wait_disks_known(SRC, 1)
    (root / "replicas").mkdir()
    replica = root / "replicas" / "src-disk0.img"
    cli(dep, "protect", SRC, "--mt", "mtdr", "--format", "raw", "--replica", f"disk0={replica}", as_json=False)
    dep.wait_synced(SRC, timeout=1800)
    dep.wait_caught_up(SRC, time.time(), timeout=300)
    dep.enroll("agent", REC)
    if rec_options:
        dep.set_agent_option(REC, **rec_options)
    return Sites(scratch, dep, orig, orig_img, replica)


def fail_over(s: Sites) -> None:
    """Failover to the newest applied point, commit, and the original machine goes down."""
    cli(s.dep, "failover", SRC, "--point", "latest-processed")
    cli(s.dep, "commit", SRC)
    s.dep.kill(f"agent-{SRC}", signal.SIGTERM)


def start_recovered(s: Sites) -> str:
    """Attach the replica as the recovered disk and start `rec` on it. When it has run before (an earlier round
    trip) it is pointed at the new loop device; reverse replication set its identity aside, so it is refused
    at the door until reprotect takes it back: nothing to wait for then."""
    s.rec_dev = s.scratch.attach(s.replica)
    conf = s.dep.root / f"agent-{REC}" / "agent.toml"
    raw = load_toml(conf)
    again = bool(raw.get("disks"))
    if again:
        raw["disks"][0]["path"] = s.rec_dev
        save_toml(conf, raw)
    else:
        s.dep.add_disk(REC, "disk0", s.rec_dev)
    s.dep.start("agent", REC)
    if not again:
        s.dep.wait_disks_known(REC, 1)
    return s.rec_dev


def detach(s: Sites, dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], check=True)
    s.scratch.loops.remove(dev)


def wait_trip(dep: LocalDeployment, state: str, timeout: float, machine: str = REC) -> dict[str, Any]:
    """Poll status until the round trip's state starts with `state` and `machine`'s disk has everything
    applied; that status."""
    def done(st: dict[str, Any]) -> bool:
        t = next((t for t in st["roundtrips"] if t["name"] == SRC), None)
        d = disk_of(st, machine)
        return (t is not None and t["state"].startswith(state) and d["replication"] == "Delta"
                and d["applied_seq"] == d["received_seq"])
    return dep.wait_for(done, timeout, f"round trip state {state!r}, everything applied", interval=0.1)


def resync_report(dep: LocalDeployment) -> dict[str, Any]:
    """The recovered agent's report of its comparison (sent every 2 s); {} when it sent none (a full copy)."""
    try:
        st = dep.wait_for(lambda s: (disk_of(s, REC).get("resync") or {}).get("phase") == "complete", 10,
                          "the agent's resync report")
    except StandbyError:
        return {}
    return disk_of(st, REC)["resync"]


def timed_reprotect(s: Sites, full: bool, timeout: float) -> dict[str, Any]:
    """`standby reprotect src --agent rec --mt mthome [--full]`, timed until ready to fail back and applied."""
    before = disk_of(s.dep.status(), REC)["bytes_wire"]
    drop_caches()
    m0 = time.monotonic()
    out = cli(s.dep, "reprotect", SRC, "--agent", REC, "--mt", "mthome", *(["--full"] if full else []))
    answered = time.monotonic() - m0
    done = wait_trip(s.dep, "ready to fail back", timeout)
    elapsed = time.monotonic() - m0
    rep = resync_report(s.dep)
    wire = disk_of(done, REC)["bytes_wire"] - before
    hashes = rep.get("hash_bytes") or 0
    history = [h for h in trip(s.dep)["history"] if h["phase"] == "reprotecting"][-1:]
    return {
        "seconds": round(elapsed, 2),
        "command_answered_seconds": round(answered, 2),
        "mode": out["mode"],
        "bytes_differing": rep.get("bytes_differing"),
        "bytes_shipped_logical": rep.get("bytes_shipped"),
        "bytes_wire_batches": wire,
        "hash_bytes": hashes,
        "bytes_on_wire": wire + hashes,
        "trip_history": history,
    }


# -- baselines ------------------------------------------------------------------------------------------------


def ssh_command(port: int, key: Path) -> str:
    return f"ssh -p {port} -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"


def run_dd_ssh(dev: str, dest: Path) -> dict[str, Any]:
    """dd of the whole recovered disk through ssh into a file (every byte travels, uncompressed)."""
    with Scratch("standby-ddssh-") as keys:
        proc, port, key = start_sshd(keys.root)
        try:
            drop_caches()
            t0 = time.monotonic()
            res = subprocess.run(f"dd if={dev} bs=16M status=none | {ssh_command(port, key)} root@127.0.0.1 "
                                 f"'dd of={dest} bs=16M iflag=fullblock conv=fsync status=none'",
                                 shell=True, capture_output=True, text=True)
            elapsed = time.monotonic() - t0
        finally:
            proc.terminate()  # the sshd this run started, by its Popen
            proc.wait(timeout=10)
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-500:]}
    size = int(subprocess.run(["blockdev", "--getsize64", dev], capture_output=True, text=True).stdout)
    return {"seconds": round(elapsed, 2), "bytes_on_wire_at_least": size}


def baselines(s: Sites, before: Path, args: argparse.Namespace) -> dict[str, Any]:
    """rsync and dd over ssh from the recovered disk (still, nothing running) to copies of the original
    disk as it was before the reprotect; each checked with cmp."""
    out: dict[str, Any] = {}
    with Scratch("standby-rsync-") as keys:  # run_rsync's sshd keys
        rs = run_rsync(keys, s.rec_dev, before)
    if "error" not in rs:
        rs.update(identical(s.rec_dev, before, "raw"))
    out["rsync_ssh_zstd"] = rs
    before.unlink()
    if not args.no_dd:
        dest = s.orig_img.parent / "dd-dest.img"
        dd = run_dd_ssh(s.rec_dev, dest)
        if "error" not in dd:
            dd.update(identical(s.rec_dev, dest, "raw"))
        dest.unlink(missing_ok=True)
        out["dd_ssh"] = dd
    return out


def tear_down(s: Sites, keep_logs: Path | None = None) -> None:
    """Stop the deployment and free its loop devices and files (the next round trip needs the space); its
    daemons' logs go to keep_logs/<round trip> first when asked."""
    s.dep.stop_all()
    if keep_logs is not None:
        shutil.copytree(s.dep.logs, keep_logs / s.orig_img.parent.name, dirs_exist_ok=True)
    for dev in (s.rec_dev, s.orig):
        if dev:
            detach(s, dev)
    shutil.rmtree(s.orig_img.parent, ignore_errors=True)


# -- one fraction ---------------------------------------------------------------------------------------------


def prepared(scratch: Scratch, pristine: Path, tag: str, count: int, seed: int) -> Sites:
    """Protected, failed over, committed; `rec` running on the recovered disk with `count` blocks changed."""
    s = build(scratch, pristine, tag)
    fail_over(s)
    start_recovered(s)
    scatter(s.rec_dev, os.path.getsize(pristine), count, seed)
    return s


def one_fraction(scratch: Scratch, pristine: Path, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    size = os.path.getsize(pristine)
    count = int(size // BLOCK * fraction)
    res: dict[str, Any] = {"fraction": fraction, "blocks_changed": count, "bytes_changed": count * BLOCK}
    s = prepared(scratch, pristine, f"f{fraction:g}", count, args.seed)
    before = s.orig_img.parent / "original-before.img"
    if not args.standby_only:
        copy_image(s.orig_img, before)  # src is stopped: the original disk is still
    st = timed_reprotect(s, False, args.timeout)
    st.update(identical(s.rec_dev, Path(s.orig), "raw"))
    res["standby"] = st
    s.dep.stop_all()  # nothing runs beside the baselines
    if not args.standby_only:
        res.update(baselines(s, before, args))
    tear_down(s, args.logs)
    if not args.standby_only:
        s = prepared(scratch, pristine, f"f{fraction:g}-full", count, args.seed)
        full = timed_reprotect(s, True, args.timeout)
        s.dep.kill(f"agent-{REC}", signal.SIGTERM)
        full.update(identical(s.rec_dev, Path(s.orig), "raw"))
        res["standby_full"] = full
        tear_down(s, args.logs)
    res["targets"] = targets(res, size)
    return res


def targets(res: dict[str, Any], size: int) -> dict[str, Any]:
    st = res["standby"]
    differing = st["bytes_differing"] if st["bytes_differing"] is not None else res["bytes_changed"]
    budget = 1.1 * differing + 0.01 * size
    out: dict[str, Any] = {"wire_bytes_budget": int(budget), "wire_bytes_ok": st["bytes_on_wire"] <= budget,
                           "differing_equals_changed": st["bytes_differing"] == res["bytes_changed"]}
    rs = res.get("rsync_ssh_zstd", {})
    if rs.get("seconds"):
        out["speedup_vs_rsync"] = round(rs["seconds"] / st["seconds"], 2)
        out["at_least_3x_faster_than_rsync"] = st["seconds"] * 3 <= rs["seconds"]
        out["wire_ratio_standby_to_rsync"] = round(st["bytes_on_wire"] / rs["bytes_on_wire"], 4)
    full = res.get("standby_full", {})
    if full.get("seconds"):
        out["speedup_vs_full"] = round(full["seconds"] / st["seconds"], 2)
    return out


def pristine_image(scratch: Scratch, size: int) -> Path:
    """The demo's data mix, made once per run; each round trip's original disk is a copy of it."""
    p = scratch.root / "pristine.img"
    make_test_disk(p, size)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--fractions", "--fraction", default="0.01,0.1",
                    help="shares of the disk changed on the recovered disk, comma separated")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--standby-only", action="store_true", help="skip rsync, dd and --full")
    ap.add_argument("--no-dd", action="store_true", help="skip the dd over ssh baseline")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--logs", type=Path, default=None, help="keep the daemons' logs of each round trip here")
    ap.add_argument("--out", type=Path, default=RESULTS / "reprotect.json")
    args = ap.parse_args()
    size = parse_size(args.size)
    if os.geteuid() != 0:
        print("needs root (loop devices, kernel tracker, private sshd)", file=sys.stderr)
        return 2
    sigterm_as_interrupt()
    results: dict[str, Any] = {
        "benchmark": "reprotect",
        "when": now_utc(),
        "machine": machine_facts(),
        "code": code_state(),
        "disk_bytes": size,
        "data_mix": "1 MiB regions: 3/8 text, 3/8 random, 2/8 zero (standby.admin.testdisk)",
        "changed": "scattered random 4 KiB blocks written with O_DIRECT on the recovered disk after failover+commit",
        "runs": [],
    }
    with Scratch("standby-reprotect-") as scratch:
        pristine = pristine_image(scratch, size)
        for fraction in (float(f) for f in args.fractions.split(",")):
            run = one_fraction(scratch, pristine, fraction, args)
            results["runs"].append(run)
            print(f"{fraction:.0%}: standby {run['standby']['seconds']} s {run['standby']['bytes_on_wire']} B, "
                  f"rsync {run.get('rsync_ssh_zstd', {}).get('seconds')} s, "
                  f"full {run.get('standby_full', {}).get('seconds')} s", file=sys.stderr, flush=True)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
    write_result(args.out, results)
    return 0 if all(r[k].get("identical", True) for r in results["runs"] for k in r if isinstance(r[k], dict)
                    and "identical" in r[k]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
