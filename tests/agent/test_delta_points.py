"""The proof behind a crash-consistent point (agent.delta.Tracking), driven by a scripted tracker: which
epochs may be points, which may not. The end-to-end check against real writes is in
tests/integration/test_delta.py (write-order records)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from standby.agent.config import DiskConfig
from standby.agent.daemon import LocalDisk
from standby.agent.delta import Tracking
from standby.agent.tracker.base import TrackingLost

MiB = 1024 * 1024


class ScriptedTracker:
    """Hands out the events queued so far; time is set by the test."""

    proves_order = True

    def __init__(self) -> None:
        self.now = 1_000
        self.done: list[tuple[int, int, int]] = []
        self.subs: list[tuple[int, int, int]] = []
        self.slow: list[tuple[int, int, int]] = []
        self.fail: str | None = None
        self.stats: dict[str, float] = {}
        self.restarts = 0

    def poll(self) -> list[tuple[int, int, int]]:
        """Events stamped up to now (the kernel cannot report the future); `slow` ones one poll later."""
        if self.fail:
            raise TrackingLost(self.fail)
        out = [e for e in self.done if e[0] <= self.now]
        self.done = [e for e in self.done if e[0] > self.now] + self.slow
        self.slow = []
        return out

    def take_queued(self) -> list[tuple[int, int, int]]:
        out = [e for e in self.subs if e[0] <= self.now]
        self.subs = [e for e in self.subs if e[0] > self.now]
        return out

    def now_ns(self) -> int:
        return self.now

    def close(self) -> None:
        pass

    def start(self) -> None:
        self.fail = None
        self.restarts += 1

    def write(self, submitted: int, completed: int, a: int, b: int) -> None:
        self.subs.append((submitted, a, b))
        self.done.append((completed, a, b))


def tracking(tracker: object) -> Tracking:
    disk = LocalDisk(DiskConfig("d0", Path("/dev/null")), uuid.uuid4(), bytes(32))
    return Tracking(disk, tracker, 64 * MiB)


def cut(tr: Tracking):
    return asyncio.run(tr.cut())


def test_completions_before_the_cut_are_the_epoch_after_it_the_next():
    t = ScriptedTracker()
    tr = tracking(t)
    t.write(100, 200, 0, 4096)
    t.now = 1000
    # Completed before the cut but readable only at the next poll (during the grace): still this epoch's.
    t.slow.append((950, 8192, 12288))
    t.write(1001, 1010, 1 * MiB, 1 * MiB + 4096)  # after the cut: next epoch
    closed = cut(tr)
    t.now = 2000
    tr.drain()
    assert closed.extents() == [(0, 4096), (8192, 4096)]
    assert tr.map.extents() == [(1 * MiB, 4096)]


def test_no_write_after_the_cut_is_a_point():
    t = ScriptedTracker()
    tr = tracking(t)
    t.write(100, 200, 0, 4096)
    closed = cut(tr)
    t.now = 2000
    assert tr.conflict([(2000, closed.extents())]) == ""


def test_submission_after_cut_before_read_end_denies_the_point():
    t = ScriptedTracker()
    tr = tracking(t)
    t.write(100, 200, 0, 4096)
    closed = cut(tr)  # cut at 1000
    t.write(1500, 1600, 0, 4096)  # rewritten before our read ended at 2000
    t.now = 2005
    tr.drain()
    assert "written after the cut" in tr.conflict([(2000, closed.extents())])


def test_submission_after_the_read_ended_does_not_matter():
    t = ScriptedTracker()
    tr = tracking(t)
    t.write(100, 200, 0, 4096)
    closed = cut(tr)
    t.write(2500, 2600, 0, 4096)  # after the read of that block ended at 2000
    t.now = 3000
    tr.drain()
    assert tr.conflict([(2000, closed.extents())]) == ""
    assert tr.map.extents() == [(0, 4096)]  # but it is shipped in the next epoch


def test_only_reads_that_ended_after_the_submission_count():
    """Two groups read one after the other: a write submitted between the two read ends hits only a block
    of the second group if it is to be a conflict."""
    t = ScriptedTracker()
    tr = tracking(t)
    t.write(100, 200, 0, 4096)
    t.write(100, 200, 32 * MiB, 32 * MiB + 4096)
    closed = cut(tr)
    first, second = [(0, 4096)], [(32 * MiB, 4096)]
    assert closed.extents() == first + second
    t.write(2500, 2600, 0, 4096)  # block of the first group, whose read ended at 2000
    t.now = 3005
    tr.drain()
    assert tr.conflict([(2000, first), (3000, second)]) == ""
    tr2 = tracking(t2 := ScriptedTracker())
    t2.write(100, 200, 0, 4096)
    t2.write(100, 200, 32 * MiB, 32 * MiB + 4096)
    cut(tr2)
    t2.write(2500, 2600, 32 * MiB, 32 * MiB + 4096)  # block of the second group, read until 3000
    t2.now = 3005
    tr2.drain()
    assert tr2.conflict([(2000, first), (3000, second)])


def test_write_in_flight_at_the_cut_is_allowed():
    """Submitted before the cut, completed after it: a crash at the cut may or may not keep it."""
    t = ScriptedTracker()
    tr = tracking(t)
    t.write(100, 200, 0, 4096)
    t.write(990, 1200, 0, 4096)  # in flight at the cut (1000)
    closed = cut(tr)
    t.now = 2005
    tr.drain()
    assert tr.conflict([(2000, closed.extents())]) == ""
    assert tr.map.extents() == [(0, 4096)]


def test_completion_before_the_cut_seen_late_denies_the_point():
    t = ScriptedTracker()
    tr = tracking(t)
    t.write(100, 200, 0, 4096)
    closed = cut(tr)
    t.done.append((999, 8192, 12288))  # stamped before the cut, readable only after the closed map sealed
    t.now = 2005
    tr.drain()
    assert "reported after" in tr.conflict([(2000, closed.extents())])
    assert (8192, 4096) in tr.map.extents()  # shipped in the next epoch


def test_lost_tracking_denies_the_point_and_restarts_the_tracker():
    t = ScriptedTracker()
    tr = tracking(t)
    t.write(100, 200, 0, 4096)
    closed = cut(tr)
    t.fail = "cpu0: dropped events 3"
    tr.drain()
    assert tr.lost == "cpu0: dropped events 3" and t.restarts == 1
    assert "lost" in tr.conflict([(2000, closed.extents())])


def test_a_tracker_that_cannot_order_never_makes_points():
    t = ScriptedTracker()
    t.proves_order = False  # type: ignore[misc]
    tr = tracking(t)
    t.write(100, 200, 0, 4096)
    closed = cut(tr)
    assert "cannot prove" in tr.conflict([(2000, closed.extents())])


def test_submissions_are_not_kept_between_epochs():
    """Memory stays bounded while nothing is being checked (pull ahead, disconnected)."""
    t = ScriptedTracker()
    tr = tracking(t)
    for i in range(1000):
        t.write(2000 + i, 2001 + i, i * 4096, (i + 1) * 4096)
    t.now = 5000
    tr.drain()
    assert tr.queued == []


@pytest.mark.parametrize("late", [False, True])
def test_idle_epoch_is_a_point_unless_late(late):
    t = ScriptedTracker()
    tr = tracking(t)
    closed = cut(tr)
    if late:
        t.done.append((500, 0, 4096))
        t.now = 2005
        tr.drain()
    assert bool(tr.conflict([(2000, closed.extents())])) == late
