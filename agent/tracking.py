"""A disk's change tracking: its tracker, its dirty maps, its epochs, and the proof that an epoch is a
crash-consistent point (DESIGN §4).

The tracker's events are marked in the *current* dirty map. At a **cut** at time t the current map is
closed and a new one opened; events stamped <= t still arriving (a short grace lets in-flight
trace events land) go to the closed map, later ones to the new map. The closed map's blocks are read
from the device and shipped (agent.delta). Then, after another grace, the epoch is a crash-consistent
point at t **only if** no write to one of its blocks was *submitted* after t and before that block's read
ended (the kernel tracker records submissions too; see Tracking.conflict) and no completion stamped <= t
arrived after the closed map was sealed. Otherwise the batch is applied but makes no point; its
rewritten blocks are in the next epoch anyway (promise 4).

Why that proves a point: reads are sequential (the next cut waits for this epoch's reads), so every
block's last write before t is either in this epoch (read after t with no write in between) or in an
earlier epoch whose read came after that write. An idle epoch still makes a point: nothing changed, so
the replica after all earlier batches equals the source at t.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from standby.plumbing.aio import wait_event

from .dirtymap import DirtyMap
from .tracker.base import TrackingLost

if TYPE_CHECKING:
    from .disk import LocalDisk

log = logging.getLogger("standby.agent.tracking")
# Time allowed for a trace event stamped before an instant to become readable in the ring buffer.
GRACE = 0.005
POLL_INTERVAL = 0.1


class Tracking:
    """A disk's tracker and dirty maps; lives as long as the agent (across connections)."""

    def __init__(self, disk: LocalDisk, tracker: Any, size: int, granularity: int = 4096) -> None:
        self.disk = disk
        self.tracker = tracker
        self.size = size
        self.map = DirtyMap(size, granularity)
        self.closed: DirtyMap | None = None
        self.cut_ts = 0  # tracker clock of the last cut
        self.late = False  # an event stamped before the last cut arrived after its map was sealed
        self.lost: str | None = None  # why tracking cannot be trusted: the disk needs a resync
        self.losses = 0  # times tracking was lost (each one a resync), for the agent's metrics
        self.poll_cpu = 0.0
        # Write submissions after the last cut, kept while its epoch is being read and checked.
        self.collecting = False
        self.queued: list[tuple[int, int, int]] = []
        self._take_queued = getattr(tracker, "take_queued", None)
        self.fill_warned = 0.5
        self.retired = False  # replaced (the disk changed size): its poll loop ends

    def drain(self) -> None:
        """Move what the tracker has now into the maps (or note that tracking was lost)."""
        t0 = time.thread_time()
        try:
            events = self.tracker.poll()
        except TrackingLost as exc:
            self._lost(str(exc))
            return
        finally:
            self.poll_cpu += time.thread_time() - t0
        fill = float(getattr(self.tracker, "stats", {}).get("max_page_fill", 0.0))
        if fill > self.fill_warned:
            # Not a loss yet (a full buffer would be detected and resynced), but close: say how to avoid it.
            log.warning(
                "disk %s: the kernel trace buffer filled to %.0f%% between two polls; raise trace_buffer in "
                "agent.toml before it overflows (that would force a resync)",
                self.disk.cfg.name,
                100 * fill,
            )
            self.fill_warned = min(fill + 0.1, 1.0)
        if self._take_queued is not None:
            q = self._take_queued()
            if self.collecting:
                self.queued += [e for e in q if e[0] > self.cut_ts]
        closed, cut = self.closed, self.cut_ts
        for ts, a, b in events:
            if ts <= cut:
                if closed is not None:
                    closed.mark(a, b)
                    continue
                self.late = True
            self.map.mark(a, b)

    def _lost(self, reason: str) -> None:
        log.error("disk %s: change tracking lost: %s; a resync is needed", self.disk.cfg.name, reason)
        self.losses += 1
        if self.lost is None:
            self.lost = reason
        # Restart tracking now so that writes from here on are caught; the resync covers the gap.
        try:
            self.tracker.close()
            self.tracker.start()
        except (OSError, TrackingLost) as exc:
            log.error("disk %s: cannot restart change tracking: %s", self.disk.cfg.name, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll the tracker for the agent's lifetime, so its ring buffer never fills while we are busy
        or disconnected."""
        while not stop.is_set() and not self.retired:
            self.drain()
            await wait_event(stop, POLL_INTERVAL)

    async def cut(self) -> DirtyMap:
        """Close the current epoch at the tracker's now; returns the closed map."""
        self.drain()  # submissions before the cut must not count as after it
        self.cut_ts = self.tracker.now_ns()
        self.closed, self.map = self.map, DirtyMap(self.size, self.map.granularity)
        self.late = False
        self.collecting, self.queued = True, []
        try:
            await asyncio.sleep(GRACE)
            self.drain()
        except BaseException:
            # Cancelled during the grace (connection lost, agent stopping): the closed map belongs to
            # nobody yet, so it goes back, or its blocks would be forgotten (promise 3).
            if self.closed is not None:
                self.map.merge(self.closed)
            self.closed = None
            self.collecting = False
            raise
        closed, self.closed = self.closed, None
        return closed

    def take_all(self) -> DirtyMap:
        """Everything dirty now, without the proof's bookkeeping (a resync makes no point)."""
        self.drain()
        taken, self.map = self.map, DirtyMap(self.size, self.map.granularity)
        return taken

    async def settle(self) -> None:
        """Wait one grace and take in everything stamped until then."""
        await asyncio.sleep(GRACE)
        self.drain()

    def conflict(self, reads: list[tuple[int, list[tuple[int, int]]]]) -> str:
        """Why the epoch just read is not a point at its cut, or "" if it is. `reads`: (time the read
        ended, extents read) per group, in reading order. Ends the collection of submissions.

        With submission times (tracefs): a block is suspect only if a write to it was *submitted* after the
        cut and before its read ended — only such a write can have reached what we read. A write submitted
        before the cut and completed after it was in flight at the cut: either outcome is a state a crash
        at the cut could leave, and it is shipped again in the next epoch anyway. Without submission times:
        any write completed after the cut to a block of the epoch makes it suspect."""
        self.collecting = False
        queued, self.queued = sorted(self.queued), []
        if self.lost:
            return "change tracking lost events"  # what was lost may include a submission that matters
        if self.late:
            return "a write completed before the cut was reported after it"
        if not getattr(self.tracker, "proves_order", False):
            return "the full-scan tracker cannot prove an instant"
        if self._take_queued is None:
            if self.map.intersects(e for _, exts in reads for e in exts):
                return "blocks of the epoch were written while it was read"
            return ""
        seen = DirtyMap(self.size, self.map.granularity)
        i = 0
        for ended, exts in reads:
            while i < len(queued) and queued[i][0] <= ended:
                seen.mark(queued[i][1], queued[i][2])
                i += 1
            if seen and seen.intersects(exts):
                return "blocks of the epoch were written after the cut, before they were read"
        return ""

    def wall_time(self, ts_ns: int) -> float:
        return time.time() - (self.tracker.now_ns() - ts_ns) / 1e9
