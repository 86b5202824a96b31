"""Continuous delta replication of one disk: epochs cut from its change tracking, shipped, and proven
(or not) to be crash-consistent points (agent.tracking holds the proof and says why it holds).

Cuts happen every `cut_interval` (or early when the dirty set passes a bound). Under heavy churn a long
epoch rarely reads clean; shorter epochs (smaller, read sooner after the cut) give points again, so the
interval halves after an epoch without a point, and recovers.

Shipping is pipelined through the disk's send window (agent.window): an epoch's blocks leave the dirty map
at the cut but stay held by the window until the batch holding them is acknowledged; a BUSY, a lost
connection or a cancellation anywhere puts back exactly what was not acknowledged, and sequence numbers
go on from the first one not stored. While nothing is acknowledged the agent keeps only its dirty map
(memory bounded by disk size) and never touches the source's I/O ("pull ahead").

App-consistent points (agent.appoint) use the same loop: the coordinator hands each Shipper a
`CutOrder` (agent.cuts), the Shipper cuts at once (whatever its interval), says when the epoch's reads
are done (the coordinator keeps the file systems frozen until then) and runs the same proof. A freeze
stops file-system writes, not raw writes to the device, so an epoch that fails the proof makes no point
at all; one that passes is `app-consistent` only if the file systems were still frozen after its cut
instant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from standby.plumbing import failpoints
from standby.plumbing.aio import wait_event
from standby.proto.enums import Consistency, MarkerKind
from standby.proto.messages import WINDOW, BatchKind

from .cuts import AppCut, CutOrder
from .dirtymap import split_extents
from .reader import disk_size
from .window import SendWindow

if TYPE_CHECKING:
    from standby.plumbing.link import Link

    from .reader import BatchBuilder
    from .replicated import ReplicatedDisk

log = logging.getLogger("standby.agent.delta")
MIN_CUT_INTERVAL = 0.05
SIZE_CHECK_INTERVAL = 2.0
# (time the read ended, extents read) per group of an epoch, in reading order: what the proof checks.
Reads = list[tuple[int, list[tuple[int, int]]]]


class DiskResized(Exception):
    """The source disk's size changed: open it again at the process server (which has it resynced)."""


class Shipper:
    """Ships one disk's epochs over one connection through its send window (agent.window): a block cut
    from the dirty map goes back into it unless the batch holding it is acknowledged."""

    def __init__(self, rd: ReplicatedDisk, link: Link, builder: BatchBuilder) -> None:
        if rd.tracking is None:
            raise RuntimeError(f"disk {rd.name}: delta replication needs change tracking")
        self.rd = rd
        self.link = link
        self.d = rd.disk
        self.tracking = rd.tracking
        self.builder = builder
        # `dirty` is read at each put-back: a resync replaces the tracking's map.
        self.window = SendWindow(self.d, link, lambda: self.tracking.map)
        self.busy_since = 0.0  # when the process server started refusing (0: it is not)
        self.orders: list[CutOrder] = []  # cuts asked for by the app-point coordinator, oldest first
        self.poke = asyncio.Event()  # an order arrived: stop waiting for the interval
        self.current: CutOrder | None = None  # the order whose epoch is being shipped

    def order_cut(self, app: AppCut | None = None, lesser: str = "") -> CutOrder:
        """Ask for a cut now (only while `run` is running: the disk's `shipper` is then this Shipper)."""
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
        Shipper is the disk's `shipper`: it is in delta replication and takes CutOrders."""
        self.rd.shipper = self
        try:
            return await self._run(gen, seq)
        finally:
            if self.rd.shipper is self:
                self.rd.shipper = None
            want = self.rd.resync_wanted
            why = f"a resync started: {want[1]}" if want else "delta replication stopped (connection lost?)"
            for order in [o for o in (self.current, *self.orders) if o is not None]:
                order.finish(reason=why)
            self.orders.clear()

    async def _run(self, gen: int, seq: int) -> tuple[int, int]:
        cfg, tr = self.rd.cfg, self.tracking
        last_cut = size_checked = time.monotonic()
        interval = cfg.cut_interval
        while True:
            self.current = None
            restart = await self.settle(WINDOW)
            if restart is not None:
                seq = restart
            if tr.lost:
                self.rd.want_resync("checksum", f"change tracking lost: {tr.lost}")
            if self.rd.resync_wanted is not None:
                return gen, seq
            now = time.monotonic()
            if now - size_checked > SIZE_CHECK_INTERVAL:
                size_checked = now
                if await asyncio.to_thread(disk_size, self.d.cfg.path) != tr.size:
                    raise DiskResized(self.d.cfg.name)
            order = self.current = self.orders.pop(0) if self.orders else None
            if order is None and await self._wait_for_cut(now, last_cut + interval):
                continue
            last_cut = time.monotonic()
            seq, point = await self._epoch(gen, seq, order)
            if point is not None:
                interval = min(interval * 1.5, cfg.cut_interval) if point else max(interval / 2, MIN_CUT_INTERVAL)

    async def _wait_for_cut(self, now: float, due: float) -> bool:
        """Wait a little if no cut is due yet (nor dirty enough for an early one) or the process server
        said to wait; True if it waited (then look again: an order, a resync, a BUSY may have come)."""
        busy_until = self.window.busy_until
        wait = max(due - now, busy_until - now)
        if wait > 0 and (busy_until > now or self.tracking.map.dirty_bytes < self.rd.cfg.cut_bytes):
            self.poke.clear()
            await wait_event(self.poke, min(wait, 0.05))
            return True
        return False

    async def _epoch(self, gen: int, seq: int, order: CutOrder | None) -> tuple[int, bool | None]:
        """Cut, ship the epoch and prove it. Returns the next sequence and whether the epoch made a point
        (None: the process server refused part of it, which is back in the dirty map)."""
        tr, stats = self.tracking, self.rd.stats
        failpoints.hit("agent.epoch")
        closed = await tr.cut()
        # From here the epoch's blocks are the window's until acknowledged (put back otherwise).
        self.window.hold(split_extents(closed.extents(), self.rd.cfg.batch_size))
        app = order.app if order is not None else None
        # Frozen now means frozen at the cut instant: the freeze was complete before the order came.
        frozen_at_cut = app is not None and app.frozen is not None and app.frozen()
        reads, seq, aborted = await self._ship(gen, seq, order)
        if aborted:
            if order is not None:
                order.finish(reason="the process server refused a batch of the epoch (busy); no point")
            return seq, None
        await tr.settle()
        stats.epochs += 1
        reason = tr.conflict(reads)
        if reason:
            stats.inconsistent += 1
            stats.last_inconsistent_reason = reason
            log.debug("disk %s: epoch applied without a point: %s", self.d.cfg.name, reason)
            if order is not None:
                order.finish(reason=f"no point: {reason}")
            return seq, False
        await self._point(gen, seq, order, frozen_at_cut)
        return seq + 1, True

    async def _ship(self, gen: int, seq: int, order: CutOrder | None) -> tuple[Reads, int, bool]:
        """Read, seal and send the epoch's held groups. Returns what was read when, the next sequence, and
        whether a BUSY stopped it (the rest of the epoch is then back in the dirty map too)."""
        tr = self.tracking
        reads: Reads = []
        groups = list(self.window.held)
        # The next group is read while this one is sealed and sent (its recorded read end is then a
        # little late: that only makes the proof stricter).
        ahead = asyncio.ensure_future(asyncio.to_thread(self.builder.read_extents, groups[0])) if groups else None
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
                self.rd.stats.bytes_shipped += batch.logical_bytes
                restart = await self.settle(WINDOW)
                if restart is not None:
                    tr.collecting = False
                    return reads, restart, True
        finally:
            if ahead is not None and not ahead.done():
                ahead.cancel()
            if order is not None:
                order.reads_done.set()  # the coordinator may thaw now
        return reads, seq, False

    async def _point(self, gen: int, seq: int, order: CutOrder | None, frozen_at_cut: bool) -> None:
        """Send the MARKER that makes the proven epoch a point at its cut: crash-consistent, or
        app-consistent when an app cut's freeze held at the cut instant and nothing made it lesser."""
        tr, stats = self.tracking, self.rd.stats
        app = order.app if order is not None else None
        t = tr.wall_time(tr.cut_ts)
        meta: dict[str, Any] = {"generation": gen, "kind": MarkerKind.POINT, "consistency": Consistency.CRASH,
                                "time": t}
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
                    meta["consistency"] = Consistency.APP
                    meta["freeze_seconds"] = secs
        await self.window.send(seq, self.rd.make_marker(seq, meta))
        stats.points += 1
        if self.rd.error is not None:
            self.rd.error = None
            self.rd.wakeup.set()  # a point made: this disk's replication works again; report it now
        if meta["consistency"] == Consistency.APP:
            stats.app_points += 1
            stats.last_app_point = {"time": t, "freeze_seconds": secs, "tag": meta["tag"]}
            log.info("disk %s: app-consistent point %r at sequence %d (frozen %.3f s)", self.d.cfg.name,
                     meta["tag"], seq, secs or 0.0)
        if order is not None:
            order.finish(sequence=seq, consistency=meta["consistency"], time=t, freeze_seconds=secs, reason=lesser)
