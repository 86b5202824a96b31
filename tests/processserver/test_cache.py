"""The process server's durable cache: append, recover, torn tails, corruption, release."""

from __future__ import annotations

import os
import time

import pytest

from standby.processserver import cache as cache_mod
from standby.processserver.cache import DiskCache, drop_quarantine
from standby.proto.messages import Batch, BatchKind, Extent, ExtentKind, Marker

SEAL = bytes(28)


def batch(seq: int, cursor: int, payload: bytes = b"x" * 100) -> bytes:
    ext = (Extent(ExtentKind.DATA, cursor - 512, 512, payload),)
    return Batch(1, seq, 1, BatchKind.INITIAL, cursor, ext, SEAL).encode()


def marker(seq: int) -> bytes:
    return Marker(1, seq, {"generation": 1, "kind": "initial-complete"}, SEAL).encode()


def test_append_recover_roundtrip(tmp_path):
    c = DiskCache(tmp_path)
    for s in range(1, 6):
        c.append(s, batch(s, s * 512))
    c.append(6, marker(6))
    c.close()
    r = DiskCache(tmp_path)
    rec = r.recover()
    assert rec.last_seq == 6 and rec.last_cursor == 5 * 512 and rec.generation == 1
    assert rec.records[6].marker == "initial-complete"
    assert [e.sequence for e in r.after(3)] == [4, 5, 6]
    assert DiskCache.read(r.after(3)[0]) == batch(4, 4 * 512)


def test_torn_tail_is_cut_and_never_counted(tmp_path):
    c = DiskCache(tmp_path)
    c.append(1, batch(1, 512))
    c.append(2, batch(2, 1024))
    c.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    good = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(batch(3, 1536)[:50])  # a crash in the middle of an append: never acknowledged
    r = DiskCache(tmp_path)
    rec = r.recover()
    assert rec.last_seq == 2
    assert seg.stat().st_size == good


def test_corruption_before_the_tail_is_set_aside_never_skipped(tmp_path, monkeypatch):
    """Damage in an older segment: the records before it stay, the damaged segment and all after it go
    to quarantine/ (kept), and the damage is reported so the disk gets resynced (issue 9, finding 7: on
    47f798a one damaged segment stopped the process server for every disk)."""
    monkeypatch.setattr(cache_mod, "SEGMENT_BYTES", 150)  # one record per segment
    c = DiskCache(tmp_path)
    for s in range(1, 5):
        c.append(s, batch(s, s * 512))
    c.close()
    segs = sorted(tmp_path.glob("seg-*.log"))
    assert len(segs) == 4
    data = bytearray(segs[1].read_bytes())
    data[60] ^= 0xFF
    segs[1].write_bytes(bytes(data))
    r = DiskCache(tmp_path)
    rec = r.recover(acked=4)
    assert rec.last_seq == 1 and [e.sequence for e in r.index] == [1]
    assert rec.damage is not None and "records 2..4 are lost" in rec.damage
    assert sorted(p.name for p in tmp_path.glob("seg-*.log")) == [segs[0].name]
    assert len(list((tmp_path / "quarantine").iterdir())) == 3  # nothing thrown away


def test_a_damaged_acknowledged_last_record_is_not_cut_as_a_torn_tail(tmp_path):
    """Issue 9, finding 4: on 47f798a a damaged last record of the newest segment was cut off as "never
    acknowledged" although it had been acknowledged; the master target then waited for it for ever."""
    c = DiskCache(tmp_path)
    for s in range(1, 4):
        c.append(s, batch(s, s * 512))
    c.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # inside record 3's payload: it fails its checksum, and it is the last record
    seg.write_bytes(bytes(data))
    # Record 3 was never acknowledged: a torn tail, cut off as before.
    r = DiskCache(tmp_path)
    rec = r.recover(acked=2)
    assert rec.last_seq == 2 and rec.damage is None
    # The same damage after record 3 was acknowledged: lost data, reported, the file kept in quarantine.
    seg.write_bytes(bytes(data))
    r = DiskCache(tmp_path)
    rec = r.recover(acked=3)
    assert rec.last_seq == 2 and rec.damage is not None and "; record 3 is lost" in rec.damage
    assert [e.sequence for e in r.index] == [1, 2]
    assert (tmp_path / "quarantine").exists()
    assert seg.stat().st_size == len(batch(1, 512)) + len(batch(2, 1024))


def test_release_deletes_applied_segments(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "SEGMENT_BYTES", 150)
    c = DiskCache(tmp_path)
    for s in range(1, 5):
        c.append(s, batch(s, s * 512))
    assert len(list(tmp_path.glob("seg-*.log"))) == 4
    c.release(2)
    assert [e.sequence for e in c.index] == [3, 4]
    assert len(list(tmp_path.glob("seg-*.log"))) == 2
    c.release(4)
    assert c.index == [] and c.bytes == 0 and not list(tmp_path.glob("seg-*.log"))
    c.append(5, batch(5, 5 * 512))  # appending after everything was released starts a new segment
    assert [e.sequence for e in c.after(0)] == [5]


def test_failed_append_leaves_no_half_record(tmp_path, monkeypatch):
    c = DiskCache(tmp_path)
    c.append(1, batch(1, 512))
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        c.append(2, batch(2, 1024))
    monkeypatch.setattr(cache_mod.os, "fsync", real_fsync)
    c.close()
    rec = DiskCache(tmp_path).recover()
    assert rec.last_seq == 1


def test_damage_mid_newest_segment_is_set_aside_not_cut(tmp_path):
    c = DiskCache(tmp_path)
    for s in range(1, 4):
        c.append(s, batch(s, s * 512))
    c.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    data[len(batch(1, 512)) - 5] ^= 0xFF  # inside record 1's payload; records 2 and 3 follow intact
    seg.write_bytes(bytes(data))
    rec = DiskCache(tmp_path).recover(acked=3)
    assert rec.damage is not None and "records 1..3 are lost" in rec.damage
    [kept] = (tmp_path / "quarantine").iterdir()
    assert kept.read_bytes() == bytes(data)  # the damaged file as it was, for inspection
    assert not seg.exists()  # nothing intact was before the damage


def test_a_record_that_does_not_decode_is_damage(tmp_path):
    """A record with a good checksum and a payload no decoder accepts (a poisoned record stored by an
    older release): set aside, never a crash at start-up."""
    from standby.proto.frames import encode_frame
    from standby.proto.messages import FrameType

    c = DiskCache(tmp_path)
    c.append(1, batch(1, 512))
    c.append(2, encode_frame(FrameType.MARKER, 1, 2, b"\x00\x00\x00\x05junk!" + bytes(28)))
    c.append(3, batch(3, 1536))
    c.close()
    r = DiskCache(tmp_path)
    rec = r.recover(acked=3)
    assert rec.last_seq == 1 and rec.damage is not None and "does not decode" in rec.damage


def test_record_info_never_trusts_a_marker_time():
    for bad in (10**400, float("inf"), float("nan"), -5, True, "1", [1], None, {"a": 1}):
        info = cache_mod.record_info(Marker(1, 1, {"generation": 1, "kind": "point", "time": bad}, SEAL))
        assert info.time == 0.0 and info.marker == "point"


def test_quarantine_gives_way_oldest_first(tmp_path):
    """A full cache volume deletes segments set aside for inspection, oldest first, until enough is freed,
    across all disks; the live segments are never touched."""
    now = time.time()
    files = []
    for n, (disk, age) in enumerate([("disk-1", 300), ("disk-2", 200), ("disk-1", 100)]):
        q = tmp_path / disk / "quarantine"
        q.mkdir(parents=True, exist_ok=True)
        f = q / f"seg-{n:020d}.log.x"
        f.write_bytes(b"q" * 1000)
        os.utime(f, (now - age, now - age))
        files.append(f)
    live = tmp_path / "disk-1" / "seg-00000000000000000009.log"
    live.write_bytes(b"live")
    assert drop_quarantine(tmp_path, want=1500) == (2, 2000)
    assert [f.exists() for f in files] == [False, False, True]
    assert drop_quarantine(tmp_path) == (1, 1000)
    assert drop_quarantine(tmp_path) == (0, 0)
    assert live.read_bytes() == b"live"


def test_a_torn_first_record_of_a_fresh_segment_is_a_torn_tail(tmp_path):
    """Found by the long fault campaign: everything before was applied and its segments released; a kill -9
    during the first append to a fresh segment left it torn at offset 0. The registry had acknowledged only
    what came before, yet the torn record was taken for damage ("records 1..N are lost") and the disk
    resynced for nothing."""
    c = DiskCache(tmp_path)
    for s in range(1, 4):
        c.append(s, batch(s, s * 512))
    c.release(3)  # applied: no segment left
    c.append(4, batch(4, 4 * 512))
    c.close()
    (seg,) = sorted(tmp_path.glob("seg-*.log"))
    assert seg.name == "seg-00000000000000000004.log"
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) - 7])  # record 4 torn: the crash came before its fsync and its ACK
    r = DiskCache(tmp_path)
    rec = r.recover(acked=3)
    assert rec.damage is None, rec.damage
    assert rec.last_seq == 0 and not r.index
    assert not (tmp_path / "quarantine").exists()
    # Had record 4 been acknowledged, the same bytes are damage.
    seg.write_bytes(data[: len(data) - 7])
    r2 = DiskCache(tmp_path)
    assert r2.recover(acked=4).damage is not None


def test_damage_after_released_records_names_only_what_is_lost(tmp_path):
    """Records 1..3 were applied and their segment released: damage in the segment that begins at 4 loses
    4..6, and the message says so (it said "records 1..6 are lost", sending the operator after records the
    replica holds)."""
    c = DiskCache(tmp_path)
    for s in range(1, 4):
        c.append(s, batch(s, s * 512))
    c.release(3)
    for s in range(4, 7):
        c.append(s, batch(s, s * 512))
    c.close()
    (seg,) = sorted(tmp_path.glob("seg-*.log"))
    data = bytearray(seg.read_bytes())
    data[len(batch(4, 4 * 512)) - 5] ^= 0xFF  # inside record 4's payload
    seg.write_bytes(bytes(data))
    rec = DiskCache(tmp_path).recover(acked=6)
    assert rec.damage is not None and "records 4..6 are lost" in rec.damage, rec.damage
