"""The send window of one disk over one connection: which records are in flight, and the one rule that
keeps change tracking honest while they are (promise 1 and 3).

**A block leaves the dirty map only when the record holding it is acknowledged.** Between the cut that
takes blocks out of the dirty map and the ACK of the batch that carries them, the window *holds* them:
first as groups cut but not yet sent (`held`), then as records sent but not acknowledged (`pending`).
Whatever ends that — an ACK, a BUSY, a connection reset, a cancellation anywhere in between — the
blocks are either acknowledged (durable at the process server) or put back into the dirty map by
`put_back()`, which every user of the window calls in a `finally`. Nothing else may drop them.

Initial replication, delta epochs and resync all send through this one window, so they share its
ordering rules:

- Records go out in sequence order; the process server stores them in order and answers each with ACK
  (durable) or BUSY (not stored: its cache is over quota, or the machine is failed over).
- A BUSY for sequence s means s and every record after it were refused (the server refuses all that
  follow a refused one until s arrives again). The window waits for the answers of everything in
  flight — so that no late answer is taken for the answer to a resent number — puts back what was not
  acknowledged, and tells the caller to go on from s after `busy_until`.
- Acknowledged records stay acknowledged: their blocks are never marked again (under back-pressure a
  whole epoch re-marked would be re-sent for ever: a livelock).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from standby.proto.messages import WINDOW, Ack, Busy

if TYPE_CHECKING:
    from .dirtymap import DirtyMap


Extents = list[tuple[int, int]]


class Answers(Protocol):
    """Where the connection's read loop delivers the ACK or BUSY of a disk's record, by sequence
    (agent.disk.LocalDisk.acks)."""

    acks: dict[int, asyncio.Future[Ack | Busy]]


@dataclass(eq=False)
class Pending:
    sequence: int
    extents: Extents
    future: asyncio.Future[Ack | Busy]
    tag: Any = None  # the sender's own note (initial replication: the batch's start offset)


@dataclass
class Refused:
    """What `settle` returns after a BUSY: go on from `sequence` (and, for initial replication, from
    the refused record's tag) once `busy_until` has passed."""

    sequence: int
    tag: Any
    reason: str
    retry_after: float


@dataclass(eq=False)
class SendWindow:
    """Records of one disk in flight over one link. `dirty` gives the map to put blocks back into (the
    current dirty map, which a resync may replace); None where blocks are not tracked (the initial copy
    resumes from the acknowledged cursor instead)."""

    disk: Answers
    link: Any  # plumbing.link.Link (or a test double with `async send(record)`)
    dirty: Callable[[], DirtyMap] | None = None
    held: deque[Extents] = field(default_factory=deque)
    pending: deque[Pending] = field(default_factory=deque)
    busy_until: float = 0.0
    next_seq: int = 0  # after the last record sent
    acked_bytes: int = 0  # logical bytes of tracked blocks acknowledged (status, tests)
    acked_records: int = 0  # records acknowledged through this window

    # -- holding and sending ------------------------------------------------------------------------
    def hold(self, groups: list[Extents]) -> None:
        """Blocks just taken out of the dirty map (a cut), in the groups they will be sent in."""
        self.held.extend(g for g in groups if g)

    def next_group(self) -> Extents | None:
        """The next held group to read and send (it stays held until `send` takes it)."""
        return self.held[0] if self.held else None

    async def send(self, seq: int, record: Any, extents: Extents | None = None, tag: Any = None) -> None:
        """Send a record. `extents`: the held group it carries (must be `next_group()`), which moves to
        `pending` before anything can interrupt the send."""
        if extents:
            if not self.held or self.held[0] is not extents:
                raise RuntimeError("a window sends held groups in the order they were cut")
            self.held.popleft()
        fut: asyncio.Future[Ack | Busy] = asyncio.get_running_loop().create_future()
        self.disk.acks[seq] = fut
        self.pending.append(Pending(seq, list(extents or ()), fut, tag))
        self.next_seq = seq + 1
        await self.link.send(record)

    # -- answers ------------------------------------------------------------------------------------
    async def settle(self, room: int = WINDOW) -> Refused | None:
        """Process answers until fewer than `room` records are in flight (room=1: until all are
        answered). Returns a `Refused` after a BUSY (everything unacknowledged was put back), else None."""
        while self.pending and (len(self.pending) >= room or self.pending[0].future.done()):
            head = self.pending[0]
            res = await head.future
            if isinstance(res, Ack):
                self.pending.popleft()
                self.disk.acks.pop(head.sequence, None)
                self.acked_bytes += sum(n for _, n in head.extents)
                self.acked_records += 1
                continue
            # BUSY: the server refuses everything after this one too. Wait for all their answers (so none
            # is mistaken for the answer to a resent number), then put back what was not stored.
            for p in list(self.pending)[1:]:
                await p.future
            refused = Refused(head.sequence, head.tag, res.reason, res.retry_after)
            self.busy_until = time.monotonic() + res.retry_after
            self.put_back()
            return refused
        return None

    async def drain(self) -> Refused | None:
        """Wait until everything sent is answered."""
        return await self.settle(1)

    # -- the rule -----------------------------------------------------------------------------------
    def put_back(self) -> int | None:
        """Everything held or unacknowledged goes back into the dirty map; the window is empty after.
        Returns the first unacknowledged sequence (None if nothing was in flight). Idempotent: call it
        from every `finally`."""
        first = self.pending[0].sequence if self.pending else None
        target = self.dirty() if self.dirty is not None else None
        for p in self.pending:
            if target is not None:
                target.mark_extents(p.extents)
            self.disk.acks.pop(p.sequence, None)
            if not p.future.done():
                p.future.cancel()
        if target is not None:
            for g in self.held:
                target.mark_extents(g)
        self.pending.clear()
        self.held.clear()
        return first
