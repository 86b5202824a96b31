"""The disk-state table driven directly: every legal move, every illegal one, and the log line."""

from __future__ import annotations

import itertools

import pytest

from standby.proto.errors import LocalProtocolError
from standby.proto.states import (
    FAILED_OVER,
    TRANSITIONS,
    DiskState,
    IllegalTransition,
    Replication,
    describe,
    disk_state,
    move,
)

R = Replication


def test_the_life_of_a_disk_is_a_path_through_the_table() -> None:
    state = R.OFF
    for new in (R.INITIAL, R.DELTA, R.RESYNC, R.DELTA, R.RESYNC, R.FAILED_OVER, R.COMMITTED):
        state = move(state, new)
    assert state is R.COMMITTED


@pytest.mark.parametrize(("old", "new"), sorted(itertools.product(R, R)))
def test_a_move_is_legal_exactly_when_the_table_lists_it(old: Replication, new: Replication) -> None:
    if old == new or (old, new) in TRANSITIONS:
        assert move(old, new) is new
    else:
        with pytest.raises(IllegalTransition, match=f"replication {old} -> {new} is not a legal move"):
            move(old, new)


def test_no_way_back_from_a_failover_and_into_a_resync_only_from_replicating() -> None:
    for stopped in FAILED_OVER:
        for new in (R.OFF, R.INITIAL, R.DELTA, R.RESYNC):
            with pytest.raises(IllegalTransition):
                move(stopped, new)
    assert {old for old, new in TRANSITIONS if new is R.RESYNC} == {R.DELTA, R.INITIAL}
    assert issubclass(IllegalTransition, LocalProtocolError)  # our bug, not the peer's


def test_the_disk_axis_is_inconsistent_only_while_a_copy_is_made() -> None:
    assert {r for r in R if disk_state(r) is DiskState.INCONSISTENT} == {R.OFF, R.INITIAL, R.RESYNC}


def test_one_line_per_move_names_both_axes_when_both_change() -> None:
    assert describe("web01/sda", R.DELTA, R.RESYNC, "tracking lost") == (
        "disk web01/sda: replication Delta -> Resync, disk UpToDate -> Inconsistent (reason: tracking lost)"
    )
    assert describe("web01/sda", R.DELTA, R.FAILED_OVER, "failover to point 7") == (
        "disk web01/sda: replication Delta -> FailedOver (reason: failover to point 7)"
    )


def test_the_words_are_the_ones_status_shows() -> None:
    assert [r.value for r in R] == ["Off", "Initial", "Delta", "Resync", "FailedOver", "Committed"]
    assert [d.value for d in DiskState] == ["Inconsistent", "UpToDate"]
