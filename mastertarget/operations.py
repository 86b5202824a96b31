"""Requests the process server relays from the operator to the master target: list recovery points,
fail over (and change the point), commit, test failover and its cleanup.

They see the master target through the narrow interface of `disk` (`Disks`: its open disks, `Disk`: one
of them). Each disk's work happens under its lock (applying, hashing and these never overlap) in a
worker thread; long copies hold the lock only chunk by chunk.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from standby.plumbing.durable import load_json, save_json
from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode
from standby.proto.point import Point
from standby.proto.states import Replication

from .disk import Disk, Disks, NotOpen
from .journal_codec import JournalError
from .recovery import FailoverState, commit, copy_replica, elapsed, move, test_failover_path, undo_into
from .replicas import ReplicaError
from .upkeep import point_list

log = logging.getLogger("standby.mt.ops")


def open_disk(disks: Disks, disk: int) -> Disk:
    try:
        return disks.disk(int(disk))
    except NotOpen as exc:
        raise RequestFailed(ErrorCode.UNREACHABLE, str(exc)) from None


async def points(disks: Disks, disk: int) -> dict[str, Any]:
    w = open_disk(disks, disk)
    async with w.lock:
        return await asyncio.to_thread(point_list, w, disks.policy)


def _find(w: Disk, sequence: int) -> Point:
    g = w.journal.find_point(int(sequence))
    if g is None:
        raise RequestFailed(ErrorCode.UNKNOWN_POINT,
                            f"disk {w.state.name}: no recovery point {sequence} in the retention journal")
    return Point.from_group(g)


async def failover(disks: Disks, disk: int, sequence: int) -> dict[str, Any]:
    """Stop applying for the disk and roll its replica back in place to point `sequence` (or move it to
    another point of a failover not yet committed)."""
    w = open_disk(disks, disk)
    t0 = time.monotonic()
    async with w.lock:
        j = w.journal
        point = _find(w, sequence)
        fo = FailoverState.load(j.dir)
        if fo is not None and fo.committed:
            raise RequestFailed(ErrorCode.REFUSED,
                                f"disk {w.state.name}: the failover was committed; its history is gone")
        if fo is None:
            fo = FailoverState(w.state.applied_seq, w.state.applied_seq, w.state.applied_seq, 0.0, time.time())
        w.halt()
        w.state.move(Replication.FAILED_OVER, f"failover to point {sequence}")
        await asyncio.to_thread(w.state.save, disks.disks_dir)
        fo.point_time = point.time
        try:
            written = await asyncio.to_thread(move, j, w.replica, fo, int(sequence))
        except Exception as exc:
            if not isinstance(exc, OSError | ReplicaError | JournalError):
                log.exception("disk %s/%s: failover move failed unexpectedly", w.state.machine, w.state.name)
            w.failover_problem = f"{type(exc).__name__}: {exc}"
            raise RequestFailed(ErrorCode.FAILED,
                                f"disk {w.state.name}: cannot move to point {sequence}: {exc}; the replica "
                                "is between two states, not at a recovery point: run standby failover again") from None
        w.failover_problem = None
        w.state.last_point = point.to_wire()
        await asyncio.to_thread(w.state.save, disks.disks_dir)
    log.info("disk %s/%s: failed over to point %s (%.3f s, %d bytes written)", w.state.machine, w.state.name,
             sequence, time.monotonic() - t0, written)
    return {
        "disk": w.state.disk,
        "sequence": point.sequence,
        "time": point.time,
        "replica": w.state.path,
        "format": w.state.format,
        "bytes_written": written,
        "seconds": elapsed(t0),
    }


async def failover_commit(disks: Disks, disk: int) -> dict[str, Any]:
    w = open_disk(disks, disk)
    async with w.lock:
        fo = FailoverState.load(w.journal.dir)
        if fo is None:
            raise RequestFailed(ErrorCode.REFUSED,
                                f"disk {w.state.name} is not failed over: run standby failover first")
        if not fo.committed:
            await asyncio.to_thread(commit, w.journal, fo)
        w.state.applied_seq = fo.at
        await asyncio.to_thread(w.state.save, disks.disks_dir)
    log.info("disk %s/%s: failover to point %d committed", w.state.machine, w.state.name, fo.at)
    return {"disk": w.state.disk, "sequence": fo.at, "time": fo.point_time, "replica": w.state.path}


def _test_record(disks: Disks, disk: int) -> Path:
    return disks.disks_dir / f"{disk}.test-failover.json"


async def test_failover(disks: Disks, disk: int, sequence: int, directory: str | None = None) -> dict[str, Any]:
    """Materialise point `sequence` into a separate replica while replication continues."""
    w = open_disk(disks, disk)
    st = w.state
    rec = _test_record(disks, st.disk)
    if rec.exists():
        old = load_json(rec)
        raise RequestFailed(ErrorCode.REFUSED, f"disk {st.name} already has a test failover at {old['path']}: "
                            "run standby test-failover-cleanup first")
    if st.format == "device" and not directory:
        raise RequestFailed(ErrorCode.BAD_INPUT, f"disk {st.name} replicates to a device: give --dir for the test copy")
    dest = test_failover_path(st.path, st.format, st.disk, Path(directory) if directory else None)
    if not dest.parent.is_dir():
        raise RequestFailed(ErrorCode.BAD_INPUT, f"directory {dest.parent} does not exist on the master target")
    point = _find(w, sequence)
    t0 = time.monotonic()
    w.pins += 1  # no pruning while the copy may need any undo record newer than the point
    try:
        async def read_locked(off: int, n: int) -> bytes:
            async with w.lock:
                return await asyncio.to_thread(w.replica.read, off, n)

        loop = asyncio.get_running_loop()

        def read_sync(off: int, n: int) -> bytes:
            return asyncio.run_coroutine_threadsafe(read_locked(off, n), loop).result()

        try:
            out = await asyncio.to_thread(copy_replica, w.replica, st.format, dest, read_sync)
        except (OSError, ReplicaError) as exc:
            raise RequestFailed(ErrorCode.FAILED, f"disk {st.name}: cannot copy the replica to {dest}: {exc}") from None
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
        raise RequestFailed(ErrorCode.FAILED, f"disk {st.name}: test failover failed: {exc}") from None
    finally:
        w.pins -= 1
    log.info("disk %s/%s: test failover to point %s in %s (%.3f s)", st.machine, st.name, sequence, dest,
             time.monotonic() - t0)
    return {
        "disk": st.disk,
        "sequence": point.sequence,
        "time": point.time,
        "path": str(dest),
        "format": "raw" if st.format == "device" else st.format,
        "copy_seconds": copied,
        "undo_groups": len(groups),
        "bytes_undone": written,
        "seconds": elapsed(t0),
    }


async def test_failover_cleanup(disks: Disks, disk: int) -> dict[str, Any]:
    rec = _test_record(disks, int(disk))
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


Handler = Callable[..., Awaitable[dict[str, Any]]]
# The requests of the operator this module serves: op -> handler(disks, **args).
HANDLERS: dict[str, Handler] = {
    "points": points,
    "failover": failover,
    "failover_commit": failover_commit,
    "test_failover": test_failover,
    "test_failover_cleanup": test_failover_cleanup,
}
