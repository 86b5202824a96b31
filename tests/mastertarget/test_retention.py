"""Retention planning (pure function) with property tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.mastertarget.retention import Policy, Span, Tier, plan
from standby.proto.enums import Consistency
from standby.proto.point import Point

NOW = 1_800_000_000.0  # a wall-clock time: a point's time is one
HOUR = 3600.0
APP, CRASH = Consistency.APP, Consistency.CRASH


def span(sequence: int, time: float, consistency: Consistency, segment_bytes: int = 0) -> Span:
    return Span(Point(sequence, 1, time, consistency), segment_bytes)


@st.composite
def histories(draw: st.DrawFn) -> list[Span]:
    n = draw(st.integers(0, 60))
    ages = sorted(draw(st.lists(st.floats(0, 40 * HOUR), min_size=n, max_size=n)), reverse=True)
    return [
        span(i + 1, NOW - age, draw(st.sampled_from([CRASH, CRASH, APP])), draw(st.integers(0, 1 << 20)))
        for i, age in enumerate(ages)
    ]


policies = st.builds(
    Policy,
    window=st.sampled_from([HOUR, 6 * HOUR, 24 * HOUR]),
    space_cap=st.one_of(st.none(), st.integers(0, 8 << 20)),
)


@settings(max_examples=300, deadline=None)
@given(histories(), policies)
def test_plan_invariants(points: list[Span], policy: Policy) -> None:
    p = plan(points, NOW, policy)
    keep = {x.sequence for x in p.keep}
    drop = {x.sequence for x in p.drop}
    assert keep | drop == {x.sequence for x in points} and not keep & drop
    if not points:
        assert not p.keep
        return
    newest = max(points, key=lambda x: x.sequence)
    assert newest.sequence in keep  # always
    for x in p.keep:
        if x.sequence != newest.sequence:
            assert NOW - x.time <= policy.window  # nothing outside the window but the newest
    # Kept spans add up to everything newer than the oldest kept point.
    oldest = min(keep)
    assert p.kept_bytes == sum(x.segment_bytes for x in points if x.sequence >= oldest)
    if policy.space_cap is not None:
        assert p.kept_bytes <= policy.space_cap or len(p.keep) == 1
        if len(p.keep) == 1 and p.kept_bytes > policy.space_cap:
            assert "space cap" in p.alert


@settings(max_examples=200, deadline=None)
@given(histories())
def test_without_a_cap_thinning_keeps_one_per_bucket_and_all_of_the_last_hour(points: list[Span]) -> None:
    policy = Policy()
    p = plan(points, NOW, policy)
    keep = {x.sequence for x in p.keep}
    assert p.alert == ""
    if not points:
        return
    for x in points:
        if NOW - x.time <= HOUR:
            assert x.sequence in keep, "every point of the last hour stays"
    # Older tiers: at most one kept point per bucket, besides the newest and the oldest in the window.
    inside = [x for x in points if NOW - x.time <= policy.window]
    special = {max(x.sequence for x in points)} | ({min(x.sequence for x in inside)} if inside else set())
    buckets: dict[tuple[float, int], int] = {}
    for x in p.keep:
        if x.sequence in special or NOW - x.time <= HOUR:
            continue
        tier = next(t for t in policy.tiers if NOW - x.time <= t.age)
        key = (tier.age, int(x.time // tier.every))
        buckets[key] = buckets.get(key, 0) + 1
    assert all(v == 1 for v in buckets.values())


def test_space_pressure_prunes_oldest_first_and_alerts() -> None:
    points = [span(i, NOW - (10 - i) * 60, CRASH, 100) for i in range(10)]
    p = plan(points, NOW, Policy(space_cap=450))
    assert [x.sequence for x in p.keep] == [6, 7, 8, 9]  # 4 x 100 bytes fit under 450, 5 do not
    assert [x.sequence for x in p.drop] == [0, 1, 2, 3, 4, 5]
    assert "removed the 6 oldest" in p.alert and p.kept_bytes == 400


def test_app_consistent_point_wins_its_bucket() -> None:
    base = NOW - 3 * HOUR
    base -= base % 300  # the start of a 5-minute bucket of the second tier
    points = [
        span(1, base + 10, CRASH),
        span(2, base + 20, APP),
        span(3, base + 30, CRASH),
        span(4, NOW - 60, CRASH),
    ]
    p = plan(points, NOW, Policy())
    keep = {x.sequence for x in p.keep}
    # 1 stays as the oldest point of the window; of the bucket's others the app-consistent one wins.
    assert 2 in keep and 3 not in keep


def test_everything_older_than_the_window_but_the_newest() -> None:
    points = [span(1, NOW - 30 * HOUR, CRASH), span(2, NOW - 26 * HOUR, CRASH)]
    p = plan(points, NOW, Policy())
    assert [x.sequence for x in p.keep] == [2] and [x.sequence for x in p.drop] == [1]


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        Policy(window=0)
    with pytest.raises(ValueError):
        Policy(tiers=(Tier(6 * HOUR, 300), Tier(HOUR, 0)))
    with pytest.raises(ValueError):
        Policy(space_cap=-1)
