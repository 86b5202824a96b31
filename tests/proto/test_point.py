"""proto.point.Point: the one shape of a recovery point, validated; built from a MARKER meta or a journal
group; its wire form in the `points` reply (proto.mt_requests.PointInfo) is the JSON peers always read."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from standby.proto.enums import Consistency
from standby.proto.messages import Marker
from standby.proto.mt_requests import PointInfo
from standby.proto.point import Point, meta_time
from standby.proto.wire import BadRequest, InvalidMessage

T = 1_800_000_000.5
META: dict[str, Any] = {"generation": 3, "kind": "point", "time": T, "consistency": "app-consistent", "tag": "nightly"}


def test_from_marker_and_from_group_agree() -> None:
    p = Point.from_marker(Marker(7, 42, META, bytes(28)))
    assert p == Point(42, 3, T, Consistency.APP, "nightly") and p.is_app

    class Group:  # the journal keeps the agent's meta with the group's first sequence added
        last, meta = 42, {**META, "first": 40}

    assert Point.from_group(Group()) == p


def test_a_crash_point_has_no_tag() -> None:
    meta = {"generation": 1, "kind": "point", "time": T, "consistency": "crash-consistent"}
    p = Point.from_meta(5, meta)
    assert p.tag == "" and not p.is_app and p.consistency is Consistency.CRASH


def test_frozen_and_slotted() -> None:
    p = Point(1, 1, T, Consistency.CRASH)
    with pytest.raises(FrozenInstanceError):
        p.sequence = 2  # type: ignore[misc]
    assert not hasattr(p, "__dict__")


@pytest.mark.parametrize(
    "args",
    [
        (-1, 1, T, "crash-consistent"),
        (1, 2**32, T, "crash-consistent"),
        (1, 1, -5.0, "crash-consistent"),
        (1, 1, 5.0, "crash-consistent"),
        (2**63, 1, T, "crash-consistent"),
        (1, 1, float("nan"), "crash-consistent"),
        (1, 1, T, "mostly-consistent"),
        (1, 1, T, ""),
    ],
)
def test_an_invalid_point_cannot_exist(args: tuple[Any, ...]) -> None:
    with pytest.raises(InvalidMessage):
        Point(*args)


@pytest.mark.parametrize(
    "damage",
    [
        {"generation": 2**40},
        {"generation": "1"},
        {"time": "soon"},
        {"time": 5},  # not a wall-clock time
        {"consistency": "mostly"},
        {"consistency": None},
        {"tag": "x" * 300},
        {"tag": 5},
        {"kind": "initial-complete"},  # a marker, but not a point
        {"kind": "batch"},
    ],
)
def test_a_meta_that_is_no_point_is_refused(damage: dict[str, Any]) -> None:
    """The journal checks a group end's meta when it reads it (mastertarget.journal_codec): a Point is never
    built from anything else, so a point always has its consistency and time and can always be listed."""
    with pytest.raises(BadRequest):
        Point.from_meta(4, {**META, **damage})


@pytest.mark.parametrize("t, want", [(T, T), (5, 5.0), (True, 0.0), ("1", 0.0), (1e12, 0.0), (-1, 0.0), (None, 0.0)])
def test_meta_time(t: Any, want: float) -> None:
    assert meta_time({"time": t}) == want


def test_stored_form_and_listed_form() -> None:
    p = Point(9, 2, T, Consistency.APP, "before-upgrade")
    assert p.to_wire() == {"sequence": 9, "generation": 2, "time": T, "consistency": "app-consistent",
                           "tag": "before-upgrade"}
    assert PointInfo.listed(p, 4096).to_wire() == {
        "sequence": 9, "time": T, "consistency": "app-consistent", "tag": "before-upgrade", "history_bytes": 4096
    }
