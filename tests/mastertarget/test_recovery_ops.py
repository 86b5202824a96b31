"""Going back to a recovery point (standby.mastertarget.recovery): failover in place with its REDO records
(back, forward, back again; resuming an interrupted move), commit, and test failover (copy, then undo
every group newer than the point, including groups applied during and after the copy).

Driven by the simulated apply loop of test_history (`Sim`): the model knows the image at every point.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from standby.mastertarget import recovery
from standby.mastertarget.journal import DiskJournal
from standby.mastertarget.journal_codec import JournalError, UndoRecord
from standby.mastertarget.recovery import FailoverState, RedoLog, commit, copy_replica, move, undo_into
from standby.mastertarget.replicas import Replica, ReplicaError, open_replica
from tests.mastertarget.test_journal import Sim, check_files, check_model, check_restorable, snapshot

Writer = Callable[[int, bytes | None, int], None]


class Crash(Exception):
    """The master target dies here."""


def begin_failover(sim: Sim) -> FailoverState:
    latest = sim.journal.last_seq
    fo = FailoverState(latest=latest, at=latest, target=latest, started_at=1.0)
    fo.save(sim.journal.dir)
    return fo


def restart(sim: Sim) -> tuple[DiskJournal, Replica]:
    """A new process: the journal and the replica opened again from their files."""
    sim.journal.close()
    sim.replica.close()
    sim.replica = open_replica("raw", sim.replica.path, sim.size)
    sim.journal = sim.new_journal()
    assert sim.journal.open() is None
    return sim.journal, sim.replica


def points(sim: Sim) -> list[int]:
    return [g.last for g in sim.journal.points()]


# -- failover in place ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [101, 102])
def test_move_back_forward_and_back_again(tmp_path: Path, seed: int) -> None:
    sim = Sim(tmp_path, seed, seg_max=64 << 10)
    sim.run(120, idle_rate=0.15)
    final = sim.read_replica()
    j = sim.journal
    before = snapshot(j)
    fo = begin_failover(sim)
    pts = points(sim)
    p_old, p_mid, p_new = pts[5], pts[len(pts) // 2], pts[-4]
    for target in [p_mid, p_new, p_old, p_mid, fo.latest, p_old, p_old, p_new]:
        move(j, sim.replica, fo, target)
        assert fo.at == fo.target == target
        assert FailoverState.load(j.dir) == fo
        assert sim.read_replica() == sim.image_at(target), f"wrong image at {target}"
    move(j, sim.replica, fo, fo.latest)
    assert sim.read_replica() == final
    assert snapshot(j) == before  # moving never touches the retention journal
    assert (j.dir / "redo.jrn").exists()
    sim.close()


def test_move_writes_each_block_once_and_refuses_the_impossible(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 103)
    sim.run(30, idle_rate=0.0)
    j = sim.journal
    fo = begin_failover(sim)
    pts = points(sim)
    target = pts[3]
    covered = set()
    for g in j.groups_after(target):
        for off, n in j.undo_ranges(g):
            covered.update(range(off, off + n, 512))
    assert move(j, sim.replica, fo, target) == 512 * len(covered)  # every block once, however often rewritten
    assert move(j, sim.replica, fo, target) == 0  # already there
    with pytest.raises(JournalError, match="newer than"):
        move(j, sim.replica, fo, fo.latest + 1)
    assert fo.at == target
    RedoLog(j).remove()  # the way forward is gone
    with pytest.raises(JournalError, match="no redo step"):
        move(j, sim.replica, fo, fo.latest)
    sim.close()


def test_oldest_cover() -> None:
    spans = [(0, 10, 2), (5, 20, 0), (15, 30, 1), (40, 50, 3), (45, 48, 1)]
    assert recovery.oldest_cover(spans) == [(0, 5, 2), (5, 20, 0), (20, 30, 1), (40, 45, 3), (45, 48, 1), (48, 50, 3)]
    assert recovery.oldest_cover([]) == []
    rng = random.Random(5)
    for _ in range(200):
        spans = [(a, a + rng.randint(1, 40), rng.randint(0, 9)) for a in (rng.randint(0, 100) for _ in range(8))]
        best: dict[int, int] = {}
        for a, b, r in spans:
            for x in range(a, b):
                best[x] = min(best.get(x, r), r)
        got = {x: r for a, b, r in recovery.oldest_cover(spans) for x in range(a, b)}
        assert got == best


@pytest.mark.parametrize("k", [0, 1, 6, 15])
@pytest.mark.parametrize("how", ["before-write", "partial-write", "torn-redo"])
def test_interrupted_backward_move_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int, how: str) -> None:
    sim = Sim(tmp_path, 110 + k, seg_max=48 << 10)
    sim.run(50, idle_rate=0.1)
    final = sim.read_replica()
    fo = begin_failover(sim)
    latest = fo.latest
    target = points(sim)[4]
    real_put, real_push = recovery._put, recovery.RedoLog.push
    calls = 0

    def crashing_put(write: Writer, rec: UndoRecord, pieces: list[tuple[int, int]]) -> int:
        nonlocal calls
        if calls == k:
            if how == "partial-write":
                real_put(write, rec, pieces[: len(pieces) // 2 + 1])
            raise Crash
        calls += 1
        return real_put(write, rec, pieces)

    def torn_push(self: RedoLog, *args: object) -> None:
        real_push(self, *args)  # type: ignore[arg-type]
        os.truncate(self.path, self.path.stat().st_size - 9)  # the crash came while it was appended
        raise Crash

    if how == "torn-redo":
        monkeypatch.setattr(recovery.RedoLog, "push", torn_push)
    else:
        monkeypatch.setattr(recovery, "_put", crashing_put)
    with pytest.raises(Crash):
        move(sim.journal, sim.replica, fo, target)
    monkeypatch.undo()
    if how != "torn-redo" and calls < k:
        pytest.skip(f"the step wrote from only {calls} undo records")
    j, rep = restart(sim)
    saved = FailoverState.load(j.dir)
    assert saved is not None and (saved.latest, saved.at, saved.target) == (latest, latest, target)
    assert saved.step == {"op": recovery.UNDO_STEP, "src": latest, "dst": target}
    if how == "torn-redo":
        assert sim.read_replica() == final  # nothing written before the REDO records were whole and synced
    recovery.resume(j, rep, saved)  # what start-up does
    assert (saved.at, saved.target, saved.step) == (target, target, None)
    assert sim.read_replica() == sim.image_at(target)
    # The REDO records were captured right: the way forward gives every newer point back.
    mid = points(sim)[len(points(sim)) * 2 // 3]
    move(j, rep, saved, mid)
    assert sim.read_replica() == sim.image_at(mid)
    move(j, rep, saved, latest)
    assert sim.read_replica() == final
    sim.close()


@pytest.mark.parametrize("where", ["mid-redo", "after-pop"])
def test_interrupted_forward_move_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    sim = Sim(tmp_path, 120)
    sim.run(40, idle_rate=0.1)
    final = sim.read_replica()
    fo = begin_failover(sim)
    pts = points(sim)
    move(sim.journal, sim.replica, fo, pts[-3])
    move(sim.journal, sim.replica, fo, pts[2])  # two backward steps on the redo stack
    real_apply, real_pop = recovery.apply_undo, recovery.RedoLog.pop

    def crashing_apply(rec: UndoRecord, write: Writer) -> int:
        real_apply(rec, write)
        raise Crash

    def crashing_pop(self: RedoLog) -> None:
        real_pop(self)
        raise Crash

    if where == "mid-redo":
        monkeypatch.setattr(recovery, "apply_undo", crashing_apply)
    else:
        monkeypatch.setattr(recovery.RedoLog, "pop", crashing_pop)
    with pytest.raises(Crash):
        move(sim.journal, sim.replica, fo, fo.latest)
    monkeypatch.undo()
    j, rep = restart(sim)
    saved = FailoverState.load(j.dir)
    assert saved is not None and saved.at == pts[2] and saved.step is not None
    recovery.resume(j, rep, saved)
    assert saved.at == pts[-3] and sim.read_replica() == sim.image_at(pts[-3])
    move(j, rep, saved, saved.latest)
    assert sim.read_replica() == final
    move(j, rep, saved, pts[1])
    assert sim.read_replica() == sim.image_at(pts[1])
    sim.close()


def test_redo_log_reopens_cuts_a_torn_tail_and_refuses_damage(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 125)
    sim.run(3)
    j = sim.journal
    redo = RedoLog(j)
    image = bytearray(random.Random(3).randbytes(1 << 20))

    def read(off: int, n: int) -> bytes:
        return bytes(image[off : off + n])

    redo.push(9, 5, [[(0, 4096)], [(8192, 4096), (65536, 512)]], read)
    redo.push(5, 2, [[(4096, 4096)]], read)
    redo.push(2, 1, [], read)
    again = RedoLog(j)
    assert [(m.src, m.dst, m.parts, m.complete) for m in again.moves] == [(9, 5, 2, True), (5, 2, 1, True),
                                                                          (2, 1, 0, True)]
    recs = list(again.read(again.moves[0]))
    assert [r.lengths for r in recs] == [(4096,), (4096, 512)]
    assert recs[1].extents[1] == (65536, read(65536, 512))
    again.pop()
    assert [m.dst for m in RedoLog(j).moves] == [5, 2]
    size = redo.path.stat().st_size
    os.truncate(redo.path, size - 3)
    torn = RedoLog(j)
    assert [m.dst for m in torn.moves] == [5, 2] and not torn.moves[-1].complete
    torn.drop_incomplete()
    assert [m.dst for m in RedoLog(j).moves] == [5]
    data = bytearray(redo.path.read_bytes())
    data[40] ^= 1  # inside the first MOVE record
    redo.path.write_bytes(bytes(data))
    with pytest.raises(JournalError):
        RedoLog(j)
    torn.remove()
    assert not redo.path.exists() and not torn.moves
    sim.close()


def test_commit_discards_newer_history_and_the_way_forward(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 130, seg_max=32 << 10)
    sim.run(80, idle_rate=0.0)
    j = sim.journal
    fo = begin_failover(sim)
    latest = fo.latest
    pts = points(sim)
    target = pts[len(pts) // 3]
    move(j, sim.replica, fo, pts[len(pts) // 2])
    move(j, sim.replica, fo, pts[-2])
    move(j, sim.replica, fo, target)
    commit(j, fo)
    assert not (j.dir / "redo.jrn").exists()
    saved = FailoverState.load(j.dir)
    assert saved is not None and saved.committed
    assert (saved.latest, saved.at, saved.target) == (target, target, target)
    assert sim.read_replica() == sim.image_at(target)
    sim.applied = [a for a in sim.applied if a.last <= target]
    sim.image = sim.image_at(target)
    assert [g.last for g in j.groups] == [a.last for a in sim.applied]
    check_files(j)
    sim.reopen()
    check_model(sim)
    check_restorable(sim)  # older points are still there, from the committed state
    with pytest.raises(JournalError):
        move(sim.journal, sim.replica, saved, latest)
    sim.close()


# -- test failover --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["raw", "vmdk-sparse"])
def test_copy_then_undo_gives_each_point(tmp_path: Path, kind: str) -> None:
    sim = Sim(tmp_path / "sim", 140, kind=kind)
    sim.run(60, idle_rate=0.1)
    final = sim.read_replica()
    rng = random.Random(140)
    for i, p in enumerate(sorted(rng.sample(points(sim), 4)) + [sim.journal.last_seq]):
        dest = recovery.test_failover_path(str(sim.replica.path), kind, 0, tmp_path / f"copy{i}")
        dest.parent.mkdir()
        out = copy_replica(sim.replica, kind, dest, sim.replica.read)
        assert out.format == kind and dest.exists()
        undo_into(sim.journal, sim.journal.groups_after(p), out)
        assert out.read(0, sim.size) == sim.image_at(p)
        out.close()
    assert sim.read_replica() == final  # the source is untouched
    sim.close()


def test_groups_applied_after_the_copy_are_undone_too(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "sim", 141)
    sim.run(40)
    p = points(sim)[10]
    out = copy_replica(sim.replica, "raw", tmp_path / "copy.img", sim.replica.read)
    sim.run(25)  # replication goes on before the undo records are applied
    groups = sim.journal.groups_after(p)  # the groups list as it is then
    undo_into(sim.journal, groups, out)
    assert out.read(0, sim.size) == sim.image_at(p)
    out.close()
    sim.close()


def test_copy_taken_in_the_middle_of_a_group(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "sim", 142)
    sim.run(30)
    p = points(sim)[-3]
    writes = sim.random_writes(at_least=4)
    first, last = sim.begin(writes)
    sim.write(writes[:2])
    out = copy_replica(sim.replica, "raw", tmp_path / "copy.img", sim.replica.read)
    sim.write(writes[2:])
    sim.end(first, last, writes, kind="point")
    sim.run(3)
    undo_into(sim.journal, sim.journal.groups_after(p), out)
    assert out.read(0, sim.size) == sim.image_at(p)
    out.close()
    sim.close()


def test_copy_through_read_locked_while_groups_are_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kinds that are not one flat file copy chunk by chunk; replication runs between the chunks."""
    monkeypatch.setattr(recovery, "COPY_CHUNK", 64 << 10)
    sim = Sim(tmp_path / "sim", 143, kind="vmdk-sparse")
    sim.run(30)
    p = points(sim)[-2]
    chunks = 0

    def read_locked(off: int, n: int) -> bytes:
        nonlocal chunks
        chunks += 1
        if chunks % 2:
            sim.group()
        return sim.replica.read(off, n)

    out = copy_replica(sim.replica, "vmdk-sparse", tmp_path / "copy.vmdk", read_locked)
    assert chunks == sim.size // (64 << 10)
    undo_into(sim.journal, sim.journal.groups_after(p), out)
    assert out.read(0, sim.size) == sim.image_at(p)
    out.close()
    sim.close()


def test_copy_failure_removes_the_copy_and_never_an_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recovery, "COPY_CHUNK", 64 << 10)
    sim = Sim(tmp_path / "sim", 144, kind="vmdk-sparse")
    sim.run(3)

    def failing(off: int, n: int) -> bytes:
        if off:
            raise OSError(5, "I/O error")
        return sim.replica.read(off, n)

    dest = tmp_path / "copy.vmdk"
    with pytest.raises(OSError):
        copy_replica(sim.replica, "vmdk-sparse", dest, failing)
    assert not dest.exists()
    existing = tmp_path / "taken.img"
    existing.write_bytes(b"keep me")
    with pytest.raises(ReplicaError):
        copy_replica(sim.replica, "raw", existing, sim.replica.read)
    assert existing.read_bytes() == b"keep me"
    sim.close()


def test_test_failover_path() -> None:
    f = recovery.test_failover_path
    assert f("/r/web-disk0.img", "raw", 0, None) == Path("/r/web-disk0-test.img")
    assert f("/r/web.vmdk", "vmdk", 1, None) == Path("/r/web-test.vmdk")
    assert f("/r/web.vmdk", "vmdk-sparse", 1, Path("/t")) == Path("/t/web-test.vmdk")
    assert f("/dev/sdb", "device", 2, Path("/t")) == Path("/t/test-failover-disk2.img")
    assert f("/r/noext", "raw", 0, None) == Path("/r/noext-test")


# -- groups larger than the frame limit (issue 9, finding 2) ---------------------------------------------
def big_sim(tmp_path: Path, size: int = 96 << 20) -> Sim:
    """A disk whose groups overwrite tens of MiB of incompressible contents at once (a file copy, fio bs=4M):
    the old contents of one group are more than one journal record can hold."""
    sim = Sim(tmp_path, 9, size=size, seg_max=64 << 20)
    return sim


def random_span(sim: Sim, n: int) -> list[tuple[int, bytes | None, int]]:
    off = sim.rng.randrange(0, (sim.size - n) // 4096 + 1) * 4096
    return [(off, os.urandom(n), n)]


def test_a_group_over_the_frame_limit_is_journaled_in_parts_restored_and_rolled_back(tmp_path: Path) -> None:
    from standby.mastertarget.journal import UNDO_PART
    from standby.proto.frames import MAX_PAYLOAD, scan_records

    sim = big_sim(tmp_path)
    sim.group(random_span(sim, 80 << 20), kind="point")  # old contents: zeros (cheap)
    sim.group(random_span(sim, 72 << 20), kind="point")  # old contents: mostly incompressible
    sim.group(random_span(sim, 40 << 20) + random_span(sim, 30 << 20), kind="point")
    g = list(sim.journal.groups)[-1]
    assert len(g.parts) >= 3, g.parts  # > 64 MiB of old contents: several records
    for seg in sim.journal.segments:
        records, _, problem = scan_records(seg.path.read_bytes())
        assert problem is None
        assert all(r.end - r.offset <= MAX_PAYLOAD for r in records)
    assert max(n for grp in sim.journal.groups for _, n in grp.parts) <= UNDO_PART + (1 << 20)
    check_restorable(sim)
    # A crash after the parts were synced and half of the replica was written: start-up rolls back all parts.
    before = sim.read_replica()
    writes = random_span(sim, 48 << 20)
    first = sim.next_seq
    sim.journal.write_undo_ranges(first, 2, [(o, n) for o, _, n in writes], sim.replica.read)
    off, data, n = writes[0]
    assert data is not None
    sim.replica.write(off, data[: n // 2])
    sim.replica.sync()
    sim.journal.close()
    j = sim.new_journal()
    pending = j.open()
    assert pending is not None and len(pending.records) >= 3
    j.rollback_pending(pending, sim_writer(sim), sim.replica.sync)
    assert sim.read_replica() == before
    j.close()
    sim.journal = sim.new_journal()
    assert sim.journal.open() is None
    check_restorable(sim)
    sim.close()


def sim_writer(sim: Sim) -> Writer:
    def write(off: int, data: bytes | None, n: int) -> None:
        if data is None:
            sim.replica.write_zeroes(off, n)
        else:
            sim.replica.write(off, data)

    return write


def test_failover_over_more_than_the_frame_limit_and_forward_again(tmp_path: Path) -> None:
    """Rolling back tens of MiB of distinct incompressible blocks makes redo steps larger than one record
    (the failover hung on 47f798a: a REDO record over the frame limit)."""
    from standby.proto.frames import MAX_PAYLOAD, scan_records

    sim = big_sim(tmp_path)
    sim.group(random_span(sim, 64 << 20), kind="point")
    p0 = sim.journal.last_seq
    for _ in range(3):
        sim.group(random_span(sim, 40 << 20), kind="point")
    final = sim.read_replica()
    fo = begin_failover(sim)
    move(sim.journal, sim.replica, fo, p0)
    assert sim.read_replica() == sim.image_at(p0)
    records, _, problem = scan_records((sim.journal.dir / "redo.jrn").read_bytes())
    assert problem is None and len(records) > 3
    assert all(r.end - r.offset <= MAX_PAYLOAD for r in records)
    move(sim.journal, sim.replica, fo, fo.latest)
    assert sim.read_replica() == final
    sim.close()


def test_a_read_error_while_redo_is_read_ahead_leaves_the_replica_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error reading the replica's current contents in a REDO reader thread, chunks ahead of the one
    being sealed: the move fails before anything is written to the replica, the incomplete step is dropped
    at start-up, and the step is taken again whole."""
    sim = big_sim(tmp_path)
    sim.group(random_span(sim, 40 << 20), kind="point")
    p0 = sim.journal.last_seq
    sim.group(random_span(sim, 40 << 20), kind="point")
    sim.group(random_span(sim, 40 << 20), kind="point")
    final = sim.read_replica()
    fo = begin_failover(sim)
    real_read, reads = sim.replica.read, 0

    def failing_read(offset: int, length: int) -> bytes:
        nonlocal reads
        reads += 1
        if reads == 3:  # 8 MiB pieces, 16 MiB chunks: the first two chunks are being read at once
            raise OSError(5, "Input/output error")
        return real_read(offset, length)

    monkeypatch.setattr(sim.replica, "read", failing_read)
    with pytest.raises(OSError):
        move(sim.journal, sim.replica, fo, p0)
    monkeypatch.undo()
    assert reads >= 3 and sim.read_replica() == final
    j, rep = restart(sim)
    saved = FailoverState.load(j.dir)
    assert saved is not None and saved.step == {"op": recovery.UNDO_STEP, "src": fo.latest, "dst": p0}
    recovery.resume(j, rep, saved)
    assert sim.read_replica() == sim.image_at(p0)
    move(j, rep, saved, saved.latest)
    assert sim.read_replica() == final
    sim.close()


def test_an_undo_that_cannot_be_written_is_discarded_and_the_group_retried(tmp_path: Path, monkeypatch) -> None:
    """A full retention volume in the middle of a group's UNDO parts (found by the small-volume fault
    test): the parts written so far are cut off and the group can be journaled again, instead of every
    retry failing with 'undo while the undo is open'."""
    from standby.mastertarget import journal

    sim = big_sim(tmp_path, size=64 << 20)
    sim.group(random_span(sim, 8 << 20), kind="point")
    writes = random_span(sim, 40 << 20)
    ranges = [(o, n) for o, _, n in writes]
    real = journal.encode_undo
    calls = {"n": 0}

    def failing(*a, **k):  # the third part finds the volume full
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(journal, "encode_undo", failing)
    size_before = sim.journal.bytes
    with pytest.raises(OSError):
        sim.journal.write_undo_ranges(sim.next_seq, 2, ranges, sim.replica.read)
    sim.journal.discard_undo()
    assert sim.journal.bytes == size_before
    monkeypatch.setattr(journal, "encode_undo", real)
    first = sim.next_seq
    sim.journal.write_undo_ranges(first, 2, ranges, sim.replica.read)  # tried again: works
    sim.write(writes)
    sim.end(first, first, writes, kind="point")
    check_restorable(sim)
    sim.close()


def test_making_room_drops_the_oldest_points_first_and_all_history_as_a_last_resort(tmp_path: Path) -> None:
    """The retention volume needs room for the next group: oldest points go first (whole segments, never
    the newest point); when the churn after the newest point alone fills it, all history goes and
    replication goes on."""
    from types import SimpleNamespace

    from standby.mastertarget.disk import RetentionMarks
    from standby.mastertarget.upkeep import drop_history, drop_oldest, oldest_droppable

    sim = Sim(tmp_path, 5, seg_max=16 << 10)
    for _ in range(30):
        sim.group(kind="point")
    w = SimpleNamespace(journal=sim.journal, state=SimpleNamespace(machine="m", name="d"), retention=RetentionMarks())
    pts = [g.last for g in sim.journal.points()]
    found = oldest_droppable(w)
    assert found is not None
    before = sim.journal.bytes
    freed = drop_oldest(w, found[1])
    after = [g.last for g in sim.journal.points()]
    assert freed == before - sim.journal.bytes > 0
    assert after == pts[len(pts) - len(after):] and len(after) < len(pts)  # the oldest went, the newest stayed
    assert "removed the" in w.retention.alert
    check_restorable(sim)
    while (found := oldest_droppable(w)) is not None:
        drop_oldest(w, found[1])
    assert [g.last for g in sim.journal.points()][-1] == pts[-1]  # never the newest point
    for _ in range(20):  # a long stretch of groups without a point after the newest one
        sim.group(kind="batch")
    assert drop_history(w) > 0 and sim.journal.bytes == 0 and sim.journal.points() == []
    assert "all history of the disk was removed" in w.retention.alert
    sim.group(kind="point")  # history starts again
    assert len(sim.journal.points()) == 1
    sim.close()


def test_ahead_yields_in_order_and_raises_where_an_item_fails() -> None:
    """The rollback's read-ahead: results in the order of the items, an error at its own item."""
    assert list(recovery.ahead(lambda x: x * x, list(range(20)), depth=3)) == [x * x for x in range(20)]
    assert list(recovery.ahead(lambda x: x, [])) == []

    def fail_at_5(x: int) -> int:
        if x == 5:
            raise JournalError("damaged")
        return x

    got: list[int] = []
    with pytest.raises(JournalError):
        for x in recovery.ahead(fail_at_5, list(range(10)), depth=4):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
