#!/usr/bin/env python3
"""Benchmark: the master target's retention journal, in process with real files (no daemons): the real
BatchBuilder seals DELTA batches from a source image, the real Applier / DiskWorker.write / DiskJournal /
recovery.move / copy_replica / undo_into apply them to and recover a raw replica. Writes JSON; never part of
the tests.

    python3 bench/retention.py [--quick] [--rate 1M] [--backs 60,600,3600] [--out FILE]

1. Apply throughput with the journal against without it, same batches, same run: (a) DiskWorker.write
   without a journal (Applier.write_group + one sync per group), (b) DiskWorker.write with it (old contents
   read, UNDO fsynced, write_group + sync) + DiskJournal.end_group (fsynced). Rounds of b, undo, a, with
   the replica rolled back to its start between runs by the journal (undo_into) and checked by hash.
2. Journal bytes per GB of churn (from the same runs), for mixed and for incompressible random data.
3. Failover in place (recovery.move) from the latest state back to points --backs groups back, after a
   history of one point per group (synthetic clock: 1 s per group) at --rate of churn per group; and the
   move forward again. Each measured from a fresh failover at the latest state; checked by hash.
   Also the start-up cost: DiskJournal.open() of the whole history (cold cache).
4. Test failover of a 4 GiB disk: copy_replica (copy_file_range over the data ranges) + undo_into to a point
   60 groups back, against `cp --sparse=always` (+ fsync) of the same file, in the same run.

Churn: random writes of 4..64 KiB (4 KiB aligned), 70 % in a hot 256 MiB area, 30 % anywhere on the disk;
data 3/8 random, 4/8 text, 1/8 zeros (mixed) or all random. Each group is cut exactly as the agent cuts an
epoch (DirtyMap extents, split_extents at 8 MiB, BatchBuilder.read_extents + delta_batch, then a sealed point
Marker). Sources live on tmpfs (they only feed the builder); replicas and the retention journal on --workdir.
Page caches of the replica and the journal are dropped (POSIX_FADV_DONTNEED) before every timed run.
Needs about 5.5 GB free on --workdir for the full run with the defaults, plus --reserve (checked before each
large write: a part that would go below it stops with an error in the JSON); everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from churn import RESULTS, code_state, machine_facts, now_utc, sigterm_as_interrupt, write_result

import standby.mastertarget.journal as mt_history
import standby.mastertarget.recovery as mt_recovery
from standby.admin.testdisk import PATTERN, REGION, make_test_disk
from standby.agent.config import DEFAULT_LEVEL
from standby.agent.dirtymap import DirtyMap, split_extents
from standby.agent.reader import BatchBuilder
from standby.mastertarget.apply import Applier
from standby.mastertarget.diskstate import ReplicaState
from standby.mastertarget.journal import DiskJournal
from standby.mastertarget.recovery import FailoverState, RedoLog, copy_replica, move, undo_into
from standby.mastertarget.replicas import Replica, open_replica
from standby.mastertarget.worker import DiskWorker
from standby.plumbing.config import parse_size
from standby.proto.envelope import Sealer
from standby.proto.messages import Batch, BatchKind, Marker, meta_bytes

KEY = bytes(range(32))
UID = uuid.UUID("00000000-0000-4000-8000-00000000be5c")
DISK = 1
GEN = 1
MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000
BLOCK = 4096
BATCH_SIZE = 8 * MiB  # the agent's default batch_size
HOT_OFFSET, HOT_BYTES, HOT_SHARE = 256 * MiB, 256 * MiB, 0.7
MIXED = (3 / 8, 4 / 8, 1 / 8)  # shares of churn writes holding random data, text, zeros
RANDOM = (1.0, 0.0, 0.0)
HASH_CHUNK = 8 * MiB
_ZERO_CHUNK = bytes(HASH_CHUNK)


# -- instrumentation --------------------------------------------------------------------------------------


class Meter:
    """Time and calls spent in selected functions (wrapped in place: module functions, class methods, one
    replica's methods) and in os.fsync; `delta(since)` gives what an operation cost."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        real = getattr(owner, attr)

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.seconds[name] += time.perf_counter() - t
                self.calls[name] += 1

        setattr(owner, attr, timed)

    def snap(self) -> tuple[dict[str, float], dict[str, int]]:
        return dict(self.seconds), dict(self.calls)

    def delta(self, since: tuple[dict[str, float], dict[str, int]]) -> dict[str, dict[str, float]]:
        s0, c0 = since
        return {k: {"seconds": round(v - s0.get(k, 0.0), 3), "calls": self.calls[k] - c0.get(k, 0)}
                for k, v in sorted(self.seconds.items()) if self.calls[k] - c0.get(k, 0)}


METER = Meter()


def instrument() -> None:
    """Phases of apply and recovery: reading old contents, the journal's records, redo capture, applying undo
    records, the syncs (every os.fsync: journal, replica, redo log, durable files)."""
    METER.wrap(os, "fsync", "os.fsync")
    METER.wrap(mt_history, "old_contents", "old_contents_read")
    METER.wrap(DiskJournal, "write_undo", "journal.write_undo")
    METER.wrap(DiskJournal, "end_group", "journal.end_group")
    METER.wrap(DiskJournal, "read_undo", "journal.read_undo")
    METER.wrap(Applier, "write_group", "applier.write_group")
    METER.wrap(mt_recovery, "apply_undo", "apply_undo")
    METER.wrap(mt_recovery, "_copy_data_ranges", "copy_data_ranges")
    METER.wrap(RedoLog, "__init__", "redo.open_and_index")
    METER.wrap(RedoLog, "push", "redo.push (read current contents, seal, append, one fsync)")
    METER.wrap(mt_recovery, "_put", "undo_pieces_written")
    METER.wrap(DiskJournal, "undo_ranges", "journal.undo_ranges (extent tables)")


# -- files --------------------------------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def tree_bytes(path: Path) -> int:
    return sum(allocated(p) for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def evict(*paths: Path) -> None:
    """Drop the (clean, already synced) page cache of files: the next reads come from the disk."""
    for p in paths:
        for f in ([p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def image_hash(path: Path) -> str:
    """A content hash of an image (holes and written zeros hash alike)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for off in range(0, size, HASH_CHUNK):
            data = os.pread(fd, HASH_CHUNK, off)
            h.update(b"Z" if data == _ZERO_CHUNK[: len(data)] else hashlib.sha256(data).digest())
    finally:
        os.close(fd)
    return h.hexdigest()[:32]


def copy_sparse(src: Path, dest: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Space:
    """Refuse to fill the work directory's file system (other work shares it)."""

    def __init__(self, path: Path, reserve: int) -> None:
        self.path = path
        self.reserve = reserve
        self.lowest = free_bytes(path)

    def check(self, where: str, need: int = 0) -> None:
        """Stop (RuntimeError) if writing `need` more bytes would leave less than the reserve free."""
        free = free_bytes(self.path)
        self.lowest = min(self.lowest, free)
        if free - need < self.reserve:
            raise RuntimeError(f"{where}: {free / GiB:.2f} GiB free on {self.path}, {need / GiB:.2f} GiB needed; "
                               f"stopping to leave {self.reserve / GiB:.1f} GiB (other work shares the disk)")


# -- the source disk and its churn ------------------------------------------------------------------------


@dataclass
class Group:
    """One epoch as the agent ships it: DELTA batches then a point marker."""

    batches: list[Batch]
    marker: Marker
    extents: list[tuple[int, int]]

    @property
    def first(self) -> int:
        return self.batches[0].sequence if self.batches else self.marker.sequence

    @property
    def logical(self) -> int:
        return sum(b.logical_bytes for b in self.batches)


class Source:
    """The protected disk: an image on tmpfs (it only feeds BatchBuilder; nothing here is measured) that the
    churn writes into before each group is read and sealed."""

    def __init__(self, path: Path, size: int, fill: int, data: str, seed: int) -> None:
        self.path, self.size = path, size
        self.rng = random.Random(seed)
        if data == "mixed":
            make_test_disk(path, fill, seed)
            os.truncate(path, size)
            self.mix = MIXED
        else:
            with open(path, "wb") as f:
                f.truncate(size)
                for off in range(0, fill, 64 * MiB):
                    f.write(self.rng.randbytes(min(64 * MiB, fill - off)))
            self.mix = RANDOM
        self.fd = os.open(path, os.O_RDWR)
        # Text for churn writes: the test disk's own text regions (its log-like lines).
        texts = [i for i in range(min(fill, 64 * MiB) // REGION) if PATTERN[i % len(PATTERN)] == "text"][:4]
        self.text = b"".join(os.pread(self.fd, REGION, i * REGION) for i in texts) if data == "mixed" else b""
        self.builder = BatchBuilder(str(path), DISK, KEY, UID.bytes, DEFAULT_LEVEL)
        self.sealer = Sealer(KEY, UID.bytes)
        self.seq = 1
        self.hot = (HOT_OFFSET, min(HOT_BYTES, size - HOT_OFFSET)) if size > HOT_OFFSET + 16 * MiB else (0, size)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)

    def write_churn(self, nbytes: int) -> list[tuple[int, int]]:
        """Random writes of 4..64 KiB until `nbytes` are written; returns the dirty extents (the agent's
        DirtyMap at 4 KiB: sorted, merged)."""
        rng, dm, done = self.rng, DirtyMap(self.size), 0
        while done < nbytes:
            n = rng.randint(1, 16) * BLOCK
            if rng.random() < HOT_SHARE:
                off = self.hot[0] + rng.randrange((self.hot[1] - n) // BLOCK) * BLOCK
            else:
                off = rng.randrange((self.size - n) // BLOCK) * BLOCK
            kind = rng.random()
            if kind < self.mix[0]:
                data = rng.randbytes(n)
            elif kind < self.mix[0] + self.mix[1]:
                at = rng.randrange((len(self.text) - n) // BLOCK) * BLOCK
                data = self.text[at : at + n]
            else:
                data = bytes(n)
            os.pwrite(self.fd, data, off)
            dm.mark(off, off + n)
            done += n
        return dm.extents()

    def group(self, nbytes: int, when: float) -> Group:
        """Churn, then cut: batches of at most 8 MiB read from the image, sealed, and a point marker."""
        extents = self.write_churn(nbytes)
        batches = []
        for part in split_extents(extents, BATCH_SIZE):
            pieces = self.builder.read_extents(part)
            batches.append(self.builder.delta_batch(GEN, self.seq, BatchKind.DELTA, pieces))
            self.seq += 1
        meta = {"generation": GEN, "kind": "point", "consistency": "crash-consistent", "time": when}
        marker = Marker(DISK, self.seq, meta, self.sealer.seal_batch(GEN, self.seq, meta_bytes(meta)))
        self.seq += 1
        return Group(batches, marker, extents)


# -- the master target's side ---------------------------------------------------------------------------


class Target:
    """One disk on the master target: a raw replica (copied from the source at the start), its Applier, its
    retention journal and the DiskWorker whose `write` applies a group."""

    def __init__(self, root: Path, source: Source, space: Space) -> None:
        self.root = root
        self.path = root / "replica.img"
        space.check(f"copying {source.path.name} to a replica", allocated(source.path))
        copy_sparse(source.path, self.path)
        self.size = source.size
        self.replica: Replica = open_replica("raw", self.path, self.size)
        self.applier = Applier(KEY, UID.bytes, self.replica)
        self.disks_dir = root / "disks"
        self.disks_dir.mkdir()
        self.state = ReplicaState(DISK, "bench", "disk0", str(UID), self.size, "raw", str(self.path), 0, GEN,
                                  "UpToDate")
        self.worker = DiskWorker(SimpleNamespace(cfg=SimpleNamespace(disks_dir=self.disks_dir)),  # type: ignore[arg-type]
                                 self.state, self.applier, self.new_journal())

    @property
    def journal(self) -> DiskJournal:
        return self.worker.journal

    @property
    def journal_dir(self) -> Path:
        return self.root / "retention" / str(UID)

    def new_journal(self) -> DiskJournal:
        """An empty retention journal (any previous one deleted)."""
        if hasattr(self, "worker"):
            self.journal.close()
        shutil.rmtree(self.journal_dir, ignore_errors=True)
        j = DiskJournal(self.journal_dir, DISK, KEY, UID.bytes)
        if j.open() is not None:
            raise RuntimeError("a fresh journal has a pending group")
        if hasattr(self, "worker"):
            self.worker.journal = j
        return j

    def apply(self, g: Group, journal: bool, save_state: bool = False) -> tuple[float, float, float]:
        """Apply one group as DiskWorker.apply_group does (with the journal, ask for the old contents; verify
        every record, then `write`, then the END when there is a journal). Returns seconds (verify, write,
        state save): the prefetch counts as verification time, which it overlaps in the daemon."""
        t0 = time.perf_counter()
        # As apply_group does (there in a thread, beside the verification). Older code (a before/after run
        # from an older checkout) has no prefetch.
        if journal and hasattr(self.worker, "prefetch_old_contents"):
            self.worker.prefetch_old_contents([*g.batches, g.marker])
        verified = [(b, self.applier.verify_batch(b)) for b in g.batches]
        self.applier.verify_marker(g.marker)
        t1 = time.perf_counter()
        if journal:
            self.worker.write(self.journal, g.first, verified)
            self.journal.end_group(g.first, g.marker.sequence, dict(g.marker.meta))
        else:
            self.worker.write(None, g.first, verified)
        t2 = time.perf_counter()
        self.state.applied_seq = g.marker.sequence
        if save_state:  # without a journal the daemon saves the state file after every group
            self.state.save(self.disks_dir)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    def undo_bytes(self) -> int:
        return sum(g.undo_bytes for g in self.journal.groups)

    def close(self) -> None:
        self.journal.close()
        self.replica.close()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def stats(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return {"p50_ms": round(s[len(s) // 2] * 1000, 2), "p99_ms": round(p99 * 1000, 2), "max_ms": round(s[-1] * 1000, 2)}


def mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / MB / seconds, 1) if seconds > 0 else 0.0


# -- 1 + 2: apply throughput, journal bytes --------------------------------------------------------------


def run_variant(t: Target, groups: list[Group], journal: bool, save_state: bool) -> dict[str, Any]:
    evict(t.path, t.root / "retention")
    m0 = METER.snap()
    verify: list[float] = []
    write: list[float] = []
    save: list[float] = []
    for g in groups:
        v, w, s = t.apply(g, journal, save_state)
        verify.append(v)
        write.append(w)
        save.append(s)
    logical = sum(g.logical for g in groups)
    wsec, vsec, ssec = sum(write), sum(verify), sum(save)
    out: dict[str, Any] = {
        "write_seconds": round(wsec, 3),
        "verify_seconds": round(vsec, 3),
        "MBps_write": mbps(logical, wsec),
        "MBps_verify_and_write": mbps(logical, wsec + vsec),
        "groups_per_second_write": round(len(groups) / wsec, 1),
        "groups_per_second_verify_and_write": round(len(groups) / (wsec + vsec), 1),
        "write_latency_per_group": stats(write),
        "phases": METER.delta(m0),
    }
    if save_state:
        out["state_save_seconds"] = round(ssec, 3)
        out["MBps_verify_write_and_state_save"] = mbps(logical, wsec + vsec + ssec)
    return out


def medians(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median over the rounds of the headline figures (the disk is shared: rounds vary)."""
    def med(get: Callable[[dict[str, Any]], float]) -> float:
        v = sorted(get(r) for r in rounds)
        return v[len(v) // 2] if len(v) % 2 else round((v[len(v) // 2 - 1] + v[len(v) // 2]) / 2, 3)

    return {
        "with_journal_MBps_write": med(lambda r: r["with_journal"]["MBps_write"]),
        "without_journal_MBps_write": med(lambda r: r["without_journal"]["MBps_write"]),
        "ratio_write": med(lambda r: r["ratio_with_to_without"]["write"]),
        "with_journal_MBps_verify_and_write": med(lambda r: r["with_journal"]["MBps_verify_and_write"]),
        "without_journal_MBps_verify_and_write": med(lambda r: r["without_journal"]["MBps_verify_and_write"]),
        "ratio_verify_and_write": med(lambda r: r["ratio_with_to_without"]["verify_and_write"]),
        "with_journal_groups_per_second_write": med(lambda r: r["with_journal"]["groups_per_second_write"]),
        "without_journal_groups_per_second_write": med(lambda r: r["without_journal"]["groups_per_second_write"]),
        "undo_into_MBps": med(lambda r: r["rollback"]["MBps"]),
    }


def rollback_all(t: Target, expect: str) -> dict[str, Any]:
    """Undo every group of the journal into the replica itself (back to where the run began)."""
    evict(t.path, t.root / "retention")
    groups = list(t.journal.groups)
    m0 = METER.snap()
    t0 = time.perf_counter()
    n = undo_into(t.journal, groups, t.replica)
    sec = time.perf_counter() - t0
    return {"groups": len(groups), "bytes_written": n, "seconds": round(sec, 3), "MBps": mbps(n, sec),
            "undo_record_bytes_read": t.undo_bytes(), "phases": METER.delta(m0),
            "replica_back_at_start": image_hash(t.path) == expect}


def apply_throughput(work: Path, shm: Path, data: str, size: int, fill: int, sizes: list[tuple[int, int]],
                     rounds: int, space: Space, seed: int) -> dict[str, Any]:
    src = Source(shm / f"apply-{data}.img", size, fill, data, seed)
    root = work / f"apply-{data}"
    root.mkdir()
    t = Target(root, src, space)
    space.check(f"apply {data}: replica copied")
    out: dict[str, Any] = {"disk_bytes": size, "filled_bytes": fill, "replica_allocated_bytes": allocated(t.path),
                           "by_group_size": []}
    try:
        for group_bytes, count in sizes:
            before = image_hash(src.path)
            t0 = time.perf_counter()
            groups = [src.group(group_bytes, time.time()) for _ in range(count)]
            build = time.perf_counter() - t0
            after = image_hash(src.path)
            logical = sum(g.logical for g in groups)
            res: dict[str, Any] = {
                "group_churn_bytes": group_bytes, "groups": count, "logical_bytes": logical,
                "batches": sum(len(g.batches) for g in groups),
                "extents": sum(len(b.extents) for g in groups for b in g.batches),
                "wire_payload_bytes": sum(len(e.payload) for g in groups for b in g.batches for e in b.extents),
                "agent_build_seconds": round(build, 2), "rounds": [],
            }
            for r in range(rounds):
                rnd: dict[str, Any] = {}
                if r:  # the replica holds the end state (from `a`); the last journal still describes it
                    rnd["rollback_before"] = rollback_all(t, before)
                t.new_journal()
                rnd["with_journal"] = run_variant(t, groups, True, False)
                rnd["with_journal"]["replica_matches_source"] = image_hash(t.path) == after
                space.check(f"apply {data}: with journal")
                if r == 0:
                    ub, jb = t.undo_bytes(), t.journal.bytes
                    res["journal"] = {
                        "undo_record_bytes": ub, "journal_file_bytes": jb,
                        "undo_bytes_per_logical_byte": round(ub / logical, 4),
                        "undo_bytes_per_GB_churn": round(ub / logical * 1e9),
                        "journal_bytes_per_GB_churn": round(jb / logical * 1e9),
                    }
                rnd["rollback"] = rollback_all(t, before)
                rnd["without_journal"] = run_variant(t, groups, False, True)
                rnd["without_journal"]["replica_matches_source"] = image_hash(t.path) == after
                w, wo = rnd["with_journal"], rnd["without_journal"]
                rnd["ratio_with_to_without"] = {
                    "write": round(w["MBps_write"] / wo["MBps_write"], 3),
                    "verify_and_write": round(w["MBps_verify_and_write"] / wo["MBps_verify_and_write"], 3),
                    "vs_daemon_path_with_state_save": round(
                        w["MBps_verify_and_write"] / wo["MBps_verify_write_and_state_save"], 3),
                }
                res["rounds"].append(rnd)
                print(f"  apply {data}, {group_bytes / MB:g} MB groups, round {r + 1}: with journal "
                      f"{w['MBps_write']} MB/s ({w['groups_per_second_write']} groups/s), without "
                      f"{wo['MBps_write']} MB/s ({wo['groups_per_second_write']} groups/s), undo "
                      f"{rnd['rollback']['MBps']} MB/s", file=sys.stderr, flush=True)
            res["median"] = medians(res["rounds"])
            t.new_journal()  # the replica is at the source's state: the next size goes on from there
            out["by_group_size"].append(res)
    finally:
        t.close()
        src.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


# -- 3: failover in place -----------------------------------------------------------------------------------


def build_history(t: Target, src: Source, count: int, group_bytes: int, space: Space,
                  ) -> Iterator[tuple[int, Group, float]]:
    """Apply `count` groups with the journal; yields (index from 1, group, seconds applying it). Clock: one
    second per group, ending now."""
    # Journal (measured 0.45x of churn for the mix) + replica blocks newly allocated (0.25x): 0.8x with margin.
    space.check("building history", int(count * group_bytes * 0.8))
    clock = time.time() - count
    for i in range(1, count + 1):
        g = src.group(group_bytes, clock + i)
        v, w, _ = t.apply(g, True)
        yield i, g, v + w
        if i % 200 == 0:
            space.check(f"history at group {i}", int((count - i) * group_bytes * 0.8))
            if i % 600 == 0:
                print(f"  history: {i}/{count} groups, journal {t.journal.bytes / MB:.0f} MB", file=sys.stderr,
                      flush=True)


def failover_times(work: Path, shm: Path, size: int, fill: int, group_bytes: int, backs: list[int],
                   space: Space, seed: int) -> dict[str, Any]:
    src = Source(shm / "failover.img", size, fill, "mixed", seed)
    root = work / "failover"
    root.mkdir()
    t = Target(root, src, space)
    n = max(backs) + 1
    want = {n - k for k in backs} | {n}
    snaps: dict[int, str] = {}
    seqs: dict[int, int] = {}
    extents: dict[int, list[tuple[int, int]]] = {}
    apply_s: list[float] = []
    logical = 0
    out: dict[str, Any] = {"disk_bytes": size, "filled_bytes": fill, "churn_bytes_per_group": group_bytes,
                           "groups": n}
    try:
        m0 = METER.snap()
        t0 = time.perf_counter()
        for i, g, sec in build_history(t, src, n, group_bytes, space):
            seqs[i], extents[i] = g.marker.sequence, g.extents
            apply_s.append(sec)
            logical += g.logical
            if i in want:
                snaps[i] = image_hash(src.path)
        ub, jb = t.undo_bytes(), t.journal.bytes
        out["history"] = {
            "seconds": round(time.perf_counter() - t0, 1), "logical_bytes": logical,
            "apply_with_journal_per_group": stats(apply_s),
            "apply_busy_fraction_of_each_second": round(sum(apply_s) / n, 4),
            "undo_record_bytes": ub, "journal_file_bytes": jb,
            "undo_bytes_per_GB_churn": round(ub / logical * 1e9),
            "journal_bytes_per_GB_churn": round(jb / logical * 1e9),
            "replica_allocated_bytes": allocated(t.path), "phases": METER.delta(m0),
        }
        space.check("history built")
        # Start-up: the master target opens (reads and scans) the whole journal of every disk.
        t.journal.close()
        evict(t.journal_dir)
        reopened = DiskJournal(t.journal_dir, DISK, KEY, UID.bytes)
        pending, open_s = timed(reopened.open)
        if pending is not None or reopened.last_seq != seqs[n]:
            raise RuntimeError("the reopened journal does not end at the last group")
        t.worker.journal = reopened
        out["history"]["journal_open_seconds_cold"] = round(open_s, 3)
        out["history"]["journal_open_MBps"] = mbps(jb, open_s)
        latest = seqs[n]
        out["moves"] = []
        for k in backs:
            point = n - k
            g = t.journal.find_point(seqs[point])
            assert g is not None
            fo = FailoverState(latest, latest, latest, g.time, time.time())
            window = DirtyMap(size)
            for i in range(point + 1, n + 1):
                window.mark_extents(extents[i])
            undo_read = sum(x.undo_bytes for x in t.journal.groups_after(seqs[point]))
            space.check(f"moving back {k} groups (REDO copy of the window)", int(undo_read * 1.5))
            evict(t.path, t.journal_dir)
            m0 = METER.snap()
            t0 = time.perf_counter()
            back = move(t.journal, t.replica, fo, seqs[point])
            back_s = time.perf_counter() - t0
            back_phases = METER.delta(m0)
            ok_back = image_hash(t.path) == snaps[point]
            redo = allocated(t.journal_dir / "redo.jrn") if (t.journal_dir / "redo.jrn").exists() else 0
            footprint = tree_bytes(root)
            space.check(f"moved back {k} groups")
            evict(t.path, t.journal_dir)
            m0 = METER.snap()
            t0 = time.perf_counter()
            fwd = move(t.journal, t.replica, fo, latest)
            fwd_s = time.perf_counter() - t0
            fwd_phases = METER.delta(m0)
            ok_fwd = image_hash(t.path) == snaps[n]
            # A new failover starts without a redo log: this one is over (the replica is at latest again).
            (t.journal_dir / "redo.jrn").unlink(missing_ok=True)
            (t.journal_dir / "failover.json").unlink(missing_ok=True)
            mv = {
                "groups_back": k,
                "point_age_seconds": k,  # synthetic clock: one group per second
                "back_seconds": round(back_s, 3),
                "back_bytes_written": back,
                "distinct_bytes_changed_in_window": window.dirty_bytes,
                "rewrite_factor": round(back / window.dirty_bytes, 2) if window.dirty_bytes else None,
                "undo_record_bytes_read": undo_read,
                "back_MBps_written": mbps(back, back_s),
                "redo_log_bytes": redo,
                "footprint_bytes_replica_journal_redo": footprint,
                "back_phases": back_phases,
                "point_matches_snapshot": ok_back,
                "forward_seconds": round(fwd_s, 3),
                "forward_bytes_written": fwd,
                "forward_phases": fwd_phases,
                "latest_matches_after_forward": ok_fwd,
            }
            out["moves"].append(mv)
            print(f"  failover {k} groups back: {back_s:.2f} s ({back / MB:.0f} MB written, "
                  f"{window.dirty_bytes / MB:.0f} MB distinct), forward {fwd_s:.2f} s; correct {ok_back and ok_fwd}",
                  file=sys.stderr, flush=True)
    finally:
        t.close()
        src.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


# -- 4: test failover -----------------------------------------------------------------------------------------


def test_failover_time(work: Path, shm: Path, size: int, fill: int, group_bytes: int, history: int, back: int,
                       space: Space, seed: int) -> dict[str, Any]:
    src = Source(shm / "testfailover.img", size, fill, "mixed", seed)
    root = work / "testfailover"
    root.mkdir()
    t = Target(root, src, space)
    dest = root / "replica-test.img"
    out: dict[str, Any] = {"disk_bytes": size, "filled_bytes": fill, "history_groups": history,
                           "churn_bytes_per_group": group_bytes, "groups_back": back,
                           "note": "the mix's zero regions stay holes (3/4 of filled_bytes allocated); how much is "
                                   "filled is bounded by free space on the work disk, which holds the replica and "
                                   "its copy at once"}
    try:
        seqs: dict[int, int] = {}
        snap = ""
        for i, g, _ in build_history(t, src, history, group_bytes, space):
            seqs[i] = g.marker.sequence
            if i == history - back:
                snap = image_hash(src.path)
        alloc = allocated(t.path)
        out["replica_allocated_bytes"] = alloc
        out["journal_file_bytes"] = t.journal.bytes
        space.check("test-failover history built")
        space.check("test failover copy", alloc)
        # Baseline: cp --sparse=always of the same replica file, then fsync (the copy is only safe then).
        evict(t.path)
        _, cp_s = timed(lambda: subprocess.run(["cp", "--sparse=always", str(t.path), str(dest)], check=True))

        def fsync_dest() -> None:
            fd = os.open(dest, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        _, sync_s = timed(fsync_dest)
        out["baseline_cp_sparse_always"] = {
            "cp_seconds": round(cp_s, 3), "fsync_seconds": round(sync_s, 3), "seconds": round(cp_s + sync_s, 3),
            "GBps_of_disk": round(size / 1e9 / (cp_s + sync_s), 2),
            "GBps_of_allocated": round(alloc / 1e9 / (cp_s + sync_s), 2),
            "copy_allocated_bytes": allocated(dest),
            "matches_replica": image_hash(dest) == image_hash(t.path),
            "version": subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
        }
        dest.unlink()
        # standby: copy_replica (data ranges, copy_file_range, then sync) + undo_into the copy.
        evict(t.path, t.journal_dir)
        m0 = METER.snap()
        copy, copy_s = timed(lambda: copy_replica(t.replica, "raw", dest, t.replica.read))
        copy_phases = METER.delta(m0)
        groups = t.journal.groups_after(seqs[history - back])
        m0 = METER.snap()
        undone, undo_s = timed(lambda: undo_into(t.journal, groups, copy))
        undo_phases = METER.delta(m0)
        copy.close()
        total = copy_s + undo_s
        out["standby_test_failover"] = {
            "copy_seconds": round(copy_s, 3), "undo_seconds": round(undo_s, 3), "seconds": round(total, 3),
            "GBps_of_disk": round(size / 1e9 / total, 2), "GBps_of_allocated": round(alloc / 1e9 / total, 2),
            "undo_groups": len(groups), "undo_bytes_written": undone,
            "copy_allocated_bytes": allocated(dest), "copy_phases": copy_phases, "undo_phases": undo_phases,
            "point_matches_snapshot": image_hash(dest) == snap,
        }
        out["ratio_standby_to_cp"] = round(total / (cp_s + sync_s), 3)
        print(f"  test failover: copy {copy_s:.2f} s + undo {undo_s:.2f} s; cp --sparse=always + fsync "
              f"{cp_s + sync_s:.2f} s", file=sys.stderr, flush=True)
    finally:
        t.close()
        src.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


# -- main ---------------------------------------------------------------------------------------------------


def part(fn: Callable[..., dict[str, Any]], *a: Any) -> dict[str, Any]:
    """Run one part; a part stopped for lack of space (or failing) leaves its error, the others go on."""
    try:
        return fn(*a)
    except (RuntimeError, OSError) as exc:
        print(f"  {fn.__name__} stopped: {exc}", file=sys.stderr, flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"}


def summary(r: dict[str, Any]) -> list[str]:
    lines = []
    for name, res in r.get("apply", {}).items():
        if "error" in res:
            lines.append(f"apply {name}: {res['error']}")
            continue
        for s in res["by_group_size"]:
            m = s["median"]
            lines.append(f"apply {name}, {s['group_churn_bytes'] / MB:g} MB/group (median of {len(s['rounds'])}): "
                         f"with journal {m['with_journal_MBps_write']} MB/s, without {m['without_journal_MBps_write']}"
                         f" MB/s (x{m['ratio_write']}; with verify x{m['ratio_verify_and_write']}); undo "
                         f"{s['journal']['undo_bytes_per_GB_churn'] / MB:.0f} MB per GB of churn")
    fo = r.get("failover")
    if fo and "error" in fo:
        lines.append(f"failover: {fo['error']}")
    elif fo:
        h = fo["history"]
        lines.append(f"history: {fo['groups']} groups of {fo['churn_bytes_per_group'] / MB:g} MB, apply p50 "
                     f"{h['apply_with_journal_per_group']['p50_ms']} ms/group, undo "
                     f"{h['undo_bytes_per_GB_churn'] / MB:.0f} MB per GB of churn; journal open (start-up) "
                     f"{h['journal_open_seconds_cold']} s for {h['journal_file_bytes'] / MB:.0f} MB")
        for m in fo["moves"]:
            lines.append(f"failover {m['groups_back']} s back: {m['back_seconds']} s (rewrite x{m['rewrite_factor']}),"
                         f" forward again {m['forward_seconds']} s, correct {m['point_matches_snapshot']}")
    tf = r.get("test_failover")
    if tf and "error" in tf:
        lines.append(f"test failover: {tf['error']}")
    elif tf:
        s, b = tf["standby_test_failover"], tf["baseline_cp_sparse_always"]
        lines.append(f"test failover {tf['disk_bytes'] / GiB:g} GiB ({tf['replica_allocated_bytes'] / GiB:.2f} GiB "
                     f"allocated): copy {s['copy_seconds']} s + undo {s['undo_seconds']} s = {s['seconds']} s; "
                     f"cp --sparse=always + fsync {b['seconds']} s; correct {s['point_matches_snapshot']}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of about a minute")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where replicas and journals go (a real disk)")
    ap.add_argument("--shm", type=Path, default=Path("/dev/shm"), help="where source images go (tmpfs)")
    ap.add_argument("--rate", default="1M",
                    help="churn per group (one group = one second) for parts 3 and 4 (1M: 90 GB a day). Part 3 peaks "
                         "at about 5.5 GB on --workdir with 1M (replica + 1 h of journal + the REDO copy the longest "
                         "move back keeps), about 2.5 GB with 512K")
    ap.add_argument("--fo-fill", default="1G", help="failover: bytes of the 4 GiB disk holding the mix at first")
    ap.add_argument("--tf-fill", default="3G",
                    help="test failover: bytes of the 4 GiB disk holding the mix (3/4 of them allocated); the replica "
                         "and its copy need twice that")
    ap.add_argument("--backs", default="60,600,3600", help="failover targets, groups back from the latest")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of with/without journal per group size")
    ap.add_argument("--reserve", default="1G", help="stop if free space on --workdir falls below this")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--only", default="apply,failover,test", help="parts to run")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default bench/results/retention.json; with --quick a temporary file)")
    args = ap.parse_args()
    sigterm_as_interrupt()
    rate = parse_size(args.rate)
    parts = set(args.only.split(","))
    if args.quick:
        p1 = {"mixed": (256 * MiB, 192 * MiB, [(MB, 30), (16 * MB, 3)]),
              "random": (128 * MiB, 128 * MiB, [(MB, 20), (16 * MB, 2)])}
        backs, p3 = [10, 60, 120], (1 * GiB, 256 * MiB)
        p4 = (1 * GiB, 640 * MiB, 60, 10)  # size, fill, history groups, groups back
        rounds = 1
    else:
        p1 = {"mixed": (4 * GiB, 2 * GiB, [(MB, 300), (16 * MB, 24)]),
              "random": (1 * GiB, 1 * GiB, [(MB, 200), (16 * MB, 16)])}
        backs, p3 = [int(b) for b in args.backs.split(",")], (4 * GiB, parse_size(args.fo_fill))
        p4 = (4 * GiB, parse_size(args.tf_fill), 300, 60)
        rounds = args.rounds
    quick_out = Path(tempfile.gettempdir()) / "retention-quick.json"
    out = args.out or (quick_out if args.quick else RESULTS / "retention.json")
    space = Space(args.workdir, parse_size(args.reserve))
    results: dict[str, Any] = {
        "benchmark": "retention",
        "when": now_utc(),
        "machine": machine_facts(),
        "code": code_state(),
        "quick": args.quick,
        "method": (
            "in process, no daemons: real files and the product's own code paths. Source images on tmpfs "
            "(not measured) are churned and cut into sealed DELTA batches + a sealed point Marker per group with "
            f"the agent's BatchBuilder (zstd level {DEFAULT_LEVEL}, AES-GCM), DirtyMap extents and split_extents "
            "at 8 MiB, as "
            f"the agent cuts an epoch. The master target side is a raw (sparse) replica on {args.workdir} "
            f"({_fs_type(args.workdir)}), an Applier and "
            "a DiskWorker: apply = verify every record (Applier.verify_batch/verify_marker) then DiskWorker.write "
            "(with the journal: old contents read, UNDO fsynced, write_group + fsync) then, with the journal, "
            "DiskJournal.end_group (fsynced). Verify time is measured separately and reported both excluded "
            "(MBps_write) and included (MBps_verify_and_write), the same way for both variants. Failover = "
            "recovery.move() (REDO captured, undo applied newest first, one sync); test failover = "
            "recovery.copy_replica() (copy_file_range over SEEK_DATA ranges, then fsync) + undo_into(). Page "
            "caches of the replica and journal are dropped (fsync + POSIX_FADV_DONTNEED) before each timed run. "
            "Points are one per group with marker meta time on a synthetic clock advancing 1 s per group. Nothing "
            "is applied during the moves and the test-failover copy (the daemon halts a failed-over disk; its "
            "concurrent replication during a test failover is not exercised here). Phases "
            "are timed by wrappers around the named functions (and every os.fsync) in this process. Correctness: "
            "content hashes of the replica after each move / of the test copy against hashes of the source taken "
            "when it was at that point."
        ),
        "churn": {
            "writes": "4..64 KiB (4 KiB aligned, uniform count of blocks), 70 % in a hot 256 MiB area at 256 MiB, "
                      "30 % uniform over the disk",
            "data_mixed": "each write 3/8 random, 4/8 text (the test disk's text), 1/8 zeros",
            "data_random": "every write random",
            "source_fill": "mixed: the first filled_bytes hold standby.admin.testdisk's mix (1 MiB regions 3/8 "
                           "text, 3/8 random, 2/8 zero), the rest zeros (holes); random: filled_bytes of random",
        },
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "free_bytes_at_start": free_bytes(args.workdir),
    }
    instrument()
    work = Path(tempfile.mkdtemp(prefix="standby-retention-", dir=args.workdir))
    shm = Path(tempfile.mkdtemp(prefix="standby-retention-", dir=args.shm))
    t_start = time.monotonic()
    try:
        if "apply" in parts:
            results["apply"] = {}
            for data, (size, fill, sizes) in p1.items():
                results["apply"][data] = part(apply_throughput, work, shm, data, size, fill, sizes, rounds, space,
                                              args.seed)
        if "failover" in parts:
            results["failover"] = part(failover_times, work, shm, p3[0], p3[1], rate, backs, space, args.seed + 1)
        if "test" in parts:
            size, fill, history, back = p4
            results["test_failover"] = part(test_failover_time, work, shm, size, fill, rate, history, back, space,
                                            args.seed + 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - t_start, 1)
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["lowest_free_bytes"] = space.lowest
    results["summary"] = summary(results)
    write_result(out, results)
    print("\n".join(results["summary"]), file=sys.stderr)
    return 0


def _fs_type(path: Path) -> str:
    res = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
