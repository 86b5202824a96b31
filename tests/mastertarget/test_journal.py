"""The retention journal's files (standby.mastertarget.journal): write order, reopening, rollback of an
open group, torn tails and corruption, abort, rotation, pruning, truncation, retention figures.

A simulated apply loop drives it the way the master target does: for each group of random writes, the
old contents go to the journal (`write_undo`, synced) before the replica is written, the replica is
synced, then the END is written. The model keeps a digest of the image after every group and the
writes themselves, so the image at any group boundary can be rebuilt exactly.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import xxhash

from standby.mastertarget.journal import (
    SEGMENT_MAX,
    UNDO_PART,
    DiskJournal,
    apply_undo,
    merge_ranges,
    old_contents,
    undo_parts,
)
from standby.mastertarget.journal_codec import GROUP_END_TYPE, UNDO_TYPE, JournalError, scan
from standby.mastertarget.replicas import Replica, create_replica
from standby.proto.enums import Consistency
from standby.proto.frames import HEADER_SIZE

KEY = bytes(range(32))
UID = b"hist-disk-uid-01"
DISK = 3
GEN = 2
BLOCK = 4096
SIZE = 1 << 20
T0 = 1_800_000_000.0

Write = tuple[int, bytes | None, int]  # (offset, data or None for zeros, length)
Writer = Callable[[int, bytes | None, int], None]


def digest(buf: bytes | bytearray) -> bytes:
    return xxhash.xxh3_128_digest(buf)


def put(buf: bytearray, off: int, data: bytes | None, n: int) -> None:
    if data is not None:
        assert len(data) == n
    buf[off : off + n] = data if data is not None else bytes(n)


def buffer_writer(buf: bytearray) -> Writer:
    def write(off: int, data: bytes | None, n: int) -> None:
        put(buf, off, data, n)

    return write


def replica_writer(rep: Replica) -> Writer:
    def write(off: int, data: bytes | None, n: int) -> None:
        if data is None:
            rep.write_zeroes(off, n)
        else:
            assert len(data) == n
            rep.write(off, data)

    return write


@dataclass
class Applied:
    first: int
    last: int
    kind: str
    writes: list[Write]
    digest: bytes  # of the image after this group


class Sim:
    """A replica, its journal and the model of what the image is after every group."""

    def __init__(
        self, root: Path, seed: int, size: int = SIZE, kind: str = "raw", seg_max: int = SEGMENT_MAX
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.seg_max = seg_max
        self.root = root
        self.rng = random.Random(seed)
        self.size = size
        name = "disk.img" if kind == "raw" else "disk.vmdk"
        self.replica = create_replica(kind, root / name, size)
        self.jdir = root / "retention" / "disk-uid"
        self.journal = self.new_journal()
        assert self.journal.open() is None
        self.image = bytearray(size)
        self.base = digest(self.image)
        self.applied: list[Applied] = []
        self.next_seq = 1
        self.clock = T0

    def new_journal(self, directory: Path | None = None) -> DiskJournal:
        return DiskJournal(directory or self.jdir, DISK, KEY, UID, segment_max=self.seg_max)

    def random_writes(self, at_least: int = 1) -> list[Write]:
        out: list[Write] = []
        for _ in range(self.rng.randint(at_least, max(at_least, 4))):
            n = self.rng.randint(1, 16) * BLOCK
            off = self.rng.randrange(0, (self.size - n) // BLOCK + 1) * BLOCK
            r = self.rng.random()
            if r < 0.2:
                out.append((off, None, n))
            elif r < 0.35:
                out.append((off, bytes([self.rng.randrange(1, 256)]) * n, n))  # compressible
            else:
                out.append((off, self.rng.randbytes(n), n))
        return out

    def begin(self, writes: list[Write]) -> tuple[int, int]:
        """The UNDO of a new group (nothing for an idle one): what the master target writes first."""
        first = self.next_seq
        last = first + self.rng.randrange(3)
        if writes:
            self.journal.write_undo(first, GEN, old_contents(self.replica.read, [(o, n) for o, _, n in writes]))
        return first, last

    def write(self, writes: list[Write]) -> None:
        for off, data, n in writes:
            if data is None:
                self.replica.write_zeroes(off, n)
            else:
                self.replica.write(off, data)

    def group(
        self, writes: list[Write] | None = None, *, idle: bool = False, kind: str | None = None,
        consistency: str | None = None,
    ) -> Applied:
        if writes is None:
            writes = [] if idle else self.random_writes()
        first, last = self.begin(writes)
        self.write(writes)
        return self.end(first, last, writes, kind=kind, consistency=consistency)

    def end(
        self, first: int, last: int, writes: list[Write], *, kind: str | None = None, consistency: str | None = None
    ) -> Applied:
        """The end of a group begun with `begin` and written (all of `writes`): sync, END, model."""
        kind = kind or ("point" if self.rng.random() < 0.75 else "batch")
        self.replica.sync()
        self.clock += self.rng.uniform(0.5, 30.0)
        cons = consistency or (Consistency.APP if self.rng.random() < 0.2 else Consistency.CRASH)
        meta = {"generation": GEN, "kind": kind, "time": self.clock, "consistency": cons, "tag": f"t{last}"}
        g = self.journal.end_group(first, last, meta)
        assert (g.first, g.last) == (first, last)
        for w in writes:
            put(self.image, *w)
        a = Applied(first, last, kind, writes, digest(self.image))
        self.applied.append(a)
        self.next_seq = last + 1
        return a

    def run(self, n: int, idle_rate: float = 0.1) -> None:
        for _ in range(n):
            self.group(idle=self.rng.random() < idle_rate)

    def image_at(self, seq: int) -> bytearray:
        buf = bytearray(self.size)
        for a in self.applied:
            if a.last > seq:
                break
            for w in a.writes:
                put(buf, *w)
        return buf

    def digest_at(self, seq: int) -> bytes:
        d = self.base
        for a in self.applied:
            if a.last > seq:
                break
            d = a.digest
        return d

    def read_replica(self, rep: Replica | None = None) -> bytes:
        return (rep or self.replica).read(0, self.size)

    def forget_after(self, seq: int) -> None:
        """The model of a committed failover to `seq`: the replica holds that state, newer groups are gone."""
        self.applied = [a for a in self.applied if a.last <= seq]
        self.image = self.image_at(seq)
        self.replica.write(0, bytes(self.image))
        self.replica.sync()
        self.next_seq = seq + 1

    def reopen(self) -> DiskJournal:
        self.journal.close()
        self.journal = self.new_journal()
        assert self.journal.open() is None
        return self.journal

    def close(self) -> None:
        self.journal.close()
        self.replica.close()


def snapshot(j: DiskJournal) -> tuple[list[tuple[Any, ...]], list[tuple[Path, int]]]:
    groups = [(g.first, g.last, g.meta, g.segment, g.undo_at, g.undo_bytes) for g in j.groups]
    return groups, [(s.path, s.size) for s in j.segments]


def check_files(j: DiskJournal) -> None:
    """The segment files on disk are exactly the journal's, at the sizes it believes."""
    assert sorted(j.dir.glob("seg-*.jrn")) == [s.path for s in j.segments]
    assert [s.path.stat().st_size for s in j.segments] == [s.size for s in j.segments]
    assert j.bytes == sum(s.path.stat().st_size for s in j.segments)


def check_model(sim: Sim, j: DiskJournal | None = None) -> None:
    """The journal lists exactly the model's groups (oldest ones may have been pruned)."""
    j = j or sim.journal
    got = [(g.first, g.last, g.meta["kind"], g.undo_at >= 0) for g in j.groups]
    want = [(a.first, a.last, a.kind, bool(a.writes)) for a in sim.applied]
    assert got == want[len(want) - len(got) :]
    assert j.last_seq == (sim.applied[-1].last if sim.applied else 0)


def check_restorable(sim: Sim, j: DiskJournal | None = None) -> int:
    """From the replica's contents, undo the journal's groups newest first: after each, the image is the
    model's at the previous group boundary. Returns how many boundaries were checked."""
    j = j or sim.journal
    buf = bytearray(sim.read_replica())
    assert buf == sim.image
    groups = list(j.groups)
    write = buffer_writer(buf)
    for i in range(len(groups) - 1, -1, -1):
        g = groups[i]
        rec = j.read_undo(g)
        if rec is not None:
            assert rec.sequence == g.first and rec.generation == GEN
            apply_undo(rec, write)
        prev = groups[i - 1].last if i else g.first - 1
        assert digest(buf) == sim.digest_at(prev), f"state after {prev} is wrong"
    return len(groups)


def fresh_replica(path: Path, data: bytes) -> Replica:
    rep = create_replica("raw", path, len(data))
    rep.write(0, data)
    rep.sync()
    return rep


def records(path: Path) -> list[tuple[int, int, int, int]]:
    """(type, sequence, offset, end) of every record of a segment file."""
    s = scan(path.read_bytes())
    assert s.problem is None and not s.torn
    ends = [*s.offsets[1:], s.good_end]
    return [(t, seq, at, end) for (t, _, seq, _), at, end in zip(s.records, s.offsets, ends, strict=True)]


# -- pure helpers ---------------------------------------------------------------------------------------
def test_merge_ranges_examples() -> None:
    assert merge_ranges([]) == []
    assert merge_ranges([(10, 5), (0, 4)]) == [(0, 4), (10, 5)]
    assert merge_ranges([(0, 10), (10, 5)]) == [(0, 15)]  # touching ranges merge
    assert merge_ranges([(0, 10), (2, 3)]) == [(0, 10)]  # contained
    assert merge_ranges([(5, 10), (0, 6), (14, 1)]) == [(0, 15)]
    assert merge_ranges([(0, 10)], piece=4) == [(0, 4), (4, 4), (8, 2)]
    assert merge_ranges([(0, 0), (3, 2)]) == [(3, 2)]


@pytest.mark.parametrize("seed", range(20))
def test_merge_ranges_is_the_union(seed: int) -> None:
    rng = random.Random(seed)
    ranges = [(rng.randrange(0, 300), rng.randrange(0, 40)) for _ in range(rng.randrange(0, 30))]
    piece = rng.choice([7, 16, 1000])
    out = merge_ranges(ranges, piece)
    covered = {x for a, n in ranges for x in range(a, a + n)}
    got = [x for a, n in out for x in range(a, a + n)]
    assert got == sorted(covered)  # sorted, each byte once
    assert all(0 < n <= piece for _, n in out)
    for (a, n), (b, _) in zip(out, out[1:], strict=False):
        assert a + n <= b
        if a + n == b:
            assert n == piece  # only split pieces touch


def test_old_contents_reads_each_byte_once() -> None:
    disk = bytes(range(256)) * 64
    calls: list[tuple[int, int]] = []

    def read(off: int, n: int) -> bytes:
        calls.append((off, n))
        return disk[off : off + n]

    out = old_contents(read, [(4096, 4096), (0, 8192), (12288, 512)])
    assert out == [(0, disk[0:8192]), (12288, disk[12288:12800])]
    assert calls == [(0, 8192), (12288, 512)]


def test_undo_parts_cut_at_the_limit() -> None:
    assert undo_parts([]) == []
    assert undo_parts([(0, 4), (10, 4), (20, 4)], limit=8) == [[(0, 4), (10, 4)], [(20, 4)]]
    assert undo_parts([(0, 9), (10, 1)], limit=8) == [[(0, 9)], [(10, 1)]]  # a piece over the limit stays whole
    assert undo_parts([(0, 3), (5, 3), (9, 2)], limit=8) == [[(0, 3), (5, 3), (9, 2)]]  # up to the limit
    assert undo_parts([(0, 3), (5, 3), (9, 3)], limit=8) == [[(0, 3), (5, 3)], [(9, 3)]]


def test_old_contents_are_prefetched_a_part_at_a_time_and_journaled_as_read(tmp_path: Path) -> None:
    """write_undo_ranges asks the replica for each UNDO part's ranges at once before reading them one by
    one, and for the next part's only once this part's are read (while it is sealed); what it journals
    is the old contents whatever the advice did."""
    size = 2 * UNDO_PART + (8 << 20)
    rep = create_replica("raw", tmp_path / "replica.img", size)
    rng = random.Random(5)
    image = bytearray(size)
    for off in range(0, size, 4 << 20):  # random, text and zeros, so that runs are sealed and skipped
        kind = (off >> 22) % 3
        data = rng.randbytes(4 << 20) if kind == 0 else (b"old line %d\n" % off) * ((4 << 20) // 16)
        data = data[: 4 << 20] if kind != 2 else bytes(4 << 20)
        image[off : off + len(data)] = data
        rep.write(off, data)
    rep.sync()
    ranges = [(rng.randrange(0, (size >> 12) - 16) << 12, rng.randint(1, 16) << 12) for _ in range(3000)]
    events: list[tuple[Any, ...]] = []

    def read(off: int, n: int) -> bytes:
        events.append(("read", off, n))
        return rep.read(off, n)

    def prefetch(rs: list[tuple[int, int]]) -> None:
        events.append(("prefetch", list(rs)))
        rep.prefetch(rs)

    j = DiskJournal(tmp_path / "journal", DISK, KEY, UID)
    assert j.open() is None
    j.write_undo_ranges(7, GEN, ranges, read, prefetch)
    g = j.end_group(7, 7, {"generation": GEN, "kind": "batch"})
    parts = undo_parts(merge_ranges(ranges))
    assert len(parts) >= 2 and len(g.parts) == len(parts)
    assert events == [e for part in parts for e in [("prefetch", part), *(("read", a, n) for a, n in part)]]
    rec = j.read_undo(g)
    assert rec is not None
    got = bytearray(size)
    apply_undo(rec, buffer_writer(got))
    for a, n in merge_ranges(ranges):
        assert got[a : a + n] == image[a : a + n]
    j.close()
    rep.close()


# -- reopening and restoring ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reopen_lists_the_same_groups_and_every_boundary_restores(
    tmp_path: Path, seed: int
) -> None:
    sim = Sim(tmp_path, seed, seg_max=48 << 10)
    sim.run(250)
    j = sim.journal
    assert len(j.segments) > 5, "small SEGMENT_MAX must force rotation"
    check_model(sim)
    check_files(j)
    before = snapshot(j)
    figures = (j.points(), j.retention_points(), j.history_bytes(), j.bytes, j.last_seq)
    j2 = sim.reopen()
    assert snapshot(j2) == before
    assert (j2.points(), j2.retention_points(), j2.history_bytes(), j2.bytes, j2.last_seq) == figures
    assert check_restorable(sim, j2) == 250
    # Appending after a reopen goes on in the same files, and everything stays restorable.
    sim.run(30)
    check_model(sim)
    check_files(sim.journal)
    j3 = sim.reopen()
    assert snapshot(j3) == snapshot(sim.journal)
    assert check_restorable(sim) == 280
    sim.close()


@pytest.mark.parametrize("seg_max", [1, 20_000])
def test_segments_rotate_only_at_group_boundaries(tmp_path: Path, seg_max: int) -> None:
    sim = Sim(tmp_path, 7, seg_max=seg_max)
    sim.run(120, idle_rate=0.2)
    j = sim.journal
    if seg_max == 1:
        assert len(j.segments) == 120
    for n, seg in enumerate(j.segments):
        recs = records(seg.path)
        assert recs, "no segment file is left empty"
        assert int(seg.path.stem[4:]) == seg.groups[0].first
        if n < len(j.segments) - 1:
            assert seg.size >= seg_max
        # Every UNDO is followed by its group's END in the same file.
        it = iter(recs)
        for g in seg.groups:
            t, seq, at, end = next(it)
            if g.undo_at >= 0:
                assert (t, seq, at, end - at) == (UNDO_TYPE, g.first, g.undo_at, g.undo_bytes)
                t, seq, at, end = next(it)
            assert (t, seq) == (GROUP_END_TYPE, g.last)
        assert next(it, None) is None
    check_restorable(sim)
    sim.close()


def test_points_are_the_point_groups(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 11)
    sim.group(kind="point", consistency=Consistency.APP)
    sim.group(kind="batch")
    sim.group(idle=True, kind="point")
    j = sim.journal
    assert [g.last for g in j.points()] == [sim.applied[0].last, sim.applied[2].last]
    p = j.find_point(sim.applied[0].last)
    assert p is not None and p.consistency == Consistency.APP and p.is_point and p.time == p.meta["time"]
    assert j.find_point(sim.applied[1].last) is None  # a batch group is not a point
    assert j.groups_after(sim.applied[0].last) == list(j.groups)[1:]
    sim.close()


def test_journal_of_another_disk_or_key_is_refused(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 12)
    sim.run(5, idle_rate=0)
    sim.journal.close()
    with pytest.raises(JournalError, match="record of disk"):
        DiskJournal(sim.jdir, DISK + 1, KEY, UID).open()
    other = DiskJournal(sim.jdir, DISK, bytes(32), UID)
    assert other.open() is None
    with pytest.raises(JournalError):
        other.read_undo(next(other.groups))
    sim.replica.close()


# -- crashes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seg_max", [1, 64 << 20])
@pytest.mark.parametrize("how", ["undo-only", "some-writes", "torn-write", "all-writes-synced"])
def test_crash_mid_group_rolls_back(tmp_path: Path, seg_max: int, how: str) -> None:
    sim = Sim(tmp_path, seg_max % 1000 + len(how), seg_max=seg_max)
    sim.run(25)
    before = bytes(sim.image)
    prev_last = sim.journal.last_seq
    groups_before = snapshot(sim.journal)[0]
    writes = sim.random_writes(at_least=3)
    first, _ = sim.begin(writes)
    if how == "some-writes":
        sim.write(writes[:2])
    elif how == "torn-write":
        off, data, n = writes[1]
        sim.write(writes[:1])
        half = n // 2
        if data is None:
            sim.replica.write_zeroes(off, half)
        else:
            sim.replica.write(off, data[:half])
    elif how == "all-writes-synced":
        sim.write(writes)
        sim.replica.sync()
    assert sim.read_replica() != before or how == "undo-only" or not writes
    sim.journal.close()  # the process dies: no END

    j = sim.new_journal()
    pending = j.open()
    assert pending is not None
    assert pending.record.sequence == first and pending.segment == j.segments[-1].path
    assert snapshot(j)[0] == groups_before and j.last_seq == prev_last
    j.rollback_pending(pending, replica_writer(sim.replica), sim.replica.sync)
    assert sim.read_replica() == before
    check_files(j)
    sim.journal = j
    # The journal now ends at the previous group's end: a new start finds nothing to roll back.
    j2 = sim.reopen()
    assert snapshot(j2)[0] == groups_before and j2.last_seq == prev_last
    # Applying goes on (the process server resends from the same sequence).
    sim.run(10)
    check_model(sim)
    sim.reopen()
    check_files(sim.journal)
    check_restorable(sim)
    sim.close()


def test_rollback_is_idempotent(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 21)
    sim.run(5)
    before = bytes(sim.image)
    writes = sim.random_writes(at_least=2)
    sim.begin(writes)
    sim.write(writes)
    sim.journal.close()
    j = sim.new_journal()
    pending = j.open()
    assert pending is not None
    apply_undo(pending.record, replica_writer(sim.replica))  # a first rollback, cut short by a crash
    # (the journal was not truncated yet)
    j = sim.new_journal()
    pending2 = j.open()
    assert pending2 is not None and pending2.offset == pending.offset
    j.rollback_pending(pending2, replica_writer(sim.replica), sim.replica.sync)
    assert sim.read_replica() == before
    sim.journal = j
    sim.reopen()
    check_restorable(sim)
    sim.close()


def _copy_journal(sim: Sim, dest: Path) -> Path:
    shutil.copytree(sim.jdir, dest)
    return dest


@pytest.mark.parametrize("seg_max", [1, 64 << 20])
def test_torn_tail_is_cut_off(tmp_path: Path, seg_max: int) -> None:
    sim = Sim(tmp_path / "sim", 31, seg_max=seg_max)
    sim.run(12)
    before_last = sim.journal.last_seq
    before_image = bytes(sim.image)
    groups_before = snapshot(sim.journal)[0]
    last = sim.group(sim.random_writes(at_least=2), kind="point")
    sim.journal.close()
    seg = sim.journal.segments[-1].path
    recs = records(seg)
    (ut, useq, u, _), (ct, cseq, c, end) = recs[-2:]
    assert (ut, useq, ct, cseq) == (UNDO_TYPE, last.first, GROUP_END_TYPE, last.last)
    final = sim.read_replica()

    # Cut inside (or exactly before) the END: the group's UNDO is pending, and rolls back.
    for i, cut in enumerate([end - 1, end - 5, c + HEADER_SIZE + 1, c + HEADER_SIZE, c + 7, c + 1, c]):
        d = _copy_journal(sim, tmp_path / f"c{i}")
        os.truncate(d / seg.name, cut)
        j = sim.new_journal(d)
        pending = j.open()
        assert pending is not None, f"cut at {cut}"
        assert pending.record.sequence == last.first and pending.offset == u
        assert (d / seg.name).stat().st_size == c
        rep = fresh_replica(tmp_path / f"c{i}.img", final)
        j.rollback_pending(pending, replica_writer(rep), rep.sync)
        assert rep.read(0, sim.size) == before_image
        assert (d / seg.name).stat().st_size == u
        j.close()
        j2 = sim.new_journal(d)
        assert j2.open() is None
        assert [x[:2] for x in snapshot(j2)[0]] == [x[:2] for x in groups_before]
        assert j2.last_seq == before_last
        rep.close()

    # Cut inside the UNDO (the crash came before the replica was written): just cut off, nothing pending.
    for i, cut in enumerate([c - 1, c - 20, u + HEADER_SIZE + 3, u + HEADER_SIZE, u + 5, u]):
        d = _copy_journal(sim, tmp_path / f"u{i}")
        os.truncate(d / seg.name, cut)
        j = sim.new_journal(d)
        assert j.open() is None, f"cut at {cut}"
        assert (d / seg.name).stat().st_size == u
        assert j.last_seq == before_last
        assert [x[:2] for x in snapshot(j)[0]] == [x[:2] for x in groups_before]
        check_files(j)
        j.close()
    sim.replica.close()


def test_torn_idle_group_end_is_cut_off(tmp_path: Path) -> None:
    sim = Sim(tmp_path / "sim", 32)
    sim.run(6)
    prev = sim.journal.last_seq
    sim.group(idle=True, kind="point")
    sim.journal.close()
    seg = sim.journal.segments[-1].path
    _, _, c, end = records(seg)[-1]
    for i, cut in enumerate([end - 1, c + HEADER_SIZE - 1, c + 3]):
        d = _copy_journal(sim, tmp_path / f"i{i}")
        os.truncate(d / seg.name, cut)
        j = sim.new_journal(d)
        assert j.open() is None
        assert j.last_seq == prev and (d / seg.name).stat().st_size == c
        j.close()
    sim.replica.close()


@pytest.mark.parametrize("where", ["header", "payload", "last-byte"])
def test_corruption_before_the_tail_is_refused(tmp_path: Path, where: str) -> None:
    sim = Sim(tmp_path / "sim", 41, seg_max=24 << 10)
    sim.run(40, idle_rate=0.2)
    sim.journal.close()
    segs = [s.path for s in sim.journal.segments]
    assert len(segs) >= 3
    targets: list[tuple[Path, int, int]] = []
    for path in (segs[0], segs[len(segs) // 2], segs[-1]):
        recs = records(path)
        chosen = {0, len(recs) // 2, len(recs) - 1}
        if path == segs[-1]:
            chosen.discard(len(recs) - 1)  # damage in the very last record reads as a torn tail
        targets += [(path, recs[k][2], recs[k][3]) for k in sorted(chosen)]
    for n, (path, at, end) in enumerate(targets):
        pos = {"header": at + 9, "payload": at + HEADER_SIZE + 2, "last-byte": end - 1}[where]
        d = _copy_journal(sim, tmp_path / f"x{n}")
        p = d / path.name
        data = bytearray(p.read_bytes())
        data[pos] ^= 0x20
        p.write_bytes(bytes(data))
        j = sim.new_journal(d)
        if where == "header" or end - at - HEADER_SIZE <= 1 << 16:
            with pytest.raises(JournalError):  # headers and payloads up to 64 KiB are checked at start-up
                j.open()
            continue
        # A large undo payload is not read at start-up (that would read the whole window): the damage
        # is found when the record is used, and refused then.
        j.open()
        g = next(g for g in j.groups if g.segment.name == path.name and g.undo_at == at)
        with pytest.raises(JournalError):
            j.read_undo(g)
        j.close()
    sim.replica.close()


def test_open_group_undo_before_the_last_segment_is_refused(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 42, seg_max=1)
    sim.run(4, idle_rate=0)
    sim.journal.close()
    segs = [s.path for s in sim.journal.segments]
    _, _, c, _ = records(segs[1])[-1]
    os.truncate(segs[1], c)  # segment 1 loses its END, segments 2 and 3 follow
    with pytest.raises(JournalError):
        sim.new_journal().open()
    sim.replica.close()


# -- abort ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seg_max", [1, 64 << 20])
def test_abort_after_a_failed_write_restores_the_image(
    tmp_path: Path, seg_max: int
) -> None:
    sim = Sim(tmp_path, 51, seg_max=seg_max)
    sim.run(15)
    before = bytes(sim.image)
    groups_before = snapshot(sim.journal)[0]
    size_before = sim.journal.bytes
    writes = sim.random_writes(at_least=3)
    sim.begin(writes)
    sim.write(writes[:2])  # then the replica write fails
    sim.journal.abort(replica_writer(sim.replica), sim.replica.sync)
    assert sim.read_replica() == before
    assert snapshot(sim.journal)[0] == groups_before
    assert sim.journal.bytes == size_before
    check_files(sim.journal)
    sim.journal.abort(replica_writer(sim.replica), sim.replica.sync)  # nothing open: a no-op
    assert sim.read_replica() == before
    sim.run(10)  # the group is retried later, then more
    check_model(sim)
    sim.reopen()
    check_files(sim.journal)
    check_restorable(sim)
    sim.close()


# -- pruning --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [61, 62])
def test_drop_before_deletes_only_whole_older_segments(tmp_path: Path, seed: int) -> None:
    sim = Sim(tmp_path, seed, seg_max=40 << 10)
    sim.run(200)
    j = sim.journal
    rng = random.Random(seed)
    pts = [g.last for g in j.points()]
    for target in sorted(rng.sample(pts[:-1], 6)) + [pts[-1]]:
        segs_before = [(s.path, s.size, [g.last for g in s.groups]) for s in j.segments]
        freed = j.drop_before(target)
        kept = {s.path for s in j.segments}
        gone = [s for s in segs_before if s[0] not in kept]
        assert freed == sum(size for _, size, _ in gone)
        assert all(not p.exists() for p, _, _ in gone)
        assert all(max(lasts) < target for _, _, lasts in gone)
        assert [s for s in segs_before if s[0] in kept] == segs_before[len(gone) :]  # oldest first only
        if len(j.segments) > 1:
            assert j.segments[0].groups[-1].last >= target  # nothing more could go
        assert j.find_point(target) is not None
        assert {p for p in pts if p >= target} <= {g.last for g in j.points()}
        check_files(j)
        check_model(sim)
        check_restorable(sim)  # every point >= target (and every boundary still held) restores
    # Never the last segment, whatever the point.
    j.drop_before(10**12)
    assert len(j.segments) == 1 and j.segments[0].path.exists()
    j2 = sim.reopen()
    check_model(sim, j2)
    check_restorable(sim, j2)
    sim.close()


# -- truncation (a committed failover) ------------------------------------------------------------------
@pytest.mark.parametrize("seed", [71, 72])
def test_truncate_after_keeps_exactly_the_older_groups(tmp_path: Path, seed: int) -> None:
    sim = Sim(tmp_path, seed, seg_max=32 << 10)
    rng = random.Random(seed)
    # Every group writes, so the first group after any cut has an UNDO (see the xfail tests below for idle ones).
    sim.run(120, idle_rate=0.0)
    for _ in range(4):
        lasts = [a.last for a in sim.applied]
        seq = rng.choice(lasts[len(lasts) // 3 : -1])
        sim.journal.truncate_after(seq)
        sim.forget_after(seq)
        assert [g.last for g in sim.journal.groups] == [a.last for a in sim.applied]
        assert sim.journal.last_seq == seq
        check_files(sim.journal)
        check_restorable(sim)
        sim.reopen()
        check_model(sim)
        check_restorable(sim)
        sim.run(rng.randrange(5, 40), idle_rate=0.0)  # appending goes on after it
        check_model(sim)
        check_files(sim.journal)
        sim.reopen()
        check_model(sim)
        check_restorable(sim)
    sim.journal.truncate_after(sim.journal.last_seq)  # nothing newer: nothing changes
    check_model(sim)
    sim.journal.truncate_after(0)  # everything goes
    sim.forget_after(0)
    assert sim.journal.empty and sim.journal.last_seq == 0
    check_files(sim.journal)
    sim.run(10, idle_rate=0.0)
    sim.reopen()
    check_model(sim)
    check_restorable(sim)
    sim.close()


def test_truncate_after_with_an_idle_group_next(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 81)
    keep = sim.group(kind="point")
    sim.group(idle=True, kind="point")  # an idle epoch's point: END only
    sim.group(kind="point")
    sim.journal.truncate_after(keep.last)
    assert [g.last for g in sim.journal.groups] == [keep.last]
    check_files(sim.journal)
    j2 = sim.reopen()  # the file still holds the idle group's END
    assert [g.last for g in j2.groups] == [keep.last]
    sim.close()


def test_truncate_after_with_an_empty_last_segment(tmp_path: Path) -> None:
    sim = Sim(tmp_path, 82, seg_max=1)  # every group opens a new segment
    keep = sim.group(kind="point")
    sim.group(kind="point")
    sim.group(kind="point")
    writes = sim.random_writes()
    sim.begin(writes)  # in a new segment
    sim.journal.abort(replica_writer(sim.replica), sim.replica.sync)  # the replica write failed
    assert sim.journal.segments[-1].size == 0 and not sim.journal.segments[-1].groups
    sim.journal.truncate_after(keep.last)
    assert [g.last for g in sim.journal.groups] == [keep.last]
    sim.close()


# -- retention figures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [91, 92])
def test_retention_points_and_history_bytes(tmp_path: Path, seed: int) -> None:
    sim = Sim(tmp_path, seed, seg_max=64 << 10)
    sim.group(kind="batch")  # groups before the first point belong to no point
    sim.run(150, idle_rate=0.15)
    sim.group(kind="batch")  # and groups after the newest point belong to it
    j = sim.journal
    groups = list(j.groups)
    pts = j.points()
    rp = j.retention_points()
    assert [p.sequence for p in rp] == [g.last for g in pts]
    assert [p.time for p in rp] == [g.time for g in pts]
    assert [p.point.is_app for p in rp] == [g.consistency == Consistency.APP for g in pts]
    assert [p.point.generation for p in rp] == [g.meta["generation"] for g in pts]
    # Each point's span: its own group's undo and the groups up to the next point, as the files hold them.
    bounds = [p.sequence for p in rp] + [10**18]
    for p, nxt in zip(rp, bounds[1:], strict=True):
        assert p.segment_bytes == sum(g.undo_bytes for g in groups if p.sequence <= g.last < nxt)
    assert sum(p.segment_bytes for p in rp) == sum(g.undo_bytes for g in groups if g.last >= rp[0].sequence)
    # undo_bytes are the records' sizes: with the group ends they make up the files exactly.
    end_bytes = sum(end - at for s in j.segments for t, _, at, end in records(s.path) if t == GROUP_END_TYPE)
    assert sum(g.undo_bytes for g in groups) + end_bytes == j.bytes
    hist = j.history_bytes()
    assert list(hist) != [] and set(hist) == {g.last for g in pts}
    for seq, n in hist.items():
        assert n == sum(g.undo_bytes for g in groups if g.last > seq)
    ordered = [hist[s] for s in sorted(hist)]
    assert ordered == sorted(ordered, reverse=True)  # going further back never costs less
    assert hist[pts[-1].last] >= groups[-1].undo_bytes > 0  # the trailing batch group counts
    sim.close()
