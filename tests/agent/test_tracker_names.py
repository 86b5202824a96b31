"""Trackers are named to the operator as the config names them (`tracefs`, `full-scan`): in status, the
demo and the log — never by their class name."""

from __future__ import annotations

from standby.agent.tracker import TRACKERS, FullScanTracker
from standby.agent.tracker.tracefs import TracefsTracker


def test_each_tracker_is_named_by_its_config_choice():
    assert (TracefsTracker.name, FullScanTracker.name) == ("tracefs", "full-scan")
    assert {TracefsTracker.name, FullScanTracker.name} == set(TRACKERS) - {"auto"}
