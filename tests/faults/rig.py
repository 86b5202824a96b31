"""The fault campaign's rig: one deployment with small volumes that fill up, two protected machines
and three live workloads, plus the low-level tools the faults are made of (TCP resets, signals,
ballast files, a damaged cache record).

Layout (all on loop devices, one deployment per campaign — start-up costs seconds, a trial must not):

- machine ``src``, disk ``disk0`` (256 MiB): the write-order workload in its first 4 MiB, and an
  incompressible burst region from 8 MiB on (filled with random data before protection, so every later
  overwrite journals incompressible old contents too);
- machine ``fs``, disk ``disk1`` (128 MiB): protected empty, then ``mkfs.ext4``, mounted, and files
  copied onto it and deleted again;
- the process server's cache on its own 128 MiB ext4 volume, the master target's retention journal on
  its own 160 MiB ext4 volume: both fill up under the churn (and under ballast files on purpose).

Two machines, not two disks of one, so that a disk the product stops applying does not stop the
judging of the other (pause and points are per machine).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.admin.client import AdminClient
from standby.proto.frames import HEADER_SIZE, scan_records
from tests import writeorder
from tests.deploy import LocalDeployment

from .judge import BLOCK, BurstModel, block_hashes

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]

SRC_SIZE = 256 * MiB
ORDER_SLOTS = 1024  # 4 MiB of write-order records at the start of disk0
BURST_START = 8 * MiB
FS_SIZE = 128 * MiB
CACHE_VOLUME = 128 * MiB
RETENTION_VOLUME = 160 * MiB
ORDER_RATE = 200  # write-order records per second (each an O_DIRECT | O_DSYNC 4 KiB write)

# Daemon key (as in LocalDeployment.procs) -> (kind, name) to start it again.
DAEMONS = {"ps": ("ps", ""), "mt-mt1": ("mt", "mt1"), "agent-src": ("agent", "src"), "agent-fs": ("agent", "fs")}
MACHINES = {"src": "disk0", "fs": "disk1"}


def sh(*cmd: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def mkfs_mount(dev: str, mnt: Path) -> None:
    # -m 0: no blocks reserved for root — the daemons run as root, and "full" must mean full to them.
    sh("mkfs.ext4", "-q", "-F", "-m", "0", dev)
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", dev, str(mnt))


def umount(mnt: Path) -> None:
    """Unmount; lazily if busy, so a loop device is never detached under a mount."""
    if not os.path.ismount(mnt):
        return
    for _ in range(10):
        if sh("umount", str(mnt), check=False).returncode == 0:
            return
        time.sleep(0.5)
    sh("umount", "-l", str(mnt), check=False)


# -- workloads --------------------------------------------------------------------------------------
@dataclass
class OrderRun:
    """One run of the write-order writer: its records explain points cut in [ready_at, until)."""

    number: int
    seed: int
    log: Path
    launched_at: float
    ready_at: float = 0.0
    stopped_at: float | None = None
    until: float | None = None  # the next run starts formatting here


class OrderWorkload:
    """The write-order writer (python -m tests.writeorder write) as a process, restarted with a new seed
    and log now and then: judging is linear in the log, and a long run must not slow down with it."""

    def __init__(self, dev: str, workdir: Path, rng: random.Random) -> None:
        self.dev = dev
        self.dir = workdir
        self.rng = rng
        self.runs: list[OrderRun] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> OrderRun:
        if self.proc is not None:
            self.stop()
        n = len(self.runs) + 1
        run = OrderRun(n, self.rng.getrandbits(62), self.dir / f"writes-{n}.log", time.time())
        if self.runs:
            self.runs[-1].until = run.launched_at
        self.runs.append(run)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.writeorder", "write", self.dev, "--offset", "0", "--slots",
             str(ORDER_SLOTS), "--log", str(run.log), "--rate", str(ORDER_RATE), "--seconds", "86400",
             "--seed", str(run.seed), "--sync", "direct"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" after the region is formatted (seconds at most)
        if line.strip() != "ready":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"write-order writer did not start: {line!r} {err}")
        run.ready_at = time.time()
        return run

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.runs[-1].stopped_at = time.time()
        self.proc = None

    def run_at(self, t: float) -> OrderRun | None:
        """The run whose records explain a point at instant t (None: before the first run was ready, or
        while a run was formatting the region)."""
        for r in self.runs:
            if r.ready_at <= t and (r.until is None or t < r.until):
                return r
        return None


class BurstWriter(threading.Thread):
    """Large incompressible writes (1-4 MiB, O_DIRECT | O_DSYNC, one at a time) at random places of the
    burst region: a trickle all the time, and storms of many MiB back to back when a trial asks."""

    def __init__(self, dev: str, model: BurstModel, end: int, rng: random.Random) -> None:
        super().__init__(name="burst-writer", daemon=True)
        self.dev = dev
        self.model = model
        self.start_off = model.first * BLOCK
        self.end = end
        self.rng = rng
        self.stopping = threading.Event()
        self.storm_left = 0
        self.storm_done = threading.Event()
        self.storm_done.set()
        self.error: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def storm(self, nbytes: int) -> None:
        with self._lock:
            self.storm_left += nbytes
            self.storm_done.clear()
        self._wake.set()

    def wait_storm(self, timeout: float) -> bool:
        return self.storm_done.wait(timeout)

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()
        self.join(timeout=30)

    def run(self) -> None:
        fd = os.open(self.dev, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC | os.O_CLOEXEC)
        buf = mmap.mmap(-1, 4 * MiB)  # page aligned, as O_DIRECT wants
        try:
            while not self.stopping.is_set():
                with self._lock:
                    storming = self.storm_left > 0
                if not storming:
                    self._wake.wait(self.rng.uniform(0.1, 1.0))
                    self._wake.clear()
                    if self.stopping.is_set():
                        break
                size = self.rng.randint(1, 4) * MiB
                off = self.rng.randrange(self.start_off, self.end - size + 1, BLOCK)
                data = os.urandom(size)
                buf[:size] = data
                number, submit = self.model.begin(off // BLOCK, size // BLOCK)
                try:
                    done = os.pwritev(fd, [memoryview(buf)[:size]], off)
                    if done != size:
                        raise OSError(f"short write {done} of {size}")
                except OSError as exc:
                    self.model.abandon()
                    self.error = f"burst write at {off}: {exc}"
                    break
                self.model.end(number, off // BLOCK, block_hashes(data), submit)
                with self._lock:
                    if self.storm_left > 0:
                        self.storm_left = max(self.storm_left - size, 0)
                        if self.storm_left == 0:
                            self.storm_done.set()
        finally:
            with self._lock:
                self.storm_left = 0
                self.storm_done.set()
            buf.close()
            os.close(fd)


class FsWorkload(threading.Thread):
    """Files written and copied onto the mounted ext4 of disk1 (and deleted again to stay under a bound),
    a trickle all the time and a copy burst of many MiB when a trial asks."""

    LIMIT = 64 * MiB

    def __init__(self, mnt: Path, pool: Path, rng: random.Random) -> None:
        super().__init__(name="fs-workload", daemon=True)
        self.mnt = mnt
        self.pool = sorted(pool.iterdir())
        self.rng = rng
        self.stopping = threading.Event()
        self.burst_left = 0
        self.files: list[tuple[Path, int]] = []
        self.total = 0
        self.count = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def copy_burst(self, nbytes: int) -> None:
        with self._lock:
            self.burst_left += nbytes

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)

    def _trim(self, need: int) -> None:
        while self.files and self.total + need > self.LIMIT:
            path, size = self.files.pop(0)
            path.unlink(missing_ok=True)
            self.total -= size

    def run(self) -> None:
        while not self.stopping.is_set():
            with self._lock:
                bursting = self.burst_left > 0
            if not bursting:
                self.stopping.wait(self.rng.uniform(0.2, 1.0))
            src = self.rng.choice(self.pool)
            size = src.stat().st_size
            self._trim(size)
            self.count += 1
            dst = self.mnt / f"d{self.count % 16}" / f"f{self.count}"
            try:
                dst.parent.mkdir(exist_ok=True)
                shutil.copyfile(src, dst)
                if self.rng.random() < 0.5:
                    with open(dst, "rb+") as f:
                        os.fsync(f.fileno())
            except OSError as exc:
                if len(self.errors) < 20:
                    self.errors.append(str(exc))
                self._trim(self.LIMIT)
                continue
            self.files.append((dst, size))
            self.total += size
            with self._lock:
                self.burst_left = max(self.burst_left - size, 0)


def make_pool(pool: Path, rng: random.Random) -> None:
    """Files to copy: random (incompressible) and text, 16 KiB to 3 MiB."""
    pool.mkdir(parents=True, exist_ok=True)
    for i in range(24):
        size = rng.choice([16 * 1024, 200 * 1024, MiB, 2 * MiB, 3 * MiB])
        if i % 3:
            data = rng.randbytes(size)
        else:
            line = b"%06d the quick brown fox jumps over the lazy dog\n" % i
            data = (line * (size // len(line) + 1))[:size]
        (pool / f"p{i}").write_bytes(data)


# -- the rig ----------------------------------------------------------------------------------------
@dataclass
class Disk:
    machine: str
    name: str
    dev: str
    size: int
    replica: Path = Path()
    disk_id: int = 0


@dataclass
class Rig:
    root: Path
    make_loop: Callable[..., str]
    rng: random.Random
    agent_options: dict[str, Any] = field(default_factory=dict)
    dep: LocalDeployment = field(init=False)
    disks: dict[str, Disk] = field(default_factory=dict)  # machine -> its disk
    mounts: list[Path] = field(default_factory=list)
    cache_mnt: Path = field(init=False)
    retention_mnt: Path = field(init=False)
    fs_mnt: Path = field(init=False)
    order: OrderWorkload = field(init=False)
    bursts: BurstWriter = field(init=False)
    files: FsWorkload = field(init=False)
    model: BurstModel = field(init=False)
    quota: int = 1 << 30
    volumes: dict[str, int] = field(default_factory=dict)  # "cache"/"retention" -> bytes

    @property
    def cache_dir(self) -> Path:
        return self.cache_mnt / "cache"

    @property
    def retention_dir(self) -> Path:
        return self.retention_mnt / "retention"

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.cache_mnt = self.root / "cachefs"
        self.retention_mnt = self.root / "retentionfs"
        self.fs_mnt = self.root / "fsmnt"
        src = self.make_loop(SRC_SIZE, "src")
        fsd = self.make_loop(FS_SIZE, "fsdisk")
        cache = self.volumes.get("cache", CACHE_VOLUME)
        retention = self.volumes.get("retention", RETENTION_VOLUME)
        for dev, mnt in ((self.make_loop(cache, "cachefs"), self.cache_mnt),
                         (self.make_loop(retention, "retentionfs"), self.retention_mnt)):
            mkfs_mount(dev, mnt)
            self.mounts.append(mnt)
        self.disks = {"src": Disk("src", "disk0", src, SRC_SIZE), "fs": Disk("fs", "disk1", fsd, FS_SIZE)}
        self.model = BurstModel(BURST_START // BLOCK, self._fill_burst_region(src))

        dep = self.dep = LocalDeployment(self.root / "deploy", cache_quota=self.quota)
        dep.init()
        dep.set_ps_option(cache_dir=str(self.cache_dir))
        dep.start("ps")
        dep.enroll("mt", "mt1")
        # Small segments so that a small volume can be pruned at all; every point kept for a day (the
        # campaign's own rule: a point may only disappear oldest first, by space pressure).
        dep.set_mt_option("mt1", dir=str(self.retention_dir), reserve="4M", segment_size="8M",
                          tiers=[[86400, 0]])
        self.retention_dir.mkdir()
        dep.start("mt", "mt1")
        for machine, disk in self.disks.items():
            dep.enroll("agent", machine)
            dep.add_disk(machine, disk.name, disk.dev)
            dep.set_agent_option(machine, **self.agent_options)
            dep.start("agent", machine)
            dep.wait_disks_known(machine, 1)
        dep.wait_mt_connected("mt1")
        rdir = self.root / "replicas"
        rdir.mkdir()
        for machine, disk in self.disks.items():
            res = dep.admin().call("protect", machine=machine, mt="mt1", format="raw", replica_dir=str(rdir),
                                   replicas={}, existing=False)
            disk.replica = Path(res["disks"][0]["replica"])
        for machine in self.disks:
            dep.wait_synced(machine, timeout=240)
        for machine, disk in self.disks.items():
            listed = self.admin_call("points", machine=machine)["disks"][0]
            disk.disk_id = int(listed["disk_id"])

    def _fill_burst_region(self, dev: str) -> Any:
        """Random data over the burst region; returns its block hashes (the model's initial state)."""
        hashes = []
        with open(dev, "r+b", buffering=0) as f:
            for off in range(BURST_START, SRC_SIZE, 4 * MiB):
                data = self.rng.randbytes(min(4 * MiB, SRC_SIZE - off))
                os.pwrite(f.fileno(), data, off)
                hashes.append(block_hashes(data))
            os.fsync(f.fileno())
        out = hashes[0]
        for h in hashes[1:]:
            out.extend(h)
        return out

    def start_workloads(self) -> None:
        src, fsd = self.disks["src"], self.disks["fs"]
        self.order = OrderWorkload(src.dev, self.root, self.rng)
        self.order.start()
        self.bursts = BurstWriter(src.dev, self.model, SRC_SIZE, random.Random(self.rng.getrandbits(64)))
        self.bursts.start()
        # The file-system workload starts with mkfs on the replicated disk (issue 9, finding 2's trigger).
        mkfs_mount(fsd.dev, self.fs_mnt)
        self.mounts.append(self.fs_mnt)
        make_pool(self.root / "pool", random.Random(self.rng.getrandbits(64)))
        self.files = FsWorkload(self.fs_mnt, self.root / "pool", random.Random(self.rng.getrandbits(64)))
        self.files.start()

    def stop_workloads(self) -> None:
        """Stop writing everywhere; the file system is unmounted (clean) so the source stays still."""
        if hasattr(self, "bursts") and self.bursts.is_alive():
            self.bursts.stop()
        if hasattr(self, "order"):
            self.order.stop()
        if hasattr(self, "files") and self.files.is_alive():
            self.files.stop()
        os.sync()
        if self.fs_mnt in self.mounts:
            umount(self.fs_mnt)
            self.mounts.remove(self.fs_mnt)

    def teardown(self) -> None:
        """Everything this rig made goes, even after a failure: workloads, daemons, mounts (the make_loop
        fixture detaches the loop devices afterwards)."""
        try:
            self.stop_workloads()
        finally:
            try:
                if hasattr(self, "dep"):
                    for key in list(self.dep.procs):
                        self.cont(key)
                    self.dep.stop_all()
            finally:
                for mnt in reversed(self.mounts):
                    umount(mnt)
                self.mounts.clear()

    # -- admin --------------------------------------------------------------------------------------
    def admin_call(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """One admin request, bounded as a whole (dial, handshake and answer)."""
        client = AdminClient(self.dep.ps_dir / "admin", self.dep.server)
        return asyncio.run(asyncio.wait_for(client.acall(op, timeout, **args), timeout + 5))

    def status(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Status, or None when the process server does not answer (stopped, restarting)."""
        try:
            return self.admin_call("status", timeout=timeout)
        except Exception:  # any failure to answer is "no status" to the campaign, which then waits
            return None

    def disk_status(self, st: dict[str, Any], machine: str) -> dict[str, Any] | None:
        return next((d for d in st["disks"] if d["machine"] == machine), None)

    # -- daemons ------------------------------------------------------------------------------------
    def pid(self, key: str) -> int | None:
        p = self.dep.procs.get(key)
        return p.pid if p is not None and p.poll() is None else None

    def start(self, key: str) -> None:
        kind, name = DAEMONS[key]
        self.dep.start(kind, name)

    def restart(self, key: str, sig: int = signal.SIGTERM) -> None:
        self.cont(key)
        self.dep.kill(key, sig)
        self.start(key)

    def signal(self, key: str, sig: int) -> bool:
        pid = self.pid(key)
        if pid is None:
            return False
        os.kill(pid, sig)
        return True

    def cont(self, key: str) -> None:
        pid = self.pid(key)
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def dead_daemons(self) -> dict[str, int]:
        """Daemons that exited by themselves: key -> exit code."""
        return {k: p.returncode for k, p in self.dep.procs.items() if p.poll() is not None}

    # -- fault tools --------------------------------------------------------------------------------
    def connections(self, pid: int) -> list[int]:
        """Local ports of `pid`'s established TCP connections to the process server."""
        out = sh("ss", "-tnpH", "state", "established", check=False).stdout
        ports = []
        for line in out.splitlines():
            if f"pid={pid}," not in line:
                continue
            cols = line.split()
            local, peer = cols[2], cols[3]
            if peer.rsplit(":", 1)[-1] == str(self.dep.port):
                ports.append(int(local.rsplit(":", 1)[-1]))
        return ports

    def reset_connections(self, key: str) -> int:
        """Reset (RST, both ends) every connection of daemon `key` to the process server; how many."""
        pid = self.pid(key)
        if pid is None:
            return 0
        n = 0
        p = self.dep.port
        for lport in self.connections(pid):
            flt = f"( sport = :{lport} and dport = :{p} ) or ( sport = :{p} and dport = :{lport} )"
            res = sh("ss", "-K", "state", "established", flt, check=False)
            if res.returncode == 0 and len(res.stdout.splitlines()) > 1:  # a header, then the sockets reset
                n += 1
        return n

    def ballast(self, mnt: Path, leave: int) -> int:
        """Fill the volume at `mnt` with a ballast file until `leave` bytes are free; the ballast's size."""
        st = os.statvfs(mnt)
        size = st.f_bfree * st.f_frsize - leave
        if size <= 0:
            return 0
        fd = os.open(mnt / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            pass  # as much as fitted: the volume is full either way
        finally:
            os.close(fd)
        return (mnt / "ballast").stat().st_size

    def remove_ballast(self, mnt: Path) -> None:
        (mnt / "ballast").unlink(missing_ok=True)

    def free_bytes(self, mnt: Path) -> int:
        st = os.statvfs(mnt)
        return st.f_bfree * st.f_frsize

    def damage_last_cache_record(self, machine: str) -> dict[str, Any] | None:
        """Flip bytes in the payload of the last record of the newest cache segment of `machine`'s disk
        (the process server must be down). Returns what was damaged, None if that disk has no record."""
        d = self.cache_dir / f"disk-{self.disks[machine].disk_id}"
        segs = sorted(s for s in d.glob("seg-*.log") if s.stat().st_size > 0)
        if not segs:
            return None
        seg = segs[-1]
        data = seg.read_bytes()
        records, good_end, problem = scan_records(data)
        if not records:
            return None
        r = records[-1]
        payload_len = r.end - r.offset - HEADER_SIZE
        at = r.offset + HEADER_SIZE + self.rng.randrange(max(payload_len - 8, 1))
        with open(seg, "r+b") as f:
            old = os.pread(f.fileno(), 8, at)
            os.pwrite(f.fileno(), bytes(b ^ 0x5A for b in old), at)
            os.fsync(f.fileno())
        return {"segment": seg.name, "sequence": r.header.sequence, "record_offset": r.offset,
                "record_bytes": r.end - r.offset, "damaged_at": at, "tail_problem_before": problem,
                "bytes_after_record": len(data) - good_end}

    def log_sizes(self) -> dict[str, int]:
        return {k: len(self.dep.log_text(k)) for k in DAEMONS}

    def new_log(self, key: str, since: dict[str, int]) -> str:
        return self.dep.log_text(key)[since.get(key, 0) :]


RESYNC_LINE = re.compile(r"disk (\S+): (\w+) resync \(generation (\d+)\): (.*)$", re.M)


def order_check(image: bytes, run: OrderRun) -> writeorder.Verdict:
    return writeorder.check(image, 0, ORDER_SLOTS, run.log)
