"""plumbing.segmentlog: numbered segment files, appends with fsync, a new segment's directory fsync, a failed
append cut back, cuts and deletion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from standby.plumbing import segmentlog
from standby.plumbing.segmentlog import SegmentLog


def test_segments_are_named_by_their_first_sequence_and_listed_in_order(tmp_path: Path) -> None:
    log = SegmentLog(tmp_path, ".log")
    for first in (100, 7, 12):
        log.start(first)
        log.append([b"x"])
    (tmp_path / "redo.log").write_bytes(b"")  # not a segment
    (tmp_path / "seg-00000000000000000001.jrn").write_bytes(b"")  # another log's suffix
    assert [SegmentLog.first_of(p) for p in log.paths()] == [7, 12, 100]
    assert log.paths()[0].name == "seg-00000000000000000007.log"
    assert SegmentLog.first_of(tmp_path / "seg-oops.log") == 0


def test_append_returns_offsets_and_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(segmentlog.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    log = SegmentLog(tmp_path, ".log")
    path = log.start(1)
    n = len(synced)
    assert n == 1  # the directory, for the new file
    assert log.append([b"abc", b"de"]) == 0
    assert len(synced) == n + 1
    assert log.append([b"f"], sync=False) == 5 and len(synced) == n + 1
    log.sync()
    assert len(synced) == n + 2
    assert path.read_bytes() == b"abcdef" and log.size == 6


def test_a_failed_append_leaves_no_partial_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = SegmentLog(tmp_path, ".jrn")
    path = log.start(1, exclusive=True)
    log.append([b"good"])

    def failing(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segmentlog.os, "fsync", failing)
    with pytest.raises(OSError):
        log.append([b"half", b"written"])
    monkeypatch.undo()
    assert path.read_bytes() == b"good" and log.size == 4
    assert log.append([b"next"]) == 4


def test_exclusive_start_refuses_an_existing_segment(tmp_path: Path) -> None:
    log = SegmentLog(tmp_path, ".jrn")
    log.start(5, exclusive=True)
    log.append([b"a"])
    with pytest.raises(FileExistsError):
        log.start(5, exclusive=True)
    other = SegmentLog(tmp_path, ".jrn")
    other.start(5)  # without exclusive: appended to
    assert other.size == 1 and other.append([b"b"]) == 1


def test_resume_reopens_at_the_size_on_disk(tmp_path: Path) -> None:
    log = SegmentLog(tmp_path, ".jrn")
    path = log.start(1)
    log.append([b"0123456789"])
    log.close()
    log.cut(path, 4)
    log.resume(path)
    assert log.append([b"x"]) == 4 and path.read_bytes() == b"0123x"


def test_cut_and_delete(tmp_path: Path) -> None:
    log = SegmentLog(tmp_path, ".log")
    a = log.start(1)
    log.append([b"aaaa"])
    b = log.start(2)
    log.append([b"bbbbbb"])
    log.cut(b, 2)
    assert log.size == 2 and b.read_bytes() == b"bb"
    assert log.delete([a, tmp_path / "seg-00000000000000000009.log"]) == 4  # a missing one counts nothing
    assert log.paths() == [b] and log.tail == b
    assert log.delete([b]) == 2 and log.tail is None and log.size == 0
    with pytest.raises(ValueError):
        log.append([b"z"])
    log.sync_dir()
