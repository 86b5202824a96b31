"""The round trip's store and words: phases move only along proto.states' PHASE_MOVES, the history keeps
each phase's times and bytes (one open entry at a time), identities are set aside and let in again, a
trip survives a reopen of the registry, and status words follow the stored phase and the disks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from standby.admin.tripcli import format_trips
from standby.processserver.registry import Registry
from standby.processserver.trips import Trip, TripStore
from standby.processserver.tripstatus import state_words
from standby.proto.states import PHASE_MOVES, Direction, IllegalTransition, Phase, phase_move

P = Phase


def store(tmp_path: Path) -> tuple[Registry, TripStore]:
    reg = Registry(tmp_path / "registry.sqlite")
    return reg, TripStore(reg.db)


def test_the_round_trip_is_one_path_through_the_table() -> None:
    path = [P.PROTECTED, P.REPROTECTING, P.SYNCHRONISING, P.SHUTTING_DOWN, P.FINAL_SYNC, P.FAILED_BACK,
            P.REVERSING, P.REPROTECTING]
    for old, new in zip(path, path[1:], strict=False):
        assert phase_move(old, new) is new
    # A full download stops first; a shutdown or final sync that fails goes back to synchronising.
    assert phase_move(P.REPROTECTING, P.SHUTTING_DOWN) is P.SHUTTING_DOWN
    assert phase_move(P.FINAL_SYNC, P.SYNCHRONISING) is P.SYNCHRONISING
    assert phase_move(P.SYNCHRONISING, P.REPROTECTING) is P.REPROTECTING  # cancel
    for old, new in [(P.PROTECTED, P.FAILED_BACK), (P.FAILED_BACK, P.SYNCHRONISING), (P.REPROTECTING, P.REVERSING),
                     (P.SHUTTING_DOWN, P.REPROTECTING), (P.REVERSING, P.SYNCHRONISING)]:
        assert (old, new) not in PHASE_MOVES
        with pytest.raises(IllegalTransition, match=f"round trip {old} -> {new}"):
            phase_move(old, new)
    assert all(isinstance(why, str) and why for why in PHASE_MOVES.values())


def test_a_trip_and_its_history_survive_a_reopen(tmp_path: Path) -> None:
    reg, trips = store(tmp_path)
    away = {"disk0": {"mt": "mtdr", "replica": "/r/web01-disk0.img", "format": "raw", "size": 1 << 20,
                      "path": "/dev/sda"}}
    trips.save(Trip("web01", Direction.REVERSE, P.REPROTECTING, "web01-rec", "web01-rec", 0, {"away": away}))
    trips.begin("web01", P.REPROTECTING, 1000, "web01-rec -> mthome")
    trips.end("web01", 5000)
    trips.end("web01", 9000)  # nothing open: the closed entry keeps its bytes
    trips.begin("web01", P.SYNCHRONISING, 5000)
    trips.begin("web01", P.SHUTTING_DOWN, 7000)  # ends the synchronising entry
    reg.close()
    reg, trips = store(tmp_path)
    t = trips.get("web01")
    assert t is not None and (t.direction, t.phase, t.active, t.data["away"]) == (
        Direction.REVERSE, P.REPROTECTING, "web01-rec", away)
    assert trips.of_identity("web01-rec") == t and trips.of_identity("web01") == t
    assert trips.of_identity("db01") is None and trips.get("db01") is None
    hist = trips.history("web01")
    assert [(h["phase"], h["bytes"], h["ended"] is not None) for h in hist] == [
        ("reprotecting", 4000, True), ("synchronising", 2000, True), ("shutting-down", None, False)]
    assert hist[0]["detail"] == "web01-rec -> mthome" and hist[0]["started"] <= hist[0]["ended"] <= time.time()
    assert [h["phase"] for h in trips.history("web01", 2)] == ["synchronising", "shutting-down"]  # newest, in order
    assert [x.name for x in trips.all()] == ["web01"]


def test_an_identity_is_set_aside_and_let_in_again(tmp_path: Path) -> None:
    _, trips = store(tmp_path)
    assert trips.retired("web01") is None
    trips.retire("web01", "its disks are written by reprotect from web01-rec")
    trips.retire("web01", "the newer reason wins")
    assert trips.retired("web01") == "the newer reason wins"
    trips.reinstate("web01")
    trips.reinstate("web01")  # twice: no error
    assert trips.retired("web01") is None


def disk(rep: str, progress: float = 0.0, resync: float | None = None) -> dict[str, object]:
    return {"replication": rep, "progress": progress, "resync": None if resync is None else {"progress": resync}}


@pytest.mark.parametrize(("phase", "disks", "ready", "words"), [
    (P.REPROTECTING, [disk("Resync", resync=0.43)], "", "reprotecting 43 %"),
    (P.REPROTECTING, [disk("Initial", 0.5), disk("Delta")], "", "reprotecting 75 %"),
    (P.REPROTECTING, [disk("Delta")], "", "ready to fail back"),
    (P.SYNCHRONISING, [disk("Delta")], "", "synchronising: ready to complete"),
    (P.SYNCHRONISING, [disk("Delta")], "disk sda has 99 records still to apply",
     "synchronising: disk sda has 99 records still to apply"),
    (P.SHUTTING_DOWN, [disk("Delta")], "", "shutting-down"),
    (P.FAILED_BACK, [disk("FailedOver")], "", "failed back, pending commit"),
    (P.FAILED_BACK, [disk("Committed")], "", "failed back (committed): ready for reverse replication"),
    (P.REVERSING, [disk("Resync", resync=0.1)], "", "reverse replication 10 %"),
    (P.REVERSING, [disk("Delta")], "", "protected"),
    (P.REVERSING, [disk("FailedOver")], "", "failed over, pending commit"),
    (P.REVERSING, [disk("Committed")], "", "failed over (committed): ready to reprotect"),
])
def test_status_words(phase: Phase, disks: list[dict[str, object]], ready: str, words: str) -> None:
    direction = Direction.FORWARD if phase is P.REVERSING else Direction.REVERSE
    assert state_words(Trip("web01", direction, phase, "x"), disks, ready) == words


def test_a_write_after_the_final_point_is_shown() -> None:
    trip = Trip("web01", Direction.REVERSE, P.FAILED_BACK, "x")
    words = state_words(trip, [disk("FailedOver"), disk("FailedOver")], "", late=8192)
    assert words.startswith("failed back, pending commit; WRITTEN AFTER THE FINAL POINT: 8192 bytes"), words
    assert "do not commit" in words


def test_full_download_says_so() -> None:
    trip = Trip("web01", Direction.REVERSE, P.SYNCHRONISING, "x", data={"sync": "full"})
    assert state_words(trip, [disk("Resync", resync=0.5)], "") == "synchronising 50 % (full download)"


def test_status_lines_of_a_round_trip() -> None:
    t0 = 1_790_000_000.0
    lines = format_trips([{
        "name": "web01", "direction": "reverse", "phase": "failed-back", "state": "failed back, pending commit",
        "active": "web01-rec", "home_mt": "mthome", "round_trips": 0,
        "policy": {"rpo_threshold": 900.0, "retention_hours": 24, "app_consistent_minutes": 60},
        "final": {"downtime_seconds": 1.25, "bytes_after_shutdown": 3 << 20, "no_data_loss": True},
        "history": [{"phase": "reprotecting", "started": t0, "ended": t0 + 12.5, "bytes": 5 << 20, "detail": "d"},
                    {"phase": "failed-back", "started": t0 + 20, "ended": None, "bytes": None, "detail": ""}],
    }])
    assert lines[0] == ("web01 round-trip direction:reverse (web01-rec -> mthome) phase:failed-back "
                        "state:failed-back,-pending-commit round-trips-done:0")
    assert lines[1] == "    policy: rpo-threshold 900 s, retention 24 h, app-consistent every 60 min"
    assert lines[2] == "    failback: downtime 1.2 s, 3.0 MiB after the shutdown, no data loss (checked)"
    assert "reprotecting" in lines[3] and "12.5 s" in lines[3] and "5.0 MiB" in lines[3]
    assert "running" in lines[4] and lines[4].split()[-1] == "-"


def test_only_reports_made_after_the_failback_count_as_written_late() -> None:
    """A report sent before the final batch was acked still counts that batch as dirty: not a late write."""
    import time
    from types import SimpleNamespace

    from standby.processserver.tripstatus import written_late

    done = time.time() - 5
    trip = Trip("web01", Direction.REVERSE, P.FAILED_BACK, "rec", data={"final": {"completed_at": done}})
    rows = [SimpleNamespace(id=1), SimpleNamespace(id=2)]
    streams = {1: SimpleNamespace(agent_report_at=done - 0.5, agent_report={"dirty_bytes": 4 << 20}),
               2: SimpleNamespace(agent_report_at=done + 1, agent_report={"dirty_bytes": 4096})}
    ps = SimpleNamespace(registry=SimpleNamespace(disks=lambda machine: rows if machine == "rec" else []),
                         streams=streams)
    assert written_late(ps, trip) == 4096  # type: ignore[arg-type]
    streams[2].agent_report_at = done - 60  # stale as well
    assert written_late(ps, trip) == 0  # type: ignore[arg-type]
