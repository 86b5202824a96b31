"""The proof behind a crash-consistent point (agent.tracking.Tracking), driven by a scripted tracker: which
epochs may be points, which may not; and app-consistent points through a Shipper on a fake link. The
end-to-end check against real writes is in tests/integration/test_delta.py (write-order records)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from standby.agent import appoint
from standby.agent.appoint import AppPointBusy, AppPointFailed, AppPoints
from standby.agent.config import AgentConfig, DiskConfig
from standby.agent.cuts import AppCut
from standby.agent.delta import Shipper
from standby.agent.disk import LocalDisk
from standby.agent.reader import disk_size
from standby.agent.replicated import ReplicatedDisk
from standby.agent.tracker.base import TrackingLost
from standby.agent.tracking import Tracking
from standby.plumbing.serve import serve_request
from standby.proto.messages import Ack, Marker, Reply, Request

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
    assert tr.lost == "cpu0: dropped events 3" and t.restarts == 1 and tr.losses == 1
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


# -- app-consistent points: a Shipper on a fake link, driven by the coordinator ---------------------------
# The Shipper and agent.appoint run for real; the link acknowledges at once, the "device" is read by a fake
# builder that lets time pass on the scripted tracker (and may write meanwhile). Freezing real file systems
# is tested in test_freeze.py.
class FakeLink:
    name = "fake link"

    def __init__(self, disk: LocalDisk) -> None:
        self.disk = disk
        self.sent: list[Any] = []

    async def send(self, record: Any) -> None:
        self.sent.append(record)
        seq = getattr(record, "sequence", None)
        fut = self.disk.acks.get(seq) if seq is not None else None
        if fut is not None and not fut.done():
            fut.set_result(Ack(self.disk.id, seq, 0))

    def markers(self) -> list[Marker]:
        return [r for r in self.sent if isinstance(r, Marker)]


class FakeBuilder:
    """Reading takes 100 tracker ticks; `during_read` runs in the middle of each read."""

    def __init__(self, tracker: ScriptedTracker, during_read: Callable[[], None] | None = None) -> None:
        self.tracker = tracker
        self.during_read = during_read
        self.reads: list[list[tuple[int, int]]] = []

    def read_extents(self, extents: list[tuple[int, int]]) -> list[tuple[int, memoryview]]:
        self.reads.append(extents)
        self.tracker.now += 50
        if self.during_read is not None:
            self.during_read()
        self.tracker.now += 50
        return [(off, memoryview(bytes(n))) for off, n in extents]

    def delta_batch(self, generation: int, sequence: int, kind: Any, pieces: list[Any]) -> Any:
        return SimpleNamespace(disk=1, sequence=sequence, logical_bytes=sum(len(p) for _, p in pieces))


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


class Harness:
    """One disk in delta replication: `disk_path` is an image file unless a test passes a device; the
    tracker is scripted unless a test passes a real one."""

    def __init__(self, tmp_path: Path, disk_path: Path | None = None, tracker: Any = None, **cfg: Any) -> None:
        if disk_path is None:
            disk_path = tmp_path / "disk.img"
            with open(disk_path, "wb") as f:
                f.truncate(64 * MiB)
        self.cfg = AgentConfig(tmp_path, "m1", "127.0.0.1", 9443, cut_interval=3600.0, **cfg)
        self.disk = LocalDisk(DiskConfig("d0", disk_path), uuid.uuid4(), bytes(32), id=1)
        self.tracker = tracker or ScriptedTracker()
        self.tracking = Tracking(self.disk, self.tracker, disk_size(disk_path))
        # What the agent gives its workers: the disk's own object, and the coordinator over all (one) disks.
        self.rd = ReplicatedDisk(self.disk, self.cfg, tracking=self.tracking)
        self.app_points = AppPoints(self.cfg, [self.rd])
        self.link = FakeLink(self.disk)
        self.builder = FakeBuilder(self.tracker)
        self.shipper = Shipper(self.rd, self.link, self.builder)  # type: ignore[arg-type]

    async def app_point(self, tag: str) -> dict[str, Any]:
        task = asyncio.create_task(self.shipper.run(0, 1))
        poll = asyncio.Event()
        poller = asyncio.create_task(self.tracking.run(poll))  # as the agent does: the ring never fills
        try:
            for _ in range(100):
                if self.rd.shipper is not None:
                    break
                await asyncio.sleep(0.01)
            return await self.app_points.make(tag)
        finally:
            poll.set()
            task.cancel()
            await asyncio.gather(task, poller, return_exceptions=True)


def test_an_app_cut_markers_an_app_consistent_point_with_tag_and_freeze_time(tmp_path):
    log = tmp_path / "scripts.log"
    pre = script(tmp_path / "pre", f'echo "$STANDBY_PHASE $STANDBY_TAG" >> {log}')
    post = script(tmp_path / "post", f'echo "$STANDBY_PHASE $STANDBY_TAG" >> {log}')
    h = Harness(tmp_path, pre_script=pre, post_script=post)
    h.tracker.write(100, 200, 0, 4096)
    res = asyncio.run(h.app_point("nightly"))
    assert res["warnings"] == []
    [entry] = res["disks"]
    assert entry["disk"] == "d0" and entry["consistency"] == "app-consistent" and entry["reason"] == ""
    assert isinstance(entry["freeze_seconds"], float) and entry["freeze_seconds"] >= 0
    [marker] = h.link.markers()
    assert marker.sequence == entry["sequence"]
    meta = marker.meta
    assert meta["kind"] == "point" and meta["consistency"] == "app-consistent" and meta["tag"] == "nightly"
    assert meta["freeze_seconds"] == entry["freeze_seconds"] and meta["time"] == entry["time"]
    assert h.builder.reads == [[(0, 4096)]]  # the block dirty before the cut is in the point's epoch
    assert log.read_text().split("\n")[:2] == ["pre nightly", "post nightly"]
    st = h.rd.stats
    assert st.app_points == 1 and st.last_app_point == {
        "time": meta["time"],
        "freeze_seconds": meta["freeze_seconds"],
        "tag": "nightly",
    }


def test_a_failing_pre_script_gives_a_tagged_crash_consistent_point_and_a_warning(tmp_path, monkeypatch):
    frozen: list[object] = []
    monkeypatch.setattr(appoint, "Freeze", lambda *a, **k: frozen.append(a))  # must never be called
    log = tmp_path / "scripts.log"
    pre = script(tmp_path / "pre", "echo database refused to quiesce; exit 3")
    post = script(tmp_path / "post", f'echo "$STANDBY_PHASE" >> {log}')
    h = Harness(tmp_path, pre_script=pre, post_script=post)
    h.tracker.write(100, 200, 0, 4096)
    res = asyncio.run(h.app_point("before-upgrade"))
    [entry] = res["disks"]
    assert entry["consistency"] == "crash-consistent" and entry["freeze_seconds"] is None
    assert "pre-script" in entry["reason"]
    [warning] = res["warnings"]
    assert "exit status 3" in warning and "database refused to quiesce" in warning
    [marker] = h.link.markers()
    assert marker.meta["consistency"] == "crash-consistent" and marker.meta["tag"] == "before-upgrade"
    assert "freeze_seconds" not in marker.meta
    assert frozen == []  # nothing was frozen
    assert log.read_text() == "post\n"  # the application is released even so
    assert h.rd.stats.app_points == 0


def test_a_raw_write_after_the_cut_before_the_read_makes_no_point(tmp_path):
    """A freeze stops the file system, not a raw writer of the device: the proof still decides."""
    h = Harness(tmp_path, pre_script=script(tmp_path / "pre", "true"))
    h.tracker.write(100, 200, 0, 4096)
    # Submitted during our read of that block (after the cut), completed before the read ended.
    h.builder.during_read = lambda: h.tracker.write(h.tracker.now, h.tracker.now + 10, 0, 4096)
    res = asyncio.run(h.app_point("t"))
    [entry] = res["disks"]
    assert entry["sequence"] is None and entry["consistency"] is None
    assert "written after the cut" in entry["reason"]
    assert h.link.markers() == []
    assert (0, 4096) in h.tracking.map.extents()  # shipped again in the next epoch


def test_a_disk_with_nothing_to_quiesce_gets_a_crash_consistent_point(tmp_path):
    """No mounted file system and no pre-script: calling the point app-consistent would be a lie."""
    h = Harness(tmp_path)
    res = asyncio.run(h.app_point(""))
    [entry] = res["disks"]
    assert entry["consistency"] == "crash-consistent" and "nothing was quiesced" in entry["reason"]
    assert h.link.markers()[0].meta["tag"] == ""


def test_thawed_before_the_cut_is_not_app_consistent(tmp_path):
    async def run() -> tuple[dict[str, Any], Any]:
        h = Harness(tmp_path)
        task = asyncio.create_task(h.shipper.run(0, 1))
        await asyncio.sleep(0.02)
        thawed = asyncio.get_running_loop().create_future()
        thawed.set_result(0.25)
        order = h.shipper.order_cut(AppCut("late", lambda: False, thawed))
        out = await asyncio.wait_for(order.outcome, 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return out, h.link.markers()[0].meta

    out, meta = asyncio.run(run())
    assert out["consistency"] == meta["consistency"] == "crash-consistent"
    assert "thawed" in out["reason"] and out["freeze_seconds"] == 0.25


def test_one_app_point_at_a_time_and_none_without_delta_replication(tmp_path):
    h = Harness(tmp_path, pre_script=script(tmp_path / "pre", "sleep 0.5"))

    async def two() -> list[Any]:
        task = asyncio.create_task(h.shipper.run(0, 1))
        await asyncio.sleep(0.02)
        first = asyncio.create_task(h.app_points.make("a"))
        await asyncio.sleep(0.1)
        second = await asyncio.gather(h.app_points.make("b"), return_exceptions=True)
        out = [await first, *second]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return out

    first, second = asyncio.run(two())
    assert first["disks"][0]["consistency"] == "app-consistent"
    assert isinstance(second, AppPointBusy) and "already being made" in str(second)
    with pytest.raises(AppPointFailed, match="no disk is in delta replication"):
        asyncio.run(h.app_points.make("c"))


def test_the_agent_answers_app_point_requests(tmp_path):
    """The reply the process server gets: Reply(id, True, {"disks", "warnings"}) or an error code."""
    h = Harness(tmp_path, pre_script=script(tmp_path / "pre", "true"))
    out = FakeLink(h.disk)

    async def ask(args: dict[str, Any], shipping: bool = True) -> Reply:
        task = asyncio.create_task(h.shipper.run(0, 1)) if shipping else None
        await asyncio.sleep(0.02)
        # The handler the agent's read loop serves app_point with (agent.daemon.Agent.read_loop).
        await serve_request(out, Request(7, "app_point", args), "ps", "agent", h.app_points.answer)  # type: ignore[arg-type]
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return out.sent[-1]

    ok = asyncio.run(ask({"tag": "op"}))
    assert ok.id == 7 and ok.ok and ok.result["warnings"] == []
    assert set(ok.result["disks"][0]) == {"disk", "sequence", "consistency", "time", "freeze_seconds", "reason"}
    bad = asyncio.run(ask({"tag": 5}))
    assert not bad.ok and bad.code == "bad-input"
    none = asyncio.run(ask({}, shipping=False))
    assert not none.ok and none.code == "failed" and "delta replication" in none.message


def test_the_schedule_makes_tagged_points(tmp_path):
    h = Harness(tmp_path, pre_script=script(tmp_path / "pre", "true"), app_consistent_every=0.2)

    async def run() -> None:
        task = asyncio.create_task(h.shipper.run(0, 1))
        sched = asyncio.create_task(h.app_points.schedule())
        for _ in range(300):
            if len(h.link.markers()) >= 2:
                break
            await asyncio.sleep(0.01)
        for t in (task, sched):
            t.cancel()
        await asyncio.gather(task, sched, return_exceptions=True)

    asyncio.run(run())
    metas = [c.meta for c in h.link.markers()]
    assert len(metas) >= 2 and all(m["tag"] == "scheduled" and m["consistency"] == "app-consistent" for m in metas)
    assert metas[1]["time"] - metas[0]["time"] >= 0.15  # one per interval, not back to back
