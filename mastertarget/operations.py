"""Requests the process server relays from the operator to the master target: list recovery points,
fail over (and change the point), commit, test failover and its cleanup; and retention upkeep.

Each disk's work happens under its worker's lock (applying, hashing and these never overlap) in a
worker thread; long copies hold the lock only chunk by chunk.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standby.plumbing.durable import load_json, save_json

from .diskstate import Point
from .journal import JournalError
from .recovery import FailoverState, commit, copy_replica, elapsed, move, test_failover_path, undo_into
from .replicas import ReplicaError
from .retention import Plan, plan
from .volume import free_bytes

if TYPE_CHECKING:
    from .daemon import DiskWorker, MasterTarget

log = logging.getLogger("standby.mt.ops")
# A space-pressure alert stays up this long after the last pruning it caused (pruning makes the pressure
# go away until the next minutes of churn bring it back: the operator must still see it), and is logged
# again at most this often.
ALERT_HOLD = 600.0


class OpError(Exception):
    """A request that cannot be done: (code, message) for the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def worker_of(mt: MasterTarget, disk: int) -> DiskWorker:
    w = mt.workers.get(int(disk))
    if w is None:
        why = mt.failed.get(int(disk))
        raise OpError("unreachable", f"disk {disk} is not open on this master target" + (f": {why}" if why else ""))
    return w


def point_list(w: DiskWorker, now: float | None = None) -> dict[str, Any]:
    """The disk's recovery points inside its retention (thinned as the policy says), newest last."""
    j = w.journal
    kept = retention_plan(w, now)
    history = j.history_bytes()
    groups = {g.last: g for g in j.points()}
    points = []
    for p in kept.keep:
        g = groups[p.sequence]
        points.append(
            {
                "sequence": g.last,
                "time": g.time,
                "consistency": g.consistency,
                "tag": str(g.meta.get("tag", "")),
                "history_bytes": history.get(g.last, 0),
            }
        )
    fo = FailoverState.load(j.dir)
    failover = None
    if fo is not None:
        # Named as a point only where the replica is settled at a listed point: a move that broke off
        # leaves it between two states (promise 9: status never names as a point what is not one).
        settled = fo.at == fo.target and fo.step is None and j.find_point(fo.at) is not None
        failover = {**vars(fo), "point": fo.at if settled else None, "problem": w.failover_problem}
    alert = kept.alert
    if not alert and w.retention_alert and time.time() - w.retention_alert_at < ALERT_HOLD:
        when = time.strftime("%H:%M:%S", time.localtime(w.retention_alert_at))
        alert = f"{w.retention_alert} (last at {when})"  # pruning fixed it for now; it keeps coming back
    return {
        "disk": w.state.disk,
        "points": points,
        "journal_bytes": j.bytes,
        "applied_seq": w.state.applied_seq,
        "alert": alert,
        "failover": failover,
    }


def retention_plan(w: DiskWorker, now: float | None = None) -> Plan:
    mt = w.mt
    policy = mt.cfg.policy
    cap = w.space_cap_override
    if cap is not None:
        policy = replace(policy, space_cap=cap if policy.space_cap is None else min(cap, policy.space_cap))
    return plan(w.journal.retention_points(), time.time() if now is None else now, policy)


def prune(w: DiskWorker) -> dict[str, Any]:
    """Worker thread, under the disk's lock: drop what the policy no longer keeps."""
    p = retention_plan(w)
    freed = 0
    if p.keep:
        freed = w.journal.drop_before(p.keep[0].sequence)
    if p.alert:
        if time.time() - w.retention_alert_at >= ALERT_HOLD or not w.retention_alert:
            log.warning("ALERT disk %s/%s: %s", w.state.machine, w.state.name, p.alert)
        w.retention_alert, w.retention_alert_at = p.alert, time.time()
    return {"freed": freed, "kept": len(p.keep), "alert": p.alert}


def oldest_droppable(w: DiskWorker) -> tuple[float, int] | None:
    """(time of the disk's oldest point, the sequence to drop history before) such that dropping the
    oldest point(s) frees at least one whole segment without touching the newest point; None if it
    cannot. Pruning frees whole segments, so the cut is the first later point past a segment end."""
    j = w.journal
    pts = j.points()
    for p in pts[1:]:
        if j.freeable_before(p.last) > 0:
            return pts[0].time, p.last
    return None


def drop_oldest(w: DiskWorker, before: int) -> int:
    """Worker thread, under the disk's lock: drop the points older than `before`, for space."""
    j = w.journal
    dropped = sum(1 for p in j.points() if p.last < before)
    freed = j.drop_before(before)
    if freed:
        space_alert(w, f"retention space pressure: removed the {dropped} oldest point(s) to make room for new "
                       f"history ({freed} bytes freed)")
    return freed


def drop_history(w: DiskWorker) -> int:
    """Worker thread, under the disk's lock: all of the disk's history goes — the last resort when the
    churn since its newest point alone fills the retention volume (promise 8: replication goes on)."""
    n = len(w.journal.points())
    freed = w.journal.drop_all()
    if freed:
        space_alert(w, f"retention space pressure: the retention volume is too small for this churn: all "
                       f"history of the disk was removed ({n} point(s), {freed} bytes); points start again with "
                       "the next one")
    return freed


def space_alert(w: DiskWorker, text: str) -> None:
    if text != w.retention_alert or time.time() - w.retention_alert_at >= ALERT_HOLD:
        log.warning("ALERT disk %s/%s: %s", w.state.machine, w.state.name, text)
    w.retention_alert, w.retention_alert_at = text, time.time()


def reserve_bytes(configured: int | None, total: int) -> int:
    """Free space history leaves on a retention volume of `total` bytes: the configured reserve (default
    5 %, at most 4 GiB), and never more than a quarter of the volume (a small volume must keep room for
    history)."""
    reserve = configured if configured is not None else min(total // 20, 4 << 30)
    return min(reserve, total // 4)


def volume_pressure(mt: MasterTarget) -> None:
    """Leave the retention volume's reserve free: over it, each disk's history is capped at what it holds
    minus its share of the shortfall (oldest points go first)."""
    free, total = free_bytes(mt.cfg.retention_dir)
    reserve = reserve_bytes(mt.cfg.reserve, total)
    workers = [w for w in mt.workers.values() if not w.halted]
    short = reserve - free
    for w in workers:
        if short > 0:
            share = short // max(len(workers), 1) + 1
            w.space_cap_override = max(w.journal.bytes - share, 0)
        elif w.space_cap_override is not None and free > reserve * 2:
            w.space_cap_override = None


async def points(mt: MasterTarget, disk: int) -> dict[str, Any]:
    w = worker_of(mt, disk)
    async with w.lock:
        return await asyncio.to_thread(point_list, w)


def _choose(w: DiskWorker, sequence: int) -> float:
    g = w.journal.find_point(int(sequence))
    if g is None:
        raise OpError("unknown-point", f"disk {w.state.name}: no recovery point {sequence} in the retention journal")
    return g.time


async def failover(mt: MasterTarget, disk: int, sequence: int) -> dict[str, Any]:
    """Stop applying for the disk and roll its replica back in place to point `sequence` (or move it to
    another point of a failover not yet committed)."""
    w = worker_of(mt, disk)
    t0 = time.monotonic()
    async with w.lock:
        j = w.journal
        point_time = _choose(w, sequence)
        fo = FailoverState.load(j.dir)
        if fo is not None and fo.committed:
            raise OpError("refused", f"disk {w.state.name}: the failover was committed; its history is gone")
        if fo is None:
            fo = FailoverState(w.state.applied_seq, w.state.applied_seq, w.state.applied_seq, 0.0, time.time())
        w.halt()
        if w.state.state != "FailedOver":
            w.before_failover = w.state.state
        w.state.state = "FailedOver"
        await asyncio.to_thread(w.state.save, mt.cfg.disks_dir)
        fo.point_time = point_time
        try:
            written = await asyncio.to_thread(move, j, w.applier.replica, fo, int(sequence))
        except Exception as exc:
            if not isinstance(exc, OSError | ReplicaError | JournalError):
                log.exception("disk %s/%s: failover move failed unexpectedly", w.state.machine, w.state.name)
            w.failover_problem = f"{type(exc).__name__}: {exc}"
            raise OpError("failed", f"disk {w.state.name}: cannot move to point {sequence}: {exc}; the replica "
                          "is between two states, not at a recovery point: run standby failover again") from None
        w.failover_problem = None
        w.state.last_point = Point.from_group(j.find_point(int(sequence))).as_dict()  # type: ignore[arg-type]
        await asyncio.to_thread(w.state.save, mt.cfg.disks_dir)
    log.info("disk %s/%s: failed over to point %s (%.3f s, %d bytes written)", w.state.machine, w.state.name,
             sequence, time.monotonic() - t0, written)
    return {
        "disk": w.state.disk,
        "sequence": int(sequence),
        "time": point_time,
        "replica": w.state.path,
        "format": w.state.kind,
        "bytes_written": written,
        "seconds": elapsed(t0),
    }


async def failover_commit(mt: MasterTarget, disk: int) -> dict[str, Any]:
    w = worker_of(mt, disk)
    async with w.lock:
        fo = FailoverState.load(w.journal.dir)
        if fo is None:
            raise OpError("refused", f"disk {w.state.name} is not failed over: run standby failover first")
        if not fo.committed:
            await asyncio.to_thread(commit, w.journal, fo)
        w.state.applied_seq = fo.at
        await asyncio.to_thread(w.state.save, mt.cfg.disks_dir)
    log.info("disk %s/%s: failover to point %d committed", w.state.machine, w.state.name, fo.at)
    return {"disk": w.state.disk, "sequence": fo.at, "time": fo.point_time, "replica": w.state.path}


def _test_record(mt: MasterTarget, disk: int) -> Path:
    return mt.cfg.disks_dir / f"{disk}.test-failover.json"


async def test_failover(mt: MasterTarget, disk: int, sequence: int, directory: str | None = None) -> dict[str, Any]:
    """Materialise point `sequence` into a separate replica while replication continues."""
    w = worker_of(mt, disk)
    st = w.state
    rec = _test_record(mt, st.disk)
    if rec.exists():
        old = load_json(rec)
        raise OpError("refused", f"disk {st.name} already has a test failover at {old['path']}: "
                                 "run standby test-failover-cleanup first")
    if st.kind == "device" and not directory:
        raise OpError("bad-input", f"disk {st.name} replicates to a device: give --dir for the test copy")
    dest = test_failover_path(st.path, st.kind, st.disk, Path(directory) if directory else None)
    if not dest.parent.is_dir():
        raise OpError("bad-input", f"directory {dest.parent} does not exist on the master target")
    point_time = _choose(w, sequence)
    t0 = time.monotonic()
    w.pins += 1  # no pruning while the copy may need any undo record newer than the point
    try:
        async def read_locked(off: int, n: int) -> bytes:
            async with w.lock:
                return await asyncio.to_thread(w.applier.replica.read, off, n)

        loop = asyncio.get_running_loop()

        def read_sync(off: int, n: int) -> bytes:
            return asyncio.run_coroutine_threadsafe(read_locked(off, n), loop).result()

        try:
            out = await asyncio.to_thread(copy_replica, w.applier.replica, st.kind, dest, read_sync)
        except (OSError, ReplicaError) as exc:
            raise OpError("failed", f"disk {st.name}: cannot copy the replica to {dest}: {exc}") from None
        copied = elapsed(t0)
        save_json(rec, {"path": str(dest), "files": [str(f) for f in {dest, *out.data_files()}],
                        "sequence": int(sequence)}, 0o600)
        async with w.lock:  # every group that could have touched the copy is committed now
            groups = w.journal.groups_after(int(sequence))
        try:
            written = await asyncio.to_thread(undo_into, w.journal, groups, out)
        finally:
            await asyncio.to_thread(out.close)
    except (OSError, ReplicaError, JournalError) as exc:
        raise OpError("failed", f"disk {st.name}: test failover failed: {exc}") from None
    finally:
        w.pins -= 1
    log.info("disk %s/%s: test failover to point %s in %s (%.3f s)", st.machine, st.name, sequence, dest,
             time.monotonic() - t0)
    return {
        "disk": st.disk,
        "sequence": int(sequence),
        "time": point_time,
        "path": str(dest),
        "format": "raw" if st.kind == "device" else st.kind,
        "copy_seconds": copied,
        "undo_groups": len(groups),
        "bytes_undone": written,
        "seconds": elapsed(t0),
    }


async def test_failover_cleanup(mt: MasterTarget, disk: int) -> dict[str, Any]:
    rec = _test_record(mt, int(disk))
    if not rec.exists():
        return {"disk": int(disk), "removed": []}
    files = [Path(f) for f in load_json(rec)["files"]]
    for f in files:
        if f.is_dir():
            shutil.rmtree(f)
        else:
            f.unlink(missing_ok=True)
    rec.unlink()
    return {"disk": int(disk), "removed": [str(f) for f in files]}


HANDLERS = {
    "points": points,
    "failover": failover,
    "failover_commit": failover_commit,
    "test_failover": test_failover,
    "test_failover_cleanup": test_failover_cleanup,
}
