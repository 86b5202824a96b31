"""Continuous delta replication of one disk: tracking, epochs, honest crash-consistent points.

The tracker's events are marked in the *current* dirty map. At a **cut** at time t the current map is
closed and a new one opened; events stamped <= t still arriving (a short grace lets in-flight commits of
trace events land) go to the closed map, later ones to the new map. The closed map's blocks are read
from the device and shipped as DELTA batches. Then, after another grace, the epoch is a crash-consistent
point at t **only if** no write to one of its blocks was *submitted* after t and before that block's read
ended (the kernel tracker records submissions too; see Tracking.conflict) and no completion stamped <= t
arrived after the closed map was sealed. Otherwise the batch is applied but makes no point; its
rewritten blocks are in the next epoch anyway (promise 4).

Why that proves a point: reads are sequential (the next cut waits for this epoch's reads), so every
block's last write before t is either in this epoch (read after t with no write in between) or in an
earlier epoch whose read came after that write. Cuts happen every `cut_interval` (or early when the
dirty set passes a bound). An idle epoch still makes a point: nothing changed, so the replica after all
earlier batches equals the source at t.

Shipping is pipelined through the disk's send window (agent.window): an epoch's blocks leave the dirty map
at the cut but stay held by the window until the batch holding them is acknowledged; a BUSY, a lost
connection or a cancellation anywhere puts back exactly what was not acknowledged, and sequence numbers
go on from the first one not stored. While nothing is acknowledged the agent keeps only its dirty map
(memory bounded by disk size) and never touches the source's I/O ("pull ahead").

App-consistent points (agent.appoint) use the same loop: the coordinator hands each Shipper a
`CutOrder`, the Shipper cuts at once (whatever its interval), says when the epoch's reads are done (the
coordinator keeps the file systems frozen until then) and runs the same proof. A freeze stops file-system
writes, not raw writes to the device, so an epoch that fails the proof makes no point at all; one that
passes is `app-consistent` only if the file systems were still frozen after its cut instant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from standby.plumbing import failpoints
from standby.plumbing.aio import wait_event
from standby.proto.messages import BatchKind

from .dirtymap import DirtyMap, split_extents
from .reader import disk_size
from .tracker.base import TrackingLost
from .window import WINDOW, SendWindow

if TYPE_CHECKING:
    from standby.plumbing.link import Link

    from .daemon import Agent, LocalDisk
    from .reader import BatchBuilder

log = logging.getLogger("standby.agent.delta")
# Time allowed for a trace event stamped before an instant to become readable in the ring buffer.
GRACE = 0.005
MIN_CUT_INTERVAL = 0.05
SIZE_CHECK_INTERVAL = 2.0
POLL_INTERVAL = 0.1


@dataclass
class DeltaStats:
    epochs: int = 0
    points: int = 0
    inconsistent: int = 0
    bytes_shipped: int = 0
    last_inconsistent_reason: str = ""
    app_points: int = 0
    last_app_point: dict[str, Any] | None = None  # {time, freeze_seconds, tag}


@dataclass(eq=False)
class AppCut:
    """One app-consistent point being made, shared by the CutOrders of all disks.

    `frozen` tells whether the file systems are still frozen (None: nothing was frozen because the
    pre-script or the freeze failed, so the points can only be crash-consistent, with the tag);
    `thawed` gets the freeze duration once the coordinator has thawed (it is always set, also on errors).
    """

    tag: str
    frozen: Callable[[], bool] | None
    thawed: asyncio.Future[float | None]


def _new_future() -> asyncio.Future[dict[str, Any]]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class CutOrder:
    """Asks a Shipper to cut now. `app` None: an ordinary early cut (the coordinator's flush epoch, which
    empties the dirty map so the frozen epoch is small). `lesser`: why this disk's point cannot be
    app-consistent even though the machine was frozen ("" if it can)."""

    app: AppCut | None = None
    lesser: str = ""
    reads_done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: asyncio.Future[dict[str, Any]] = field(default_factory=_new_future)

    def finish(self, **result: Any) -> None:
        """The disk's entry in the app_point reply: sequence, consistency, time, freeze_seconds, reason."""
        self.reads_done.set()
        if not self.outcome.done():
            out = {"sequence": None, "consistency": None, "time": None, "freeze_seconds": None, "reason": ""}
            self.outcome.set_result({**out, **result})


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


class DiskResized(Exception):
    """The source disk's size changed: open it again at the process server (which has it resynced)."""


class Shipper:
    """Ships one disk's epochs over one connection through its send window (agent.window): a block cut
    from the dirty map goes back into it unless the batch holding it is acknowledged."""

    def __init__(self, agent: Agent, link: Link, d: LocalDisk, tracking: Tracking, builder: BatchBuilder) -> None:
        self.agent = agent
        self.link = link
        self.d = d
        self.tracking = tracking
        self.builder = builder
        # `dirty` is read at each put-back: a resync replaces the tracking's map.
        self.window = SendWindow(d, link, lambda: self.tracking.map)
        self.busy_since = 0.0  # when the process server started refusing (0: it is not)
        self.orders: list[CutOrder] = []  # cuts asked for by the app-point coordinator, oldest first
        self.poke = asyncio.Event()  # an order arrived: stop waiting for the interval
        self.current: CutOrder | None = None  # the order whose epoch is being shipped

    def order_cut(self, app: AppCut | None = None, lesser: str = "") -> CutOrder:
        """Ask for a cut now (only while `run` is running: agent.shippers lists those Shippers)."""
        order = CutOrder(app, lesser)
        self.orders.append(order)
        self.poke.set()
        return order

    async def settle(self, room: int = WINDOW) -> int | None:
        """Process answers until fewer than `room` records are in flight. Returns the sequence to go on
        from when the process server refused one (everything unacknowledged is back in the dirty map)."""
        refused = await self.window.settle(room)
        if refused is None:
            if self.busy_since and not self.window.pending:
                log.info("disk %s: the process server accepts data again after %.0f s", self.d.cfg.name,
                         time.monotonic() - self.busy_since)
                self.busy_since = 0.0
            return None
        if not self.busy_since:
            self.busy_since = time.monotonic()
            log.info("disk %s: process server busy (%s): keeping changes in the dirty map", self.d.cfg.name,
                     refused.reason)
        return refused.sequence

    async def wait_busy(self) -> None:
        """Wait until the process server's last BUSY said to try again."""
        delay = self.window.busy_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    # -- the epoch loop -----------------------------------------------------------------------------
    async def run(self, gen: int, seq: int) -> tuple[int, int]:
        """Ship epochs until a resync is wanted; returns (generation, next sequence). While it runs, the
        Shipper is listed in agent.shippers: it is in delta replication and takes CutOrders."""
        name = self.d.cfg.name
        self.agent.shippers[name] = self
        try:
            return await self._run(gen, seq)
        finally:
            if self.agent.shippers.get(name) is self:
                del self.agent.shippers[name]
            want = self.agent.resync_wanted.get(name)
            why = f"a resync started: {want[1]}" if want else "delta replication stopped (connection lost?)"
            for order in [o for o in (self.current, *self.orders) if o is not None]:
                order.finish(reason=why)
            self.orders.clear()

    async def _run(self, gen: int, seq: int) -> tuple[int, int]:
        cfg = self.agent.cfg
        tr = self.tracking
        d = self.d
        stats = self.agent.delta_stats[d.cfg.name]
        last_cut = time.monotonic()
        # Under heavy churn a long epoch rarely reads clean; shorter epochs (smaller, read sooner after the
        # cut) give points again. The interval halves after an epoch without a point, and recovers.
        interval = cfg.cut_interval
        size_checked = time.monotonic()
        while True:
            self.current = None
            restart = await self.settle(WINDOW)
            if restart is not None:
                seq = restart
            if tr.lost:
                self.agent.resync_wanted.setdefault(d.cfg.name, ("checksum", f"change tracking lost: {tr.lost}"))
            if d.cfg.name in self.agent.resync_wanted:
                return gen, seq
            now = time.monotonic()
            if now - size_checked > SIZE_CHECK_INTERVAL:
                size_checked = now
                if await asyncio.to_thread(disk_size, d.cfg.path) != tr.size:
                    raise DiskResized(d.cfg.name)
            order = self.current = self.orders.pop(0) if self.orders else None
            busy_until = self.window.busy_until
            wait = max(last_cut + interval - now, busy_until - now)
            if order is None and wait > 0 and (busy_until > now or tr.map.dirty_bytes < cfg.cut_bytes):
                self.poke.clear()
                await wait_event(self.poke, min(wait, 0.05))
                continue
            last_cut = time.monotonic()
            failpoints.hit("agent.epoch")
            closed = await tr.cut()
            # From here the epoch's blocks are the window's until acknowledged (put back otherwise).
            self.window.hold(split_extents(closed.extents(), cfg.batch_size))
            app = order.app if order is not None else None
            # Frozen now means frozen at the cut instant: the freeze was complete before the order came.
            frozen_at_cut = app is not None and app.frozen is not None and app.frozen()
            reads: list[tuple[int, list[tuple[int, int]]]] = []
            groups = list(self.window.held)
            # The next group is read while this one is sealed and sent (its recorded read end is then a
            # little late: that only makes the proof stricter).
            ahead = asyncio.ensure_future(asyncio.to_thread(self.builder.read_extents, groups[0])) if groups else None
            aborted = False
            try:
                for i, group in enumerate(groups):
                    assert ahead is not None
                    pieces = await ahead
                    reads.append((tr.tracker.now_ns(), group))
                    ahead = None
                    if i + 1 < len(groups):
                        ahead = asyncio.ensure_future(asyncio.to_thread(self.builder.read_extents, groups[i + 1]))
                    batch = await asyncio.to_thread(self.builder.delta_batch, gen, seq, BatchKind.DELTA, pieces)
                    await self.window.send(seq, batch, group)
                    seq += 1
                    stats.bytes_shipped += batch.logical_bytes
                    restart = await self.settle(WINDOW)
                    if restart is not None:  # the rest of the epoch is back in the dirty map too
                        seq = restart
                        tr.collecting = False
                        aborted = True
                        break
            finally:
                if ahead is not None and not ahead.done():
                    ahead.cancel()
                if order is not None:
                    order.reads_done.set()  # the coordinator may thaw now
            if aborted:
                if order is not None:
                    order.finish(reason="the process server refused a batch of the epoch (busy); no point")
                continue
            await tr.settle()
            stats.epochs += 1
            reason = tr.conflict(reads)
            if reason:
                interval = max(interval / 2, MIN_CUT_INTERVAL)
                stats.inconsistent += 1
                stats.last_inconsistent_reason = reason
                log.debug("disk %s: epoch applied without a point: %s", d.cfg.name, reason)
                if order is not None:
                    order.finish(reason=f"no point: {reason}")
                continue
            interval = min(interval * 1.5, cfg.cut_interval)
            t = tr.wall_time(tr.cut_ts)
            meta: dict[str, Any] = {"generation": gen, "kind": "point", "consistency": "crash-consistent", "time": t}
            secs, lesser = None, ""
            if app is not None:
                meta["tag"] = app.tag
                if app.frozen is None:
                    lesser = order.lesser if order is not None and order.lesser else "nothing was frozen"
                else:
                    # Set by the coordinator in any case (its freeze has a watchdog); shielded so that
                    # this task's cancellation leaves the coordinator's future alone.
                    secs = await asyncio.shield(app.thawed)
                    if not frozen_at_cut:
                        lesser = "the file systems were thawed (freeze_timeout) before this disk's cut"
                    elif order is not None and order.lesser:
                        lesser = order.lesser
                    else:
                        meta["consistency"] = "app-consistent"
                        meta["freeze_seconds"] = secs
            await self.window.send(seq, self.agent.make_commit(d, seq, meta))
            stats.points += 1
            errors = getattr(self.agent, "disk_errors", None)
            if errors and errors.pop(d.cfg.name, None) is not None:
                self.agent.wakeup.set()  # a point made: this disk's replication works again; report it now
            if meta["consistency"] == "app-consistent":
                stats.app_points += 1
                stats.last_app_point = {"time": t, "freeze_seconds": secs, "tag": meta["tag"]}
                log.info(
                    "disk %s: app-consistent point %r at sequence %d (frozen %.3f s)",
                    d.cfg.name,
                    meta["tag"],
                    seq,
                    secs or 0.0,
                )
            if order is not None:
                order.finish(sequence=seq, consistency=meta["consistency"], time=t, freeze_seconds=secs, reason=lesser)
            seq += 1
