"""A round trip after a process server restart, and what status says of it (processserver.hub, tripstatus),
on a real hub (registry in a temporary directory): a failback whose shutdown step or final sync was under
way when the process server died goes back to where the operator can complete it again (its request is
gone: nothing else would move it on), and status says "ready to complete" only when `--complete` can run.
The same paths under real daemons and kill -9: tests/faults/test_roundtrip_faults.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from standby.processserver.hub import Hub
from standby.processserver.trips import Trip
from standby.processserver.tripstatus import failback_ready, state_words
from standby.proto.states import Direction, Phase, Replication
from tests.processserver.test_sessions import UID, make_hub


def with_trip(tmp_path: Path, phase: Phase, sync: str = "before-shutdown") -> Hub:
    hub = make_hub(tmp_path)
    hub.registry.add_machine("web01-rec", "agent", 1, b"pem")
    hub.registry.add_machine("home", "mt", 2, b"pem")
    row = hub.registry.add_disk("web01-rec", "sda", UID[1], "/dev/sda", 1 << 20)
    hub.registry.update_disk(row.id, mt="home", wrapped_key=b"k", replica_path="/dev/sdb", replica_format="device",
                             replication=Replication.DELTA.value)
    hub.trips.save(Trip("web01", Direction.REVERSE, phase, "web01-rec", "web01-rec", 0,
                        {"sync": sync, "away": {}, "home_mt": "home"}))
    hub.trips.begin("web01", phase, 0, "test")
    return hub


def restarted(tmp_path: Path) -> Hub:
    hub = make_hub(tmp_path)
    hub.recover()
    return hub


@pytest.mark.parametrize("phase", [Phase.SHUTTING_DOWN, Phase.FINAL_SYNC])
def test_a_failback_cut_short_by_a_restart_can_be_completed_again(tmp_path: Path, phase: Phase) -> None:
    with_trip(tmp_path, phase).registry.close()
    hub = restarted(tmp_path)
    trip = hub.trips.get("web01")
    assert trip is not None and trip.phase is Phase.SYNCHRONISING
    last = hub.trips.history("web01")[-1]
    assert last["phase"] == "synchronising" and f"stopped during {phase}" in last["detail"], last
    hub.registry.close()


def test_a_full_download_stopped_in_its_shutdown_step_is_not_started(tmp_path: Path) -> None:
    """The full copy was never asked for: back to reprotecting, from where the failback starts again."""
    with_trip(tmp_path, Phase.SHUTTING_DOWN, sync="full").registry.close()
    hub = restarted(tmp_path)
    trip = hub.trips.get("web01")
    assert trip is not None and trip.phase is Phase.REPROTECTING
    assert [h["phase"] for h in hub.trips.history("web01")] == ["shutting-down", "synchronising", "reprotecting"]
    hub.registry.close()


@pytest.mark.parametrize("phase", [Phase.REPROTECTING, Phase.SYNCHRONISING, Phase.FAILED_BACK])
def test_other_phases_stay_as_they_were(tmp_path: Path, phase: Phase) -> None:
    with_trip(tmp_path, phase).registry.close()
    hub = restarted(tmp_path)
    trip = hub.trips.get("web01")
    assert trip is not None and trip.phase is phase and len(hub.trips.history("web01")) == 1
    hub.registry.close()


def test_ready_to_complete_only_with_the_agent_and_the_master_target_connected(tmp_path: Path) -> None:
    hub = with_trip(tmp_path, Phase.SYNCHRONISING)
    trip = hub.trips.get("web01")
    assert trip is not None
    assert "agent web01-rec is not connected" in failback_ready(hub, trip)
    hub.agent_sessions["web01-rec"] = object()  # type: ignore[assignment]
    assert "master target home (the original site) is not connected" in failback_ready(hub, trip)
    hub.mt_sessions["home"] = object()  # type: ignore[assignment]
    assert failback_ready(hub, trip) == ""
    asyncio.run(hub.close())


def test_reprotect_progress_is_the_comparison_s(tmp_path: Path) -> None:
    """A reprotect into the original disks is an Initial with a checksum resync: status gives the resync's
    progress (it read 0 % to the end)."""
    trip = Trip("web01", Direction.REVERSE, Phase.REPROTECTING, "web01-rec", "web01-rec")
    disk: dict[str, Any] = {"replication": "Initial", "progress": 0.0, "resync": {"progress": 0.43}}
    assert state_words(trip, [disk], "") == "reprotecting 43 %"
    assert state_words(trip, [{"replication": "Initial", "progress": 0.25}], "") == "reprotecting 25 %"
    assert state_words(trip, [{**disk, "replication": "Delta"}], "") == "ready to fail back"
