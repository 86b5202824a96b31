"""What the process server does with a group of records an agent sent for one disk — decided without I/O,
from the numbers alone: store them, acknowledge a retransmission again, refuse them with BUSY, or close
the connection for a sequence gap. The agent session's disk writer (diskwriter.py) acts on the decision.

The rules, in the order of the group (agent.window relies on the order they keep):

- A record below the next expected sequence is a retransmission of a stored record: taken, and
  acknowledged again (it is durable already).
- The next expected record is stored if it fits under the cache quota (promise 8: the leading records
  that fit are stored); otherwise it is refused (BUSY) and so is every record behind it in the group: the
  agent backs off and resends them in order.
- Once a record was refused, every record after it is refused too until the refused one arrives again —
  even if room appeared meanwhile: it was sent before our BUSY reached the agent.
- A record that skips ahead with nothing refused before it is a real sequence gap: nothing of the group
  is stored or answered, and the connection closes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Seconds the agent is asked to wait before sending again, by why its records were refused.
QUOTA_RETRY = 1.0  # the cache is over its quota: the master target frees room as it applies
CACHE_RETRY = 5.0  # the cache cannot be written (file system full or failing): not cleared in a second
FAILED_OVER_RETRY = 10.0  # the machine is failed over: nothing is replicated until it is reprotected


@dataclass(frozen=True, slots=True)
class Intake:
    """The decision for one group: indices into the group, in order.

    `take`: the records to store (retransmissions among them are acknowledged again without storing);
    `refuse`: the records answered BUSY; `gap`: (expected, got) when the agent skipped ahead — then
    nothing is taken or refused; `refused_from`: the disk's first refused sequence since the last record
    stored in order, once the group is answered (None: nothing refused); `starts_refusing`: this group's
    refusal is the first since a record was stored in order (worth a line in the log).
    """

    take: tuple[int, ...] = ()
    refuse: tuple[int, ...] = ()
    gap: tuple[int, int] | None = None
    refused_from: int | None = None
    starts_refusing: bool = False


def sort_group(records: Sequence[tuple[int, int]], received_seq: int, room: int, refused_from: int | None) -> Intake:
    """Decide a group of `records` — (sequence, stored size) each, in arrival order — for a disk whose
    cache holds up to `received_seq`, with `room` bytes left under the quota, and `refused_from` as the
    previous group left it."""
    take: list[int] = []
    refuse: list[int] = []
    expect = received_seq + 1
    for i, (seq, size) in enumerate(records):
        if refuse:
            refuse.append(i)  # behind a refused record: refused too, the agent resends in order
        elif seq < expect:
            take.append(i)  # a retransmission of a stored record: acknowledged again
        elif seq == expect:
            room -= size
            if room < 0:
                refuse.append(i)
            else:
                take.append(i)
                expect += 1
                refused_from = None
        elif refused_from is not None and refused_from <= expect:
            refuse.append(i)  # sent before our BUSY for an earlier record reached the agent
        else:
            return Intake(gap=(expect, seq), refused_from=refused_from)
    starts = bool(refuse) and refused_from is None
    if starts:
        refused_from = records[refuse[0]][0]
    return Intake(tuple(take), tuple(refuse), None, refused_from, starts)


def after_failed_store(intake: Intake, records: Sequence[tuple[int, int]], received_seq: int) -> Intake:
    """The decision once storing `intake.take` failed (the cache file system is full or failing): what was
    new is refused, ahead of what was refused already; retransmissions are still acknowledged (they were
    durable before)."""
    fresh = tuple(i for i in intake.take if records[i][0] > received_seq)
    if not fresh:
        return intake
    kept = tuple(i for i in intake.take if records[i][0] <= received_seq)
    return Intake(kept, fresh + intake.refuse, None, records[fresh[0]][0], True)
