"""`standby demo`: the whole path on one machine, verified by an outside judge.

Makes a test disk (a loop device when run as root, else a sparse image file), starts the three daemons
on 127.0.0.1 with a fresh deployment, protects the disk into a thin VMDK, shows progress, verifies the
replica, then keeps writing to the source for a while (continuous delta replication, RPO and recovery
points shown live), stops writing, waits for a recovery point after the last write and verifies again;
prints a summary and cleans up.

Verifying trusts nothing of ours on the replica side: `qemu-img compare` judges source against replica,
and the xxh3-128 digest of the source must equal that of the replica's guest data as an outside reader
gets it: a raw replica read as a plain file, a VMDK converted to raw by qemu-img (never our own writer,
whose reader would share any misunderstanding of the format with it). So a VMDK demo needs qemu-img.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tqdm import tqdm

from standby.plumbing.config import parse_size
from standby.plumbing.errors import BadInput, StandbyError
from standby.proto.checksum import StreamDigest

from .localdeploy import LocalDeployment
from .testdisk import make_test_disk

CHUNK = 16 * 1024 * 1024
QEMU_IMG = "qemu-img"


def attach_loop(image: Path) -> str | None:
    """A loop device over `image` when we can make one (root + losetup), else None."""
    if shutil.which("losetup") is None:
        return None
    try:
        res = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def digest(path: str | Path, size: int) -> str:
    """xxh3-128 of the first `size` bytes of a file or device, opened read-only (a shorter one differs)."""
    h = StreamDigest()
    with open(path, "rb") as f:
        for off in range(0, size, CHUNK):
            h.update(f.read(min(CHUNK, size - off)))
    return h.hexdigest()


def digest_replica(fmt: str, replica: Path, size: int) -> str:
    """The digest of the replica's guest data: a raw replica as it is, a VMDK through `qemu-img convert` to a
    temporary raw file beside it (sparse: only the data is written)."""
    if fmt == "raw":
        return digest(replica, size)
    plain = replica.with_name(replica.name + ".verify.raw")
    try:
        res = subprocess.run(
            [QEMU_IMG, "convert", "-f", "vmdk", "-O", "raw", str(replica), str(plain)], capture_output=True, text=True
        )
        if res.returncode != 0:
            raise StandbyError(f"qemu-img convert could not read the replica {replica}: {res.stderr.strip()}")
        return digest(plain, size)
    finally:
        plain.unlink(missing_ok=True)


def run_demo(keep: Path | None, size_text: str, fmt: str = "vmdk", churn_seconds: float = 10.0) -> int:
    size = parse_size(size_text)
    if size < 16 << 20 or size % (1 << 20):
        raise BadInput("--size must be a whole number of MiB, at least 16M")
    if fmt != "raw" and shutil.which(QEMU_IMG) is None:
        raise BadInput("verifying a VMDK replica needs qemu-img (apt-get install qemu-utils), or use --format raw")
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise BadInput(f"{keep} exists and is not empty")
        root = keep
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="standby-demo-"))
    dep = LocalDeployment(root)
    loop_dev: str | None = None
    # SIGTERM cleans up like Ctrl-C: stop the daemons, detach the loop device, remove the directory.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        print(f"standby demo in {root}")
        image = root / "source.img"
        print(f"  making a {size >> 20} MiB test disk (zeros, text, random data)…", flush=True)
        make_test_disk(image, size)
        loop_dev = attach_loop(image)
        source = loop_dev or str(image)
        print(f"  source disk: {source}" + ("" if loop_dev else " (image file: not root, so no loop device)"))
        dep.init()
        dep.start("ps")
        dep.enroll("mt", "mt1")
        dep.start("mt", "mt1")
        dep.enroll("agent", "demo")
        dep.add_disk("demo", "disk0", source)
        dep.start("agent", "demo")
        print(f"  deployment: process server {dep.server}, master target mt1, agent demo (mutual TLS)")
        dep.wait_disks_known("demo", 1)
        dep.wait_mt_connected("mt1")
        replicas = root / "replicas"
        replicas.mkdir()
        t0 = time.monotonic()
        res = dep.admin().call("protect", machine="demo", mt="mt1", format=fmt, replica_dir=str(replicas))
        replica = Path(res["disks"][0]["replica"])
        print(f"  protecting demo/disk0 -> {replica} ({fmt})")
        status = watch_progress(dep, size)
        elapsed = time.monotonic() - t0
        d = status["disks"][0]
        print("  verifying…", flush=True)
        ok = verify(source, replica, fmt, size)
        wire, data = d["bytes_wire"], d["bytes_data"]
        if churn_seconds > 0 and ok:
            ok = continuous(dep, source, replica, fmt, size, churn_seconds)
        print("summary:")
        print(f"  time to a synced replica: {elapsed:.1f} s; logical {size / elapsed / 1e6:.0f} MB/s")
        print(
            f"  bytes on the wire: {wire / 1e6:.1f} MB for {size / 1e6:.0f} MB of disk "
            f"({data / 1e6:.0f} MB non-zero data)"
        )
        print(f"  compression ratio (non-zero data / wire): {data / wire:.2f}x" if wire else "  nothing sent")
        print("demo passed" if ok else "demo FAILED: the replica differs from the source")
        if keep is not None:
            print(f"kept in {root}: deployment in ps/, replica in replicas/, logs in logs/")
        return 0 if ok else 1
    finally:
        dep.stop_all()
        if loop_dev:
            subprocess.run(["losetup", "-d", loop_dev], capture_output=True)
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


class Churn(threading.Thread):
    """Writes random 4 KiB and 64 KiB blocks to the source, synchronously (O_DIRECT on a device), at about
    `rate` bytes per second — a stand-in for a busy machine."""

    def __init__(self, path: str, size: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.path, self.size, self.rate = path, size, rate
        self.halt = threading.Event()
        self.written = 0
        self.error: OSError | None = None

    def run(self) -> None:
        rng = random.Random()
        flags = os.O_WRONLY | (os.O_DIRECT if self.path.startswith("/dev/") else 0)
        buf = mmap.mmap(-1, 64 * 1024)
        t0 = time.monotonic()
        try:
            fd = os.open(self.path, flags)
            try:
                while not self.halt.is_set():
                    n = rng.choice((4096, 65536))
                    buf[:n] = rng.randbytes(n)
                    os.pwrite(fd, memoryview(buf)[:n], rng.randrange(self.size // n) * n)
                    self.written += n
                    ahead = self.written / self.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc


def continuous(dep: LocalDeployment, source: str, replica: Path, fmt: str, size: int, seconds: float) -> bool:
    print(f"  continuous replication: writing to the source for {seconds:.0f} s (about 20 MB/s)…", flush=True)
    churn = Churn(source, size, 20e6)
    churn.start()
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        time.sleep(1.0)
        d = dep.status("demo")["disks"][0]
        print("   ", live_line(d), flush=True)
    churn.halt.set()
    churn.join()
    if churn.error is not None:
        raise StandbyError(f"writing to the source failed: {churn.error}")
    stopped = time.time()
    print(f"  stopped writing ({churn.written / 1e6:.0f} MB written); waiting for a point after the last write…")
    d = wait_settled(dep, stopped)
    print("   ", live_line(d), flush=True)
    ok = verify(source, replica, fmt, size)
    print(f"  recovery points made while writing: {d['points_last_minute']} in the last minute")
    return ok


def live_line(d: dict) -> str:
    rpo = d.get("rpo_seconds")
    dirty = d.get("dirty_bytes")
    return (
        f"RPO {'-' if rpo is None else f'{rpo:.1f} s'}  points/min {d.get('points_last_minute', 0)}  "
        f"dirty {'-' if dirty is None else f'{dirty / 1e6:.1f} MB'}  "
        f"backlog {d['backlog_bytes'] / 1e6:.1f} MB  tracker {d.get('tracker') or '-'}"
    )


def wait_settled(dep: LocalDeployment, since: float, timeout: float = 300.0) -> dict:
    """With the kernel tracker: until a point at or after `since` is applied. The full-scan tracker makes
    no points, so with it: until nothing is dirty or pending for a few seconds after a full scan."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        d = dep.status("demo")["disks"][0]
        idle = d["applied_seq"] == d["received_seq"] and d["replication"] == "Delta"
        if idle and (d["last_point_time"] or 0) >= since:
            return d
        if d.get("tracker") == "full-scan":
            quiet = quiet + 1 if idle and d.get("dirty_bytes") == 0 and time.time() > since + 5 else 0
            if quiet >= 10:
                return d
        time.sleep(0.3)
    raise StandbyError("the replica did not catch up in time; see the logs (run with --keep DIR)")


def watch_progress(dep: LocalDeployment, size: int, timeout: float = 1800.0) -> dict:
    deadline = time.monotonic() + timeout
    with tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="  initial replication",
        file=sys.stdout,
        dynamic_ncols=True,
    ) as bar:
        while time.monotonic() < deadline:
            st = dep.status("demo")
            d = st["disks"][0]
            bar.update(d["bytes_done"] - bar.n)
            if d["error"]:
                bar.set_postfix_str(f"error: {d['error']}"[:60])
            if d["replication"] == "Delta":
                bar.update(size - bar.n)
                return st
            time.sleep(0.2)
    raise StandbyError("replication did not finish in time; see the logs (run with --keep DIR)")


def verify(source: str, replica: Path, fmt: str, size: int) -> bool:
    ok = True
    qemu = shutil.which(QEMU_IMG)
    if qemu:
        rfmt = "raw" if fmt == "raw" else "vmdk"
        res = subprocess.run(
            [qemu, "compare", "-f", "raw", "-F", rfmt, source, str(replica)], capture_output=True, text=True
        )
        print(f"  qemu-img compare: {res.stdout.strip() or res.stderr.strip()}")
        ok = ok and res.returncode == 0
    else:
        print("  qemu-img compare: skipped (qemu-img not installed: apt-get install qemu-utils)")
    a, b = digest(source, size), digest_replica(fmt, replica, size)
    how = "read as a plain file" if fmt == "raw" else "read by qemu-img convert"
    print(f"  xxh3-128 source  {a}\n  xxh3-128 replica {b}  {'identical' if a == b else 'DIFFERENT'} ({how})")
    return ok and a == b
