"""Unit tests of the write-order workload and crash-consistency checker (tests/writeorder.py).

The checker is the oracle for promise 4, so it gets tested against a brute force: an image is
consistent exactly when some replayed cut N equals it byte for byte. No root needed: image files only.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import writeorder as wo

REPO = Path(__file__).resolve().parent.parent
SLOT = wo.SLOT


def _run_workload(tmp_path: Path, *, slots: int = 64, offset: int = 3 * SLOT, count: int = 500, seed: int = 11):
    """Format an image file and write ``count`` records; return (image, log path, writer)."""
    img, log = tmp_path / "src.img", tmp_path / "src.log"
    writer = wo.Writer(img, offset, slots, seed=seed, log_path=log)
    writer.format()
    assert writer.run(count=count) == count
    return img, log, writer


def _set_slot(image: bytes, slot: int, block: bytes) -> bytes:
    return image[: slot * SLOT] + block + image[(slot + 1) * SLOT :]


def _brute_force(image: bytes, log: wo.WriteLog) -> list[int]:
    """Every N whose replayed image equals ``image`` exactly: the definition the checker must match."""
    return [n for n in range(log.last + 1) if wo.image_at(log, n) == image]


def _small_log(seed: int = 3) -> wo.WriteLog:
    # slot 0: 1, 4, 7    slot 1: 2, 5    slot 2: 3, 6    slot 3: never written
    return wo.WriteLog.from_slots(seed, 0, 4, [0, 1, 2, 0, 1, 2, 0])


# --------------------------------------------------------------------------------------------------
# Records and log


def test_record_layout_round_trip() -> None:
    rec = wo.make_record(seed=99, n=12345, slot=7)
    assert len(rec) == SLOT and rec[:8] == wo.RECORD_MAGIC
    d = wo.decode_record(rec)
    assert (d.kind, d.n, d.slot, d.seed) == ("record", 12345, 7, 99)
    assert rec == wo.make_record(99, 12345, 7)  # deterministic: replay is byte-exact
    assert rec != wo.make_record(98, 12345, 7) and rec != wo.make_record(99, 12346, 7)


def test_decode_classifies_torn_and_foreign() -> None:
    a, b = wo.make_record(1, 5, 0), wo.make_record(1, 9, 0)
    assert wo.decode_record(a[:2048] + b[2048:]).kind == "torn"
    assert wo.decode_record(a[:512] + bytes(SLOT - 512)).kind == "torn"
    assert wo.decode_record(bytes(SLOT)).detail == "zeros"
    assert wo.decode_record(b"\xff" * SLOT).kind == "foreign"
    flipped = bytearray(a)
    flipped[100] ^= 1
    assert wo.decode_record(bytes(flipped)).kind == "torn"


def test_log_file_round_trip_and_partial_tail(tmp_path: Path) -> None:
    img, log_path, writer = _run_workload(tmp_path, count=300)
    on_disk = wo.WriteLog.read(log_path)
    assert list(on_disk.pairs()) == list(writer.log.pairs())
    assert (on_disk.seed, on_disk.offset, on_disk.slots) == (11, 3 * SLOT, 64)
    # A writer killed mid-append leaves a partial entry: ignored, not an error.
    with open(log_path, "ab") as f:
        f.write(b"\x01\x02\x03")
    assert wo.WriteLog.read(log_path).last == 300
    with pytest.raises(ValueError):
        wo.WriteLog.read(img)


def test_plan_mixes_runs_hot_slots_and_random() -> None:
    plan = wo.slot_plan(5, 256)
    seq = [next(plan) for _ in range(5000)]
    assert seq == [s for s, _ in zip(wo.slot_plan(5, 256), range(5000), strict=False)]  # seeded
    consecutive = sum(1 for x, y in zip(seq, seq[1:], strict=False) if y == (x + 1) % 256)
    assert consecutive > 300  # runs of consecutive slots exist
    assert len(set(seq)) > 200  # spread over the region
    assert max(seq.count(s) for s in set(seq)) > 50  # hot slots rewritten often


# --------------------------------------------------------------------------------------------------
# Workload + checker


def test_copy_after_stop_is_consistent_at_last_record(tmp_path: Path) -> None:
    img, log_path, writer = _run_workload(tmp_path, count=800)
    copy = tmp_path / "copy.img"
    shutil.copyfile(img, copy)
    v = wo.check(copy, 3 * SLOT, 64, log_path)
    assert v.consistent, v.to_json()
    assert (v.cut_lo, v.cut_hi, v.cut) == (800, 800, 800)
    assert v.torn == v.foreign == v.unwritten == 0
    assert wo.source_matches(img, 3 * SLOT, 64, writer.log)
    # The same verdict through a read(offset, length) callable (how a VMDK replica is read).
    data = copy.read_bytes()
    assert wo.check(lambda off, n: data[off : off + n], 3 * SLOT, 64, writer.log).explains(800)


def test_writer_stops_on_flag_and_duration_and_paces(tmp_path: Path) -> None:
    img = tmp_path / "w.img"
    writer = wo.Writer(img, 0, 16, seed=1, sync="none")
    writer.format()
    assert writer.run(stop=lambda: writer.log.last >= 37) == 37
    paced = wo.Writer(img, 0, 16, seed=2, rate=40.0, sync="none")
    paced.format()
    last = paced.run(seconds=0.25)
    assert 1 <= last <= 20  # bounded by rate x duration (+1 for the first write at t=0)
    assert wo.source_matches(img, 0, 16, paced.log)


@pytest.mark.parametrize("sync", ["auto", "dsync", "fdatasync", "none"])
def test_every_sync_mode_keeps_the_source_at_the_last_record(tmp_path: Path, sync: str) -> None:
    img = tmp_path / "s.img"
    writer = wo.Writer(img, SLOT, 32, seed=4, sync=sync)
    writer.format()
    writer.run(count=100)
    assert writer.mode in ("direct", "dsync", "fdatasync", "none")
    assert wo.source_matches(img, SLOT, 32, writer.log)


def test_replayed_cuts_are_consistent_at_exactly_that_cut(tmp_path: Path) -> None:
    img, log_path, writer = _run_workload(tmp_path, count=400)
    log = wo.WriteLog.read(log_path)
    for n in (0, 1, 2, 31, 32, 33, 199, 399, 400):
        v = wo.check(wo.image_at(log, n), 0, 64, log)
        assert v.consistent and v.cut_lo == v.cut_hi == n, (n, v.to_json())
    # Replay into an image file at the log's offset equals the real source at the end.
    replay = tmp_path / "replay.img"
    wo.write_image_at(replay, log, 400)
    assert replay.read_bytes() == img.read_bytes()


def test_log_ahead_of_the_device_still_pins_the_cut() -> None:
    """The writer logs before it writes: a logged record that never reached the device is just "not yet"."""
    log = _small_log()
    v = wo.check(wo.image_at(log, 4), 0, 4, log)  # records 5..7 logged, not written
    assert (v.cut_lo, v.cut_hi) == (4, 4)
    # An empty log: the formatted region is cut 0.
    empty = wo.WriteLog(3, 0, 4)
    assert wo.check(wo.image_at(empty, 0), 0, 4, empty).explains(0)


# --------------------------------------------------------------------------------------------------
# Mixed states


def test_future_block_with_missing_dependency_is_inconsistent() -> None:
    log = _small_log()
    # Cut 3 (slot0=1, slot1=2, slot2=3), but slot 0 from cut 4: record 4 is fine alone (= cut 4).
    assert wo.check(_set_slot(wo.image_at(log, 3), 0, wo.make_record(3, 4, 0)), 0, 4, log).explains(4)
    # Slot 0 from cut 7 while slot 1 still holds record 2: records 5 and 6 (its dependencies) are missing.
    mixed = _set_slot(wo.image_at(log, 3), 0, wo.make_record(3, 7, 0))
    v = wo.check(mixed, 0, 4, log)
    assert not v.consistent and v.cut is None
    assert v.reasons[0]["kind"] == "conflict"
    assert 0 in v.reasons[0]["slots"]
    assert _brute_force(mixed, log) == []
    assert {r["kind"] for r in v.reasons[1:]} <= {"future", "stale"} and len(v.reasons) > 1


def test_stale_block_is_inconsistent() -> None:
    log = _small_log()
    # Cut 7 but slot 1 still holds record 2, overwritten by record 5.
    stale = _set_slot(wo.image_at(log, 7), 1, wo.make_record(3, 2, 1))
    v = wo.check(stale, 0, 4, log)
    assert not v.consistent
    assert v.best_cut == 7 and v.mismatched == 1
    assert {"slot": 1, "kind": "stale", "found": 2, "expected": 5, "at_cut": 7} in v.reasons


def test_torn_block_is_detected(tmp_path: Path) -> None:
    img, log_path, writer = _run_workload(tmp_path, count=300)
    data = bytearray(img.read_bytes())
    log = writer.log
    slot = log.slot_of[300]
    at = 3 * SLOT + slot * SLOT
    older = wo.make_record(log.seed, log.writes_to(slot)[-2] if len(log.writes_to(slot)) > 1 else 0, slot)
    data[at + 2048 : at + SLOT] = older[2048:]  # new first half, old second half
    v = wo.check(bytes(data), 3 * SLOT, 64, log)
    assert not v.consistent and v.torn == 1
    assert v.reasons[0] == {"slot": slot, "kind": "torn", "found": v.reasons[0]["found"]}
    assert "checksum" in v.reasons[0]["found"]


def test_record_never_written_to_that_slot_is_detected() -> None:
    log = _small_log()
    image = wo.image_at(log, 7)
    for bogus, why in ((wo.make_record(3, 5, 0), "slot 1"), (wo.make_record(3, 50, 0), "beyond the log")):
        v = wo.check(_set_slot(image, 0, bogus), 0, 4, log)
        assert not v.consistent and v.unwritten == 1
        assert v.reasons[0]["kind"] == "unwritten" and why in v.reasons[0]["found"]


def test_foreign_blocks_are_detected() -> None:
    log = _small_log()
    image = wo.image_at(log, 7)
    cases = {
        "zeros": bytes(SLOT),
        "foreign": b"\xab" * SLOT,
        "other-run": wo.make_record(4, 7, 0),
        "misplaced": wo.make_record(3, 5, 1),
    }
    for kind, block in cases.items():
        v = wo.check(_set_slot(image, 0, block), 0, 4, log)
        assert not v.consistent and v.foreign == 1, kind
        assert v.reasons[0]["kind"] == ("foreign" if kind == "zeros" else kind)
    short = wo.check(image[: 3 * SLOT], 0, 4, log)  # image ends early
    assert not short.consistent and short.foreign == 1


def test_check_rejects_a_log_for_another_region() -> None:
    with pytest.raises(ValueError):
        wo.check(bytes(4 * SLOT), 0, 5, _small_log())
    with pytest.raises(ValueError):
        wo.check(bytes(4 * SLOT), 100, 4, _small_log())


# --------------------------------------------------------------------------------------------------
# Property tests against the brute force


@st.composite
def logs(draw: st.DrawFn) -> wo.WriteLog:
    slots = draw(st.integers(1, 6))
    seq = draw(st.lists(st.integers(0, slots - 1), max_size=30))
    return wo.WriteLog.from_slots(draw(st.integers(0, 2**64 - 1)), 0, slots, seq)


@settings(max_examples=150, deadline=None)
@given(log=logs(), data=st.data())
def test_replayed_cut_is_consistent_and_found(log: wo.WriteLog, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, log.last))
    v = wo.check(wo.image_at(log, n), 0, log.slots, log)
    assert v.consistent and v.explains(n)
    assert v.cut_lo == v.cut_hi == n  # distinct records: the image pins the cut exactly


@settings(max_examples=200, deadline=None)
@given(log=logs(), data=st.data())
def test_checker_agrees_with_brute_force_on_mixed_images(log: wo.WriteLog, data: st.DataObject) -> None:
    """Each slot takes any record ever written to it (or 0): the checker must match the brute force."""
    n = data.draw(st.integers(0, log.last))
    image = wo.image_at(log, n)
    if data.draw(st.booleans()):
        # One slot changed to another record of that slot: equivalent to a cut, or flagged.
        s = data.draw(st.integers(0, log.slots - 1))
        r = data.draw(st.sampled_from([0, *log.writes_to(s)]))
        image = _set_slot(image, s, wo.make_record(log.seed, r, s))
    else:
        for s in range(log.slots):
            r = data.draw(st.sampled_from([0, *log.writes_to(s)]))
            image = _set_slot(image, s, wo.make_record(log.seed, r, s))
    v = wo.check(image, 0, log.slots, log)
    truth = _brute_force(image, log)
    assert v.consistent == bool(truth), (truth, v.to_json())
    if truth:
        assert [v.cut_lo, v.cut_hi] == [truth[0], truth[-1]]
        assert truth == list(range(truth[0], truth[-1] + 1))
    else:
        assert v.reasons and v.reasons[0]["kind"] == "conflict"
        assert v.best_cut is not None and 0 < v.mismatched <= log.slots


# --------------------------------------------------------------------------------------------------
# Command line


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.writeorder", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_write_until_sigterm_then_check_copy(tmp_path: Path) -> None:
    img, log, copy = tmp_path / "cli.img", tmp_path / "cli.log", tmp_path / "copy.img"
    offset, slots = 16 * SLOT, 128
    with open(img, "wb") as f:
        f.truncate(offset + slots * SLOT + 8 * SLOT)
    region = ["--offset", str(offset), "--slots", str(slots), "--log", str(log)]
    proc = _cli("write", str(img), *region, "--seconds", "30", "--seed", "7")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    last = int(out.strip().split()[-1])
    assert out.strip() == f"done {last}" and last > 0
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["records"] == last
    shutil.copyfile(img, copy)

    checked = subprocess.run(
        [sys.executable, "-m", "tests.writeorder", "check", str(copy), *region],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    verdict = json.loads(checked.stdout)
    assert verdict["consistent"] and verdict["cut"] == last

    # A stale slot in the copy turns the verdict (and the exit code) around: a slot other than the one
    # holding the last record, put back to an older record, needs N before a write that the last one needs.
    logged = wo.WriteLog.read(log)
    s = next(s for s in range(slots) if s != logged.slot_of[last] and logged.writes_to(s))
    with open(copy, "r+b") as f:
        f.seek(offset + s * SLOT)
        f.write(wo.make_record(logged.seed, 0, s))
    bad = subprocess.run(
        [sys.executable, "-m", "tests.writeorder", "check", str(copy), *region],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and not json.loads(bad.stdout)["consistent"]
