"""The disk watchdog: every few seconds, for each disk, the RPO against the policy's threshold (an alert)
and the progress check — a disk with a backlog that applies nothing for STALL_AFTER seconds is `stalled`
(an error in status, with what is known of why), cleared when applying moves again (promise 9: status
never says running while nothing runs)."""

from __future__ import annotations

import asyncio
import time

from standby.proto.states import FAILED_OVER

from .health import ALERT, ERROR
from .hub import Hub
from .registry import DiskRow
from .streams import DiskStream

WATCH_INTERVAL = 5.0
# A disk with a backlog that applies nothing this long is `stalled` (status, alert).
STALL_AFTER = 30.0


async def watch(hub: Hub) -> None:
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        check_disks(hub, time.time(), time.monotonic())


def check_disks(hub: Hub, now: float, mono: float) -> None:
    for row in hub.registry.disks():
        st = hub.streams.get(row.id)
        if st is None:
            continue
        failed_over = row.replication in FAILED_OVER
        rpo = now - row.last_point_at if row.last_point_at is not None else None
        threshold = hub.rpo_threshold(row.machine)
        if row.mt is not None and rpo is not None and not failed_over and rpo > threshold:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.last_point_at or 0))
            st.health.set("rpo", f"RPO {rpo:.0f} s exceeds the {threshold:.0f} s threshold "
                                 f"(newest point at {when})", ALERT, now)
        else:
            st.health.clear("rpo", now)
        waiting = st.received_seq - st.applied_seq
        if waiting <= 0 or failed_over or st.pause or row.mt is None:
            st.progress_at = mono
            st.health.clear("stalled", now)
            continue
        idle = mono - st.progress_at
        if idle < STALL_AFTER:
            continue
        why = stall_reason(hub, row, st)
        st.health.set("stalled", f"stalled: {waiting} record(s) waiting in the cache, nothing applied for "
                                 f"{idle:.0f} s ({why})", ERROR, now)


def stall_reason(hub: Hub, row: DiskRow, st: DiskStream) -> str:
    mt = hub.mt_sessions.get(row.mt or "")
    if mt is None:
        return f"master target {row.mt} is not connected"
    others = [p.text for k, p in st.health.active.items() if k != "stalled" and p.level == ERROR]
    if others:
        return others[0]
    if not mt.sending(st.id):
        return f"master target {row.mt} has not pulled this disk"
    return f"master target {row.mt} is connected but applies nothing; see its log"
