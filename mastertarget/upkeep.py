"""Retention upkeep: the recovery points a disk lists, pruning as the retention policy says, and room on
the retention volume for the next group's old contents (promise 8: a full retention volume prunes
oldest points first and alerts — it never blocks replication silently).

Functions named "worker thread" run in one, under the disk's lock; they see a disk through the narrow
`disk.Disk` interface.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from standby.proto.mt_requests import PointInfo

from .disk import Disk
from .recovery import FailoverState
from .retention import Plan, Policy, plan
from .volume import free_bytes

log = logging.getLogger("standby.mt.ops")
# A space-pressure alert stays up this long after the last pruning it caused (pruning makes the pressure
# go away until the next minutes of churn bring it back: the operator must still see it), and is logged
# again at most this often.
ALERT_HOLD = 600.0


def point_list(w: Disk, policy: Policy, now: float | None = None) -> dict[str, Any]:
    """Worker thread: the disk's recovery points inside its retention (thinned as the policy says),
    newest last, with what status shows beside them (the `points` reply, proto.mt_requests.PointList)."""
    j = w.journal
    kept = retention_plan(w, policy, now)
    history = j.history_bytes()
    points = [PointInfo.listed(s.point, history.get(s.sequence, 0)).to_wire() for s in kept.keep]
    fo = FailoverState.load(j.dir)
    failover = None
    if fo is not None:
        # Named as a point only where the replica is settled at a listed point: a move that broke off
        # leaves it between two states (promise 9: status never names as a point what is not one).
        settled = fo.at == fo.target and fo.step is None and j.find_point(fo.at) is not None
        failover = {**vars(fo), "point": fo.at if settled else None, "problem": w.failover_problem}
    alert = kept.alert
    marks = w.retention
    if not alert and marks.alert and time.time() - marks.alert_at < ALERT_HOLD:
        when = time.strftime("%H:%M:%S", time.localtime(marks.alert_at))
        alert = f"{marks.alert} (last at {when})"  # pruning fixed it for now; it keeps coming back
    return {
        "disk": w.state.disk,
        "points": points,
        "journal_bytes": j.bytes,
        "applied_seq": w.state.applied_seq,
        "alert": alert,
        "failover": failover,
    }


def retention_plan(w: Disk, policy: Policy, now: float | None = None) -> Plan:
    cap = w.retention.space_cap
    if cap is not None:
        policy = replace(policy, space_cap=cap if policy.space_cap is None else min(cap, policy.space_cap))
    return plan(w.journal.retention_points(), time.time() if now is None else now, policy)


def prune(w: Disk, policy: Policy) -> dict[str, Any]:
    """Worker thread: drop what the policy no longer keeps."""
    p = retention_plan(w, policy)
    freed = 0
    if p.keep:
        freed = w.journal.drop_before(p.keep[0].sequence)
    if p.alert:
        marks = w.retention
        if time.time() - marks.alert_at >= ALERT_HOLD or not marks.alert:
            log.warning("ALERT disk %s/%s: %s", w.state.machine, w.state.name, p.alert)
        marks.alert, marks.alert_at = p.alert, time.time()
    return {"freed": freed, "kept": len(p.keep), "alert": p.alert}


def oldest_droppable(w: Disk) -> tuple[float, int] | None:
    """(time of the disk's oldest point, the sequence to drop history before) such that dropping the
    oldest point(s) frees at least one whole segment without touching the newest point; None if it
    cannot. Pruning frees whole segments, so the cut is the first later point past a segment end."""
    j = w.journal
    pts = j.points()
    for p in pts[1:]:
        if j.freeable_before(p.last) > 0:
            return pts[0].time, p.last
    return None


def drop_oldest(w: Disk, before: int) -> int:
    """Worker thread: drop the points older than `before`, for space."""
    j = w.journal
    dropped = sum(1 for p in j.points() if p.last < before)
    freed = j.drop_before(before)
    if freed:
        space_alert(w, f"retention space pressure: removed the {dropped} oldest point(s) to make room for new "
                       f"history ({freed} bytes freed)")
    return freed


def drop_history(w: Disk) -> int:
    """Worker thread: all of the disk's history goes — the last resort when the churn since its newest
    point alone fills the retention volume (promise 8: replication goes on)."""
    n = len(w.journal.points())
    freed = w.journal.drop_all()
    if freed:
        space_alert(w, f"retention space pressure: the retention volume is too small for this churn: all "
                       f"history of the disk was removed ({n} point(s), {freed} bytes); points start again with "
                       "the next one")
    return freed


def space_alert(w: Disk, text: str) -> None:
    marks = w.retention
    if text != marks.alert or time.time() - marks.alert_at >= ALERT_HOLD:
        log.warning("ALERT disk %s/%s: %s", w.state.machine, w.state.name, text)
    marks.alert, marks.alert_at = text, time.time()


def reserve_bytes(configured: int | None, total: int) -> int:
    """Free space history leaves on a retention volume of `total` bytes: the configured reserve (default
    5 %, at most 4 GiB), and never more than a quarter of the volume (a small volume must keep room for
    history)."""
    reserve = configured if configured is not None else min(total // 20, 4 << 30)
    return min(reserve, total // 4)


def volume_pressure(disks: Iterable[Disk], retention_dir: Path, reserve: int | None) -> None:
    """Leave the retention volume's reserve free: over it, each disk's history is capped at what it holds
    minus its share of the shortfall (oldest points go first)."""
    free, total = free_bytes(retention_dir)
    reserve = reserve_bytes(reserve, total)
    workers = [w for w in disks if not w.halted]
    short = reserve - free
    for w in workers:
        if short > 0:
            share = short // max(len(workers), 1) + 1
            w.retention.space_cap = max(w.journal.bytes - share, 0)
        elif w.retention.space_cap is not None and free > reserve * 2:
            w.retention.space_cap = None


async def make_room(disks: Iterable[Disk], w: Disk, need: int, retention_dir: Path, reserve: int | None) -> None:
    """Before a group's old contents (`need` bytes) go to `w`'s journal: if they would take the retention
    volume into its reserve, prune now instead of failing on ENOSPC and retrying for ever (promise 8; the
    fault campaign's retention wedges). First the oldest points of all `disks`, oldest first, whole
    segments at a time, never a disk's newest point; if that is not enough, the history of the disk that
    needs the room (then of the largest), which a stretch of churn without any point fills. Takes the
    disks' locks: never call it holding one."""
    want = need + need // 8 + (1 << 20)  # sealing adds tables and tags; the file system its blocks
    free, total = await asyncio.to_thread(free_bytes, retention_dir)
    short = reserve_bytes(reserve, total) + want - free
    log.debug("disk %d: %d bytes of old contents to journal, %d free on the retention volume", w.state.disk,
              need, free)
    workers = [x for x in disks if not x.halted and not x.pins]
    while short > 0:
        options = [(c, x) for x in workers if (c := oldest_droppable(x)) is not None]
        if not options:
            break
        (_, before), x = min(options, key=lambda o: o[0][0])
        async with x.lock:
            freed = await asyncio.to_thread(drop_oldest, x, before)
        if not freed:
            break
        short -= freed
    for x in sorted(workers, key=lambda x: (x is not w, -x.journal.bytes)):
        if short <= 0:
            return
        async with x.lock:
            short -= await asyncio.to_thread(drop_history, x)
    if short > 0:
        free, total = await asyncio.to_thread(free_bytes, retention_dir)
        log.warning("the retention volume %s has %d bytes free after pruning, too few for the next group of "
                    "disk %s/%s (%d bytes of old contents, %d kept in reserve): what fills it is not history",
                    retention_dir, free, w.state.machine, w.state.name, need, reserve_bytes(reserve, total))
