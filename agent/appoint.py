"""App-consistent points (DESIGN §4, issue 4 item 5): the coordinator across the agent's disks.

Theory of operation, for one point with tag T:

1. pre-script (STANDBY_TAG=T, STANDBY_PHASE=pre). If it fails, nothing is frozen: every disk in delta
   replication cuts now and its point, if the proof passes, is `crash-consistent` with the tag; the
   reply carries the script's failure as a warning.
2. syncfs of every file system on the protected disks, then an ordinary early cut of every disk (the
   *flush epoch*): what the flush wrote is read and shipped *before* the freeze, so the frozen epoch
   holds only what was written since — the freeze stays short.
3. FIFREEZE them all (agent.freeze: a watchdog thaws after `freeze_timeout`, whatever happens here).
4. Every disk's Shipper cuts now (a CutOrder) and reports when that epoch's reads are done; the file
   systems stay frozen until all reported or the freeze time is up. Then thaw, and log the duration.
5. post-script (also after a failed pre-script: the application may be half quiesced). A failure is a
   warning — the point itself is already taken.
6. Each disk's epoch goes through the usual proof (agent.delta). Passed and cut while frozen:
   `app-consistent` with the tag and freeze_seconds. Not passed: no point, with the reason.

A disk with no mounted file system and no pre-script has had nothing quiesced: its point is
crash-consistent (with the tag), and the reply says why. One point at a time per agent: a second request
while one runs is refused at once with a clear message (a caller who waited might sit behind a freeze
timeout and two script timeouts; it is better to say so and let the operator ask again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import Consistency, ErrorCode

from .cuts import AppCut, CutOrder
from .freeze import Freeze, FreezeError, Mount, ScriptFailed, mounts_on, run_script, syncfs

if TYPE_CHECKING:
    from .config import AgentConfig
    from .replicated import Cutter, ReplicatedDisk

log = logging.getLogger("standby.agent.appoint")
MARKER = "freeze.json"  # in the state directory: what is frozen right now (see agent.freeze)
# Reading what syncfs wrote, before the freeze: no file system is frozen meanwhile, so this only bounds
# how long we wait for the flush epoch before freezing anyway.
FLUSH_TIMEOUT = 30.0
SLACK = 30.0  # on top of the freeze and script timeouts: cuts, proofs and MARKERs being sent
SCHEDULE_CHECK = 30.0  # how often a due scheduled point looks again for disks in delta replication
MAX_TAG = 200


class AppPointFailed(RequestFailed):
    """No point could be made at all (no disk in delta replication, or the whole attempt timed out)."""

    def __init__(self, message: str, code: str = ErrorCode.FAILED) -> None:
        super().__init__(code, message)


class AppPointBusy(AppPointFailed):
    """Another app-consistent point of this agent is being made."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "busy")


class AppPoints:
    """Makes app-consistent points for one agent's disks: on demand (`make`, `answer`) and on the
    schedule (`schedule`). Takes part whichever disk is in delta replication at the time (its `shipper`)."""

    def __init__(self, cfg: AgentConfig, disks: list[ReplicatedDisk]) -> None:
        self.cfg = cfg
        self.disks = disks
        self.running: tuple[str, float] | None = None  # (tag, monotonic start) of the point being made
        self.last_done = time.monotonic()  # the schedule counts from agent start, then from each point

    @property
    def limit(self) -> float:
        """The most one point may take: both scripts, the flush epoch, the freeze and some slack."""
        cfg = self.cfg
        return 2 * cfg.script_timeout + FLUSH_TIMEOUT + cfg.freeze_timeout + SLACK

    async def answer(self, tag: str = "") -> dict[str, Any]:
        """Make an app-consistent point for the process server (the operator's `standby app-point`). The
        tag was validated at the boundary (proto.requests); AppPointBusy/AppPointFailed carry their code."""
        if len(tag) > MAX_TAG or not tag.isprintable():
            raise AppPointFailed(f"a tag is printable text of at most {MAX_TAG} characters", ErrorCode.BAD_INPUT)
        return await self.make(tag)

    async def make(self, tag: str, scripts: bool = True, quiesced: str = "") -> dict[str, Any]:
        """Make one point; returns {"disks": [...], "warnings": [...]} (see `_entry`). Without `scripts` the
        pre- and post-script are not run (the failback's shutdown step: its own script stopped the
        workload, which must stay stopped); `quiesced` names what quiesced the machine then."""
        if self.running is not None:
            other, since = self.running
            raise AppPointBusy(
                f"an app-consistent point (tag {other!r}) is already being made, for {time.monotonic() - since:.0f} s;"
                " ask again when it is done"
            )
        self.running = (tag, time.monotonic())
        try:
            # Not asyncio.wait_for: on 3.11 it can swallow a cancellation (see plumbing.aio), and then the
            # schedule loop would outlive the agent's session.
            async with asyncio.timeout(self.limit):
                return await self._make(tag, scripts, quiesced)
        except TimeoutError:
            raise AppPointFailed(f"the app-consistent point {tag!r} did not finish within {self.limit:.0f} s") from None
        finally:
            self.running = None
            self.last_done = time.monotonic()

    async def _make(self, tag: str, scripts: bool, quiesced: str) -> dict[str, Any]:
        cfg = self.cfg
        pre_script, post_script = (cfg.pre_script, cfg.post_script) if scripts else (None, None)
        # The disks in delta replication now: they take part in this point.
        shippers = {rd.name: rd.shipper for rd in self.disks if rd.shipper is not None}
        if not shippers:
            raise AppPointFailed(
                "no disk is in delta replication (initial replication, resync, or not connected): no point can be made"
            )
        warnings: list[str] = []
        crash_reason = ""  # why the points can only be crash-consistent
        per_disk: dict[str, list[Mount]] = {}
        try:
            for rd in self.disks:
                if rd.name in shippers:
                    per_disk[rd.name] = await asyncio.to_thread(mounts_on, [rd.disk.cfg.path])
        except OSError as exc:
            crash_reason = f"cannot list the mounted file systems: {exc}"
            warnings.append(f"{crash_reason}; made crash-consistent points with the tag instead")
        pre_started = False
        if not crash_reason and pre_script is not None:
            pre_started = True
            try:
                await asyncio.to_thread(run_script, pre_script, "pre", tag, cfg.script_timeout)
            except ScriptFailed as exc:
                crash_reason = "the pre-script failed"
                warnings.append(f"{exc}; made crash-consistent points with the tag instead (nothing was frozen)")
        try:
            orders = await self._cut(tag, shippers, per_disk, crash_reason, warnings, quiesced or pre_script)
        finally:
            # The post-script undoes the pre-script: run it whenever the pre-script ran (even if it failed,
            # the application may be half quiesced) or there is none; never after one that never started.
            # In a finally, so that a timeout or a lost connection still releases the application.
            if post_script is not None and (pre_started or pre_script is None):
                try:
                    await asyncio.to_thread(run_script, post_script, "post", tag, cfg.script_timeout)
                except ScriptFailed as exc:
                    warnings.append(str(exc))
        await asyncio.wait([o.outcome for o in orders.values()])  # each disk's MARKER sent, or why not
        disks = [self._entry(rd.name, orders.get(rd.name)) for rd in self.disks]
        made = sum(1 for e in disks if e["consistency"] == Consistency.APP)
        log.info("app-consistent point %r: %d of %d disk(s) app-consistent", tag, made, len(disks))
        for w in warnings:
            log.warning("app-consistent point %r: %s", tag, w)
        return {"disks": disks, "warnings": warnings}

    async def _cut(
        self,
        tag: str,
        shippers: dict[str, Cutter],
        per_disk: dict[str, list[Mount]],
        crash_reason: str,
        warnings: list[str],
        quiesced: object = None,
    ) -> dict[str, CutOrder]:
        """Flush, freeze, order every disk's cut, keep frozen until their reads are done, thaw. Without a
        freeze (`crash_reason`, or the freeze fails) the cuts are ordered all the same: tagged
        crash-consistent points."""
        cfg = self.cfg
        mounts = list({m.dev: m for ms in per_disk.values() for m in ms}.values())
        thawed: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        fz: Freeze | None = None
        orders: dict[str, CutOrder] = {}
        try:
            if not crash_reason:
                await self._flush(mounts, list(shippers.values()), warnings)
                fz = Freeze(mounts, cfg.freeze_timeout, cfg.state_dir / MARKER)
                try:
                    await asyncio.to_thread(fz.freeze)
                except FreezeError as exc:
                    crash_reason = "the file systems could not be frozen"
                    warnings.append(f"{exc}; made crash-consistent points with the tag instead")
                    fz = None  # it thawed whatever it had frozen
            app = AppCut(tag, _probe(fz), thawed)
            for name, sh in shippers.items():
                orders[name] = sh.order_cut(app, crash_reason or self._lesser(per_disk.get(name, []), quiesced))
            if fz is not None and not await _all_set([o.reads_done for o in orders.values()], fz.remaining()):
                warnings.append(
                    f"the epochs were not all read within freeze_timeout ({cfg.freeze_timeout:g} s): thawed"
                    " before; those disks have a crash-consistent point or none"
                )
        finally:
            secs = fz.thaw() if fz is not None else None  # synchronous: it must happen even when cancelled
            if not thawed.done():
                thawed.set_result(secs)
            if fz is not None:
                log.info(
                    "app-consistent point %r: %d file system(s) frozen for %.3f s%s",
                    tag,
                    len(mounts),
                    secs or 0.0,
                    " (thawed by the watchdog)" if fz.expired else "",
                )
        return orders

    async def _flush(self, mounts: list[Mount], shippers: list[Cutter], warnings: list[str]) -> None:
        """syncfs, then an early cut so that what the flush wrote is shipped before the freeze."""
        for m in mounts:
            try:
                await asyncio.to_thread(syncfs, m.mount_point)
            except OSError as exc:
                warnings.append(f"{exc} (the freeze flushes instead, and lasts longer)")
        if mounts:
            await _all_set([sh.order_cut().reads_done for sh in shippers], FLUSH_TIMEOUT)

    @staticmethod
    def _lesser(mounts: list[Mount], quiesced: object) -> str:
        """Why a disk's point is only crash-consistent though the cut was ordered as app-consistent."""
        if mounts or quiesced:
            return ""
        return "no mounted file system on the disk and no pre_script: nothing was quiesced"

    @staticmethod
    def _entry(name: str, order: CutOrder | None) -> dict[str, Any]:
        """One disk's line in the reply: sequence of its MARKER (sent, not yet applied), consistency,
        cut time, freeze seconds and why there is no point or a lesser one."""
        if order is None:
            return {
                "disk": name,
                "sequence": None,
                "consistency": None,
                "time": None,
                "freeze_seconds": None,
                "reason": "not in delta replication (initial replication, resync, or not connected)",
            }
        return {"disk": name, **order.outcome.result()}

    async def schedule(self) -> None:
        """The policy's app-consistent frequency (app_consistent_every; 0: off), tag "scheduled". Counts
        from the last point made by any means (at first from agent start: no freeze while the machine is
        still booting), so an operator's point also resets it. A due point waits for a disk in delta
        replication."""
        every = self.cfg.app_consistent_every
        if not every:
            return
        while True:
            wait = self.last_done + every - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, SCHEDULE_CHECK))
                continue
            if self.running is not None or all(rd.shipper is None for rd in self.disks):
                await asyncio.sleep(SCHEDULE_CHECK)
                continue
            try:
                await self.make("scheduled")
            except AppPointFailed as exc:
                log.warning("scheduled app-consistent point not made: %s", exc)
            except Exception:  # a bug must not end the schedule for the agent's lifetime
                log.exception("scheduled app-consistent point failed")


def _probe(fz: Freeze | None) -> Callable[[], bool] | None:
    """What a Shipper asks right after its cut: are the file systems still frozen?"""
    return None if fz is None else (lambda: fz.frozen)


async def _all_set(events: list[asyncio.Event], timeout: float) -> bool:
    """Wait until every event is set, at most `timeout` seconds; True if they all were."""
    if timeout <= 0:
        return all(e.is_set() for e in events)
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        _, pending = await asyncio.wait(waits, timeout=timeout)
        return not pending
    finally:
        for w in waits:
            w.cancel()
