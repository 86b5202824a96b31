"""Pure bookkeeping of the listener's pending connections (see gate.py for the theory of operation): who
holds how many, whom to evict at the cap, and the cap itself, derived from the open-file limit."""

from __future__ import annotations

import itertools
import resource
from collections import OrderedDict
from dataclasses import dataclass

PENDING_CAP_MIN, PENDING_CAP_MAX = 16, 512
"""Bounds of the pending cap derived from the open-file limit: never so small that a burst of agents
reconnecting after a restart is throttled, never so large that strangers hold more sockets than a big
deployment's agents do."""


def pending_cap_for(soft_nofile: int) -> int:
    """A quarter of the open-file soft limit, within [PENDING_CAP_MIN, PENDING_CAP_MAX].

    A quarter leaves three quarters for what must never run out: cache segments, agent and master-target
    sockets, the registry. With the common 1,024 limit that is 256 pending connections.
    """
    if soft_nofile == resource.RLIM_INFINITY or soft_nofile <= 0:
        return PENDING_CAP_MAX
    return max(PENDING_CAP_MIN, min(PENDING_CAP_MAX, soft_nofile // 4))


def current_pending_cap() -> int:
    return pending_cap_for(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


@dataclass(frozen=True, slots=True)
class Ticket:
    """One pending connection: where it came from, when, and an id that orders tickets by arrival."""

    id: int
    address: str
    since: float


class Admission:
    """Pure bookkeeping of pending connections: who holds how many, and whom to evict at the cap.

    Every operation is O(1) except choosing a victim, O(number of addresses with pending connections),
    which is at most the cap.
    """

    def __init__(self) -> None:
        # address -> its pending tickets, oldest first
        self._by_address: dict[str, OrderedDict[int, Ticket]] = {}
        self._count = 0
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return self._count

    def count(self, address: str) -> int:
        return len(self._by_address.get(address, ()))

    def add(self, address: str, now: float, cap: int) -> tuple[Ticket, list[Ticket]]:
        """Record a new pending connection; returns it and the tickets to evict so at most `cap` remain."""
        if cap < 1:
            raise ValueError("the pending cap must be at least 1")
        ticket = Ticket(next(self._ids), address, now)
        victims: list[Ticket] = []
        while self._count >= cap:
            victims.append(self._evict_one())
        self._by_address.setdefault(address, OrderedDict())[ticket.id] = ticket
        self._count += 1
        return ticket, victims

    def remove(self, ticket: Ticket) -> bool:
        """Forget a ticket (admitted, closed or evicted); False if it was not pending. Idempotent."""
        queue = self._by_address.get(ticket.address)
        if queue is None or queue.pop(ticket.id, None) is None:
            return False
        if not queue:
            del self._by_address[ticket.address]
        self._count -= 1
        return True

    def _evict_one(self) -> Ticket:
        # The busiest address; among equals, the one whose oldest ticket is oldest.
        address = max(self._by_address, key=lambda a: (len(self._by_address[a]), -next(iter(self._by_address[a]))))
        victim = next(iter(self._by_address[address].values()))
        self.remove(victim)
        return victim
