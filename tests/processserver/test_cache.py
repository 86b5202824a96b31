"""The process server's durable cache: append, recover, torn tails, corruption, release."""

from __future__ import annotations

import os

import pytest

from standby.processserver import cache as cache_mod
from standby.processserver.cache import CacheCorrupt, DiskCache
from standby.proto.messages import Batch, BatchKind, Commit, Extent, ExtentKind

SEAL = bytes(28)


def batch(seq: int, cursor: int, payload: bytes = b"x" * 100) -> bytes:
    ext = (Extent(ExtentKind.DATA, cursor - 512, 512, payload),)
    return Batch(1, seq, 1, BatchKind.INITIAL, cursor, ext, SEAL).encode()


def commit(seq: int) -> bytes:
    return Commit(1, seq, {"generation": 1, "kind": "initial-complete"}, SEAL).encode()


def test_append_recover_roundtrip(tmp_path):
    c = DiskCache(tmp_path)
    for s in range(1, 6):
        c.append(s, batch(s, s * 512))
    c.append(6, commit(6))
    c.close()
    r = DiskCache(tmp_path)
    rec = r.recover()
    assert rec.last_seq == 6 and rec.last_cursor == 5 * 512 and rec.generation == 1
    assert rec.records[6][0] == "initial-complete"
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


def test_corruption_before_the_tail_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "SEGMENT_BYTES", 150)  # one record per segment
    c = DiskCache(tmp_path)
    for s in range(1, 4):
        c.append(s, batch(s, s * 512))
    c.close()
    segs = sorted(tmp_path.glob("seg-*.log"))
    assert len(segs) == 3
    data = bytearray(segs[0].read_bytes())
    data[60] ^= 0xFF
    segs[0].write_bytes(bytes(data))
    with pytest.raises(CacheCorrupt, match="before its end"):
        DiskCache(tmp_path).recover()


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


def test_damage_mid_newest_segment_is_refused_not_cut(tmp_path):
    c = DiskCache(tmp_path)
    for s in range(1, 4):
        c.append(s, batch(s, s * 512))
    c.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    data[len(batch(1, 512)) - 5] ^= 0xFF  # inside record 1's payload; records 2 and 3 follow intact
    seg.write_bytes(bytes(data))
    with pytest.raises(CacheCorrupt, match="before its end"):
        DiskCache(tmp_path).recover()
    assert seg.stat().st_size == len(data)  # nothing was cut
