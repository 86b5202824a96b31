#!/usr/bin/env python3
"""Benchmark: initial replication of a loop device with the demo's data mix, side by side with
rsync over ssh (zstd) and a plain dd copy, in the same run. Writes JSON; never part of the tests.

    python3 bench/initial_replication.py [--size 2G] [--out bench/results/initial_replication.json]

Needs root (loop device, a private sshd on 127.0.0.1 for the rsync baseline), qemu-img, rsync, sshd.
Caches are dropped before each contender so each starts from a cold source.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from profiling import Profiler, machine_busy, proc_usage

from standby.admin.localdeploy import LocalDeployment, free_port
from standby.admin.testdisk import make_test_disk
from standby.plumbing.config import parse_size

# The source disk is a loop device reading its backing file with direct I/O: like a real disk, reading
# it costs the machine no copy through a second page cache. In the default (buffered) mode the loop
# device's kernel worker spent about 17 % of this 2-core machine copying and zeroing pages during a run
# (perf), CPU that every contender (standby, rsync, dd) paid and no real disk costs.
LOOP_MODE = ("--direct-io=on",)
SOURCE_DEVICE = "loop device with --direct-io=on over a sparse file"


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def run_standby(root: Path, source: str, size: int, level: int | None, batch: str | None,
                profile: Path | None = None) -> dict:
    dep = LocalDeployment(root / "standby", cache_quota=8 << 30)
    try:
        dep.init()
        dep.start("ps")
        dep.enroll("mt", "mt1")
        dep.start("mt", "mt1")
        dep.enroll("agent", "bench")
        dep.add_disk("bench", "disk0", source)
        if level is not None:
            dep.set_agent_option("bench", compression_level=level)
        if batch is not None:
            dep.set_agent_option("bench", batch_size=batch)
        dep.start("agent", "bench")
        dep.wait_disks_known("bench", 1)
        dep.wait_mt_connected("mt1")
        (root / "replicas").mkdir()
        drop_caches()
        prof = Profiler(profile or root, "initial_replication")
        if profile:
            for key, proc in dep.procs.items():
                prof.attach(key, proc.pid)
        idle = {k: proc_usage(p.pid)["rss_bytes"] for k, p in dep.procs.items()}  # connected, nothing to do yet
        t0, busy0 = time.monotonic(), machine_busy()
        res = dep.admin().call("protect", machine="bench", mt="mt1", format="vmdk", replica_dir=str(root / "replicas"))
        st = dep.wait_synced("bench", timeout=3600)
        elapsed, busy1 = time.monotonic() - t0, machine_busy()
        profiled = prof.stop()
        # When the agent had everything acknowledged by the process server (its cache durable), against
        # when the replica had it: which half of the pipeline bounds the run.
        sent = re.search(r"initial replication sent \d+ MiB in ([\d.]+) s", (dep.logs / "agent-bench.log").read_text())
        usage = {k: {**proc_usage(p.pid), "rss_before_bytes": idle[k]} for k, p in dep.procs.items()}
        d = st["disks"][0]
        replica = res["disks"][0]["replica"]
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", source, replica],
                             capture_output=True, text=True)
        return {
            "seconds": round(elapsed, 2),
            "logical_MBps": round(size / elapsed / 1e6, 1),
            "agent_sent_seconds": float(sent[1]) if sent else None,
            "machine_cpu_busy_percent": round(100 * (busy1[0] - busy0[0]) / (busy1[1] - busy0[1]), 1),
            "bytes_on_wire": d["bytes_wire"],
            "nonzero_data_bytes": d["bytes_data"],
            "compression_ratio": round(d["compression_ratio"], 3) if d["compression_ratio"] else None,
            "daemons": usage,
            "identical": cmp.returncode == 0,
            **({"profile": profiled} if profiled else {}),
        }
    finally:
        dep.stop_all()


def start_sshd(root: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    hostkey, userkey = root / "hostkey", root / "userkey"
    for k in (hostkey, userkey):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
    auth = root / "authorized_keys"
    shutil.copy(f"{userkey}.pub", auth)
    os.chmod(auth, 0o600)
    port = free_port()
    conf = root / "sshd_config"
    conf.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\nAuthorizedKeysFile {auth}\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
                    f"PidFile {root / 'sshd.pid'}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(conf)], stderr=open(root / "sshd.log", "wb"))
    time.sleep(0.5)
    return proc, port, userkey


def run_rsync(root: Path, source: str, size: int) -> dict:
    proc, port, key = start_sshd(root)
    try:
        dest = root / "rsync-dest.img"
        ssh = f"ssh -p {port} -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"
        drop_caches()
        t0 = time.monotonic()
        res = subprocess.run(["rsync", "--copy-devices", "--inplace", "--compress", "--compress-choice=zstd",
                              "--stats", "-e", ssh, source, f"root@127.0.0.1:{dest}"], capture_output=True, text=True)
        elapsed = time.monotonic() - t0
        if res.returncode != 0:
            return {"error": res.stderr.strip()[-500:]}
        sent = 0
        for line in res.stdout.splitlines():
            if line.startswith("Total bytes sent:"):
                sent = int(line.split(":")[1].strip().replace(",", ""))
        cmp = subprocess.run(["cmp", source, str(dest)], capture_output=True)
        return {"seconds": round(elapsed, 2), "logical_MBps": round(size / elapsed / 1e6, 1),
                "bytes_on_wire": sent, "identical": cmp.returncode == 0}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_dd(root: Path, source: str, size: int) -> dict:
    dest = root / "dd-dest.img"
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={source}", f"of={dest}", "bs=16M", "conv=fsync", "status=none"], check=True)
    elapsed = time.monotonic() - t0
    return {"seconds": round(elapsed, 2), "logical_MBps": round(size / elapsed / 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--standby-only", action="store_true", help="skip the rsync and dd baselines (for tuning)")
    ap.add_argument("--level", type=int, default=None, help="agent zstd level (default: the agent's default)")
    ap.add_argument("--batch", default=None, help="agent batch size, e.g. 16M (default: the agent's default)")
    ap.add_argument("--buffered-loop", action="store_true",
                    help="source loop device in losetup's default buffered mode (as before issue 14's figures)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="attach py-spy to each daemon and write summaries to this directory")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "initial_replication.json")
    args = ap.parse_args()
    size = parse_size(args.size)
    if os.geteuid() != 0:
        print("needs root (loop device, private sshd)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="standby-bench-"))
    loop = None
    # SIGTERM (e.g. from `timeout`) cleans up like Ctrl-C: daemons, loop device, temporary directory.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        image = root / "source.img"
        make_test_disk(image, size)
        mode = () if args.buffered_loop else LOOP_MODE
        loop = subprocess.run(["losetup", "--find", "--show", *mode, str(image)], check=True, capture_output=True,
                              text=True).stdout.strip()
        results = {
            "benchmark": "initial_replication",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
            "disk_bytes": size,
            "source_device": "loop device, buffered (losetup's default)" if args.buffered_loop else SOURCE_DEVICE,
            "data_mix": "1 MiB regions: 3/8 text, 3/8 random, 2/8 zero (standby.admin.testdisk)",
            "standby": run_standby(root, loop, size, args.level, args.batch, args.profile),
        }
        if not args.standby_only:
            results["rsync_ssh_zstd"] = run_rsync(root, loop, size)
            results["dd_ceiling"] = run_dd(root, loop, size)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
        return 0
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
