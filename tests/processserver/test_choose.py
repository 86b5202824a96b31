"""Choosing each disk's recovery point (standby.processserver.recovery.choose): a pure function over the
points the master target lists, oldest first."""

from __future__ import annotations

import time

import pytest

from standby.processserver.recovery import ChoiceError, choose, future_at
from standby.proto.mt_requests import PointInfo

CRASH, APP = "crash-consistent", "app-consistent"
BASE = 1_800_000_000.0  # the times below are seconds after it (a point's time is a wall-clock time)


def pt(seq: int, t: float, consistency: str = CRASH, tag: str = "") -> PointInfo:
    return PointInfo(seq, BASE + t, consistency, tag, 0)


SDA = [pt(10, 100.0), pt(20, 200.0, APP, "nightly"), pt(30, 300.0)]
SDB = [pt(5, 90.0), pt(15, 190.0), pt(25, 310.0, APP)]
TWO = {"sda": SDA, "sdb": SDB}
ONE = {"sda": SDA}


def seqs(out: dict[str, PointInfo]) -> dict[str, int]:
    return {d: p.sequence for d, p in out.items()}


@pytest.mark.parametrize("point, at", [(None, None), ("latest", 100.0)])
def test_exactly_one_of_point_and_at(point: str | None, at: float | None) -> None:
    with pytest.raises(ChoiceError, match="exactly one of --point and --at"):
        choose(TWO, point, at)


@pytest.mark.parametrize("point, at", [("latest", None), ("latest-app", None), ("20", None), (None, 1e12)])
def test_a_disk_without_points(point: str | None, at: float | None) -> None:
    with pytest.raises(ChoiceError, match="disk sdb has no recovery point yet"):
        choose({"sda": SDA, "sdb": []}, point, at)


@pytest.mark.parametrize("point", ["latest", "latest-processed"])
def test_latest(point: str) -> None:
    assert seqs(choose(TWO, point, None)) == {"sda": 30, "sdb": 25}
    assert choose(ONE, point, None) == {"sda": SDA[-1]}


def test_latest_app() -> None:
    out = choose(TWO, "latest-app", None)
    assert seqs(out) == {"sda": 20, "sdb": 25}
    assert out["sda"].tag == "nightly"


def test_latest_app_missing_on_a_disk() -> None:
    with pytest.raises(ChoiceError, match=r"disk sdc has no app-consistent point.*standby app-point"):
        choose({**TWO, "sdc": [pt(1, 50.0), pt(2, 60.0)]}, "latest-app", None)


@pytest.mark.parametrize(
    "at, want",
    [
        (100.0, {"sda": 10, "sdb": 5}),  # at exactly a point's time: that point
        (199.9, {"sda": 10, "sdb": 15}),
        (250.0, {"sda": 20, "sdb": 15}),
        (305.0, {"sda": 30, "sdb": 15}),
        (1e12, {"sda": 30, "sdb": 25}),
    ],
)
def test_at_takes_the_newest_point_at_or_before(at: float, want: dict[str, int]) -> None:
    assert seqs(choose(TWO, None, BASE + at)) == want


def test_at_before_the_oldest_point() -> None:
    oldest = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(BASE + 100.0))
    with pytest.raises(ChoiceError, match=rf"disk sda has no recovery point at or before .*its oldest is {oldest}"):
        choose(TWO, None, BASE + 95.0)  # sdb has one (90), sda does not


def test_point_id_on_a_single_disk() -> None:
    assert choose(ONE, "20", None) == {"sda": SDA[1]}
    assert choose(ONE, "sda:20", None) == {"sda": SDA[1]}


def test_point_id_on_several_disks_others_take_their_point_at_that_time() -> None:
    assert seqs(choose(TWO, "sda:20", None)) == {"sda": 20, "sdb": 15}
    assert seqs(choose(TWO, "sdb:25", None)) == {"sda": 30, "sdb": 25}
    assert seqs(choose(TWO, "sdb:15", None)) == {"sda": 10, "sdb": 15}
    assert seqs(choose(TWO, "sda:10", None)) == {"sda": 10, "sdb": 5}


def test_point_id_whose_time_is_before_another_disks_oldest() -> None:
    with pytest.raises(ChoiceError, match="disk sda has no recovery point at or before"):
        choose(TWO, "sdb:5", None)


def test_bare_sequence_on_several_disks() -> None:
    with pytest.raises(ChoiceError, match=r"DISK:SEQ \(disks: sda, sdb\)"):
        choose(TWO, "20", None)


@pytest.mark.parametrize("point", ["sdc:5", ":5", "SDA:20"])
def test_unknown_disk(point: str) -> None:
    with pytest.raises(ChoiceError, match=r"no disk .* \(disks: sda, sdb\)"):
        choose(TWO, point, None)


@pytest.mark.parametrize("points, point", [(ONE, "newest"), (ONE, "sda:"), (TWO, "sda:x"), (TWO, "sda:-5"),
                                           (TWO, "sda: 20"), (ONE, "2.0"), (ONE, "")])
def test_not_a_point(points: dict[str, list[PointInfo]], point: str) -> None:
    with pytest.raises(ChoiceError, match="not a point"):
        choose(points, point, None)


@pytest.mark.parametrize("point", ["sda:21", "sda:5"])
def test_no_such_point(point: str) -> None:
    with pytest.raises(ChoiceError, match="disk sda has no recovery point"):
        choose(TWO, point, None)


def test_disk_names_with_colons() -> None:
    pts = {"vg:root": [pt(3, 10.0), pt(4, 20.0)], "vg:home": [pt(7, 15.0)]}
    assert seqs(choose(pts, "vg:root:4", None)) == {"vg:root": 4, "vg:home": 7}


def test_unicode_digits_are_not_a_point() -> None:
    with pytest.raises(ChoiceError):
        choose(ONE, "sda:²", None)


def test_inputs_are_not_modified() -> None:
    before = {d: list(pts) for d, pts in TWO.items()}
    choose(TWO, "sda:20", None)
    choose(TWO, None, BASE + 250.0)
    choose(TWO, "latest-app", None)
    assert TWO == before


def test_a_time_in_the_future_is_refused_with_the_clock_it_was_judged_by() -> None:
    """--at after now would silently be the newest point (and another one a moment later): refused."""
    now = BASE + 1000.0
    why = future_at(BASE + 1060.0, now)
    assert why is not None and why.startswith(f"--at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(BASE + 1060))}"
                                              " is in the future (the process server's clock says ")
    assert "--point latest-processed" in why
    assert future_at(now, now) is None and future_at(BASE + 10.0, now) is None and future_at(None, now) is None
