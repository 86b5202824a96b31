"""The per-disk object the agent's workers get instead of the Agent (agent.replicated.ReplicatedDisk):
the resync it asks for, the report the process server gets from it, and its tracking from start to stop."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from standby.agent.config import AgentConfig, DiskConfig
from standby.agent.disk import LocalDisk
from standby.agent.replicated import Progress, ReplicatedDisk
from standby.agent.tracker.fullscan import FullScanTracker
from standby.proto import requests as rq
from standby.proto.envelope import Opener
from standby.proto.errors import EnvelopeError
from standby.proto.messages import meta_bytes

MiB = 1024 * 1024


def replicated(tmp_path: Path) -> ReplicatedDisk:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    (tmp_path / "disks").mkdir(mode=0o700)
    cfg = AgentConfig(tmp_path, "m1", "127.0.0.1", 9443, tracker="full-scan")
    return ReplicatedDisk(LocalDisk(DiskConfig("d0", img), uuid.uuid4(), bytes(32), id=3), cfg)


def valid_report(rd: ReplicatedDisk) -> rq.DiskReport:
    """The report as the process server parses it at its boundary."""
    r = rq.parse_request("disk_report", {"disk": rd.disk.id, "report": rd.report()}, "agent")
    assert isinstance(r, rq.DiskReport)
    return r


def test_the_first_reason_for_a_resync_stays(tmp_path: Path) -> None:
    rd = replicated(tmp_path)
    rd.want_resync("checksum", "the agent did not stop cleanly")
    rd.want_resync("full", "asked again")
    assert rd.resync_wanted == ("checksum", "the agent did not stop cleanly")
    assert valid_report(rd).report.resync_pending == ("checksum", "the agent did not stop cleanly")


def test_a_disk_without_tracking_reports_it_and_its_failure(tmp_path: Path) -> None:
    rd = replicated(tmp_path)
    rd.error = "replication failed unexpectedly: boom (retrying)"
    rep = rd.report()
    assert rep["tracker"] is None and rep["tracking_lost"] == "not tracking" and rep["dirty_bytes"] is None
    assert valid_report(rd).report.error == rd.error
    rd.resync_progress = Progress("checksum", "x", 4 * MiB)
    assert valid_report(rd).report.resync is not None


def test_tracking_starts_unproven_without_a_clean_stop_record_and_stops(tmp_path: Path) -> None:
    rd = replicated(tmp_path)
    tr = rd.start_tracking()
    try:
        assert tr is not None and rd.tracking is tr and isinstance(tr.tracker, FullScanTracker)
        assert rd.unproven is not None and "did not stop cleanly" in rd.unproven
        rep = rd.report()
        assert rep["tracker"] == "full-scan" and rep["tracking_lost"] is None and rep["dirty_bytes"] == 0
        valid_report(rd)
    finally:
        rd.stop_tracking()
    assert rd.tracking is None
    # An image file has no kernel write counters: no clean-stop record, so the next run cannot vouch either.
    assert not list((tmp_path / "disks").glob("*.clean-stop.json"))


def test_a_marker_is_sealed_with_the_disks_key_over_its_meta(tmp_path: Path) -> None:
    rd = replicated(tmp_path)
    meta = {"generation": 2, "kind": "point", "consistency": "crash-consistent", "time": 1.5}
    c = rd.make_marker(9, meta)
    assert (c.disk, c.sequence, c.meta) == (3, 9, meta)
    opener = Opener(rd.disk.key, rd.disk.uid.bytes, MiB)
    opener.check_batch(2, 9, meta_bytes(meta), c.seal)  # what the master target checks before it applies
    with pytest.raises(EnvelopeError):
        opener.check_batch(2, 10, meta_bytes(meta), c.seal)  # bound to its sequence
