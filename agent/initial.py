"""Initial replication of one disk: copy it in large sequential batches through the disk's send window,
a few read and sealed ahead in threads, each kept until the process server acknowledges it as durable
(promise 1), then the `initial-complete` marker.

Change tracking started before (agent.replicated), so blocks written during the copy are in the dirty
map and go with delta replication after it. A BUSY makes the copy go on from the refused batch after the
delay asked for; a lost connection ends the session, and the next one resumes from the acknowledged
cursor the process server reports when the disk is opened again, not from zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from standby.proto.enums import MarkerKind
from standby.proto.messages import WINDOW

from .window import Refused, SendWindow

if TYPE_CHECKING:
    from standby.plumbing.link import Link

    from .replicated import ReplicatedDisk

log = logging.getLogger("standby.agent.initial")
# Batches read and sealed ahead of the one being sent (threads: reads and zstd/AES release the GIL). Two
# keep both cores of the 2-core test machine busy; four were no faster and held 30 MB more (bench).
READ_AHEAD = 2
PROGRESS_LOG_INTERVAL = 10.0


async def initial_replication(rd: ReplicatedDisk, link: Link, info: dict[str, Any]) -> None:
    """Copy the disk from the cursor of `info` (the process server's disk_open answer) and mark it complete."""
    await InitialCopy(rd, link, info).run()


class InitialCopy:
    """One attempt at the copy, over one connection."""

    def __init__(self, rd: ReplicatedDisk, link: Link, info: dict[str, Any]) -> None:
        self.rd = rd
        self.name = rd.name
        self.gen, self.seq, self.cursor = int(info["generation"]), int(info["next_sequence"]), int(info["cursor"])
        self.offset = self.cursor  # of the next batch to read
        self.size, self.step = rd.disk.size, rd.cfg.batch_size
        self.builder = rd.builder()
        self.win = SendWindow(rd.disk, link)
        self.ahead: deque[tuple[int, int, asyncio.Future[Any]]] = deque()  # (sequence, offset, batch being built)
        self.busy_since, self.acked_then = 0.0, 0
        self.t0 = self.last_log = 0.0

    async def run(self) -> None:
        size, cursor = self.size, self.cursor
        if cursor:
            log.info("disk %s: resuming initial replication at %d of %d bytes", self.name, cursor, size)
        else:
            log.info("disk %s: starting initial replication of %d bytes", self.name, size)
        self.t0 = self.last_log = time.monotonic()
        try:
            while await self._step():
                pass
            await send_marker(self.win, self.rd, self.gen, self.seq, MarkerKind.INITIAL_COMPLETE)
        finally:
            self._drop_ahead()
            self.win.put_back()
        el = time.monotonic() - self.t0
        log.info("disk %s: initial replication sent %d MiB in %.1f s (%.0f MB/s)", self.name,
                 (size - cursor) >> 20, el, (size - cursor) / max(el, 1e-6) / 1e6)

    async def _step(self) -> bool:
        """Take the answers, read ahead, send the next batch. False when everything is sent and answered."""
        win = self.win
        # Answers first: room in the window, or a BUSY to go back for.
        refused = await win.settle(WINDOW if (self.ahead or self.offset < self.size) else 1)
        if refused is not None:
            await self._refused(refused)
            return True
        while self.offset < self.size and len(self.ahead) < READ_AHEAD:
            n = min(self.step, self.size - self.offset)
            build = asyncio.ensure_future(
                asyncio.to_thread(self.builder.initial_batch, self.gen, self.seq, self.offset, n)
            )
            self.ahead.append((self.seq, self.offset, build))
            self.seq += 1
            self.offset += n
        if not self.ahead:
            return bool(win.pending)  # wait for the last answers (settle with room 1 above)
        bseq, boff, build = self.ahead[0]
        batch = await build
        self.ahead.popleft()
        await win.send(bseq, batch, tag=boff)
        if self.busy_since and win.acked_records > self.acked_then:
            log.info("disk %s: the process server takes data again after %.0f s", self.name,
                     time.monotonic() - self.busy_since)
            self.busy_since = 0.0
        self._log_progress(boff)
        return True

    async def _refused(self, refused: Refused) -> None:
        """Go back to the refused batch, after the delay the process server asked for."""
        if not self.busy_since:  # once per episode: under back-pressure this repeats every second
            self.busy_since, self.acked_then = time.monotonic(), self.win.acked_records
            log.info("disk %s: process server busy (%s); going on from %d MiB when it takes data again",
                     self.name, refused.reason, refused.tag >> 20)
        self._drop_ahead()
        self.seq, self.offset = refused.sequence, refused.tag
        await asyncio.sleep(max(self.win.busy_until - time.monotonic(), 0.0))

    def _drop_ahead(self) -> None:
        for _, _, fut in self.ahead:
            fut.cancel()
        self.ahead.clear()

    def _log_progress(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last_log < PROGRESS_LOG_INTERVAL:
            return
        rate = (done - self.cursor) / (now - self.t0)
        eta = f"{(self.size - done) / rate:.0f} s" if rate else "unknown"
        log.info("disk %s: initial replication %.0f%% (%d of %d MiB), %.0f MB/s, ETA %s", self.name,
                 100 * done / self.size, done >> 20, self.size >> 20, rate / 1e6, eta)
        self.last_log = now


async def send_marker(win: SendWindow, rd: ReplicatedDisk, gen: int, seq: int, kind: str) -> None:
    """Send a marker and wait until it is acknowledged (resent after each BUSY's delay)."""
    while True:
        await win.send(seq, rd.make_marker(seq, {"generation": gen, "kind": kind, "time": time.time()}))
        if await win.drain() is None:
            break
        await asyncio.sleep(max(win.busy_until - time.monotonic(), 0.0))
    log.info("disk %s: %s marker acknowledged (sequence %d)", rd.name, kind, seq)
