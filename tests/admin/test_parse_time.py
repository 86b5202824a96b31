"""`standby failover --at TIME`: the accepted forms of TIME (standby.admin.recoverycli.parse_time)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest

from standby.admin.recoverycli import parse_time
from standby.plumbing.errors import BadInput

LOCAL = dt.timezone(dt.timedelta(hours=2))  # the zone the fixture below makes local
NOW = dt.datetime(2026, 11, 23, 20, 30, 15, tzinfo=LOCAL)


@pytest.fixture(autouse=True)
def local_zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fixed local zone, UTC+2 without DST, so 'local time' means the same everywhere."""
    monkeypatch.setenv("TZ", "TST-2")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def local(*args: int) -> float:
    return dt.datetime(*args, tzinfo=LOCAL).timestamp()


@pytest.mark.parametrize(
    "text, want",
    [
        ("2026-11-23 14:05", local(2026, 11, 23, 14, 5)),
        ("2026-11-23 14:05:30", local(2026, 11, 23, 14, 5, 30)),
        ("  2026-11-23T14:05:30  ", local(2026, 11, 23, 14, 5, 30)),
        ("2026-11-23 14:05:30.250", local(2026, 11, 23, 14, 5, 30) + 0.25),
        ("2026-11-23T14:05:30+01:00", dt.datetime(2026, 11, 23, 13, 5, 30, tzinfo=dt.UTC).timestamp()),
        ("2026-11-23T14:05:30Z", dt.datetime(2026, 11, 23, 14, 5, 30, tzinfo=dt.UTC).timestamp()),
        ("2026-11-23", local(2026, 11, 23)),
    ],
)
def test_iso_forms(text: str, want: float) -> None:
    assert parse_time(text, NOW) == pytest.approx(want, abs=1e-6)
    assert parse_time(text) == pytest.approx(want, abs=1e-6)  # `now` plays no part


@pytest.mark.parametrize(
    "text, want",
    [
        ("14:05", local(2026, 11, 23, 14, 5)),
        ("14:05:30", local(2026, 11, 23, 14, 5, 30)),
        ("00:00", local(2026, 11, 23)),
        ("20:30:14.5", local(2026, 11, 23, 20, 30, 14) + 0.5),
    ],
)
def test_time_of_day_is_today_local(text: str, want: float) -> None:
    assert parse_time(text, NOW) == pytest.approx(want, abs=1e-6)


def test_time_of_day_with_the_default_now() -> None:
    days = {dt.datetime.now().astimezone().date()}
    got = parse_time("14:05")
    days.add(dt.datetime.now().astimezone().date())  # (midnight may pass in between)
    assert got in {local(d.year, d.month, d.day, 14, 5) for d in days}


def test_one_digit_hour() -> None:
    assert parse_time("9:05", NOW) == local(2026, 11, 23, 9, 5)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("10m ago", 600),
        ("10m", 600),
        ("-10m", 600),
        ("-10m ago", 600),
        ("10 m ago", 600),
        (" 30s ", 30),
        ("1.5h", 5400),
        ("2d ago", 2 * 86400),
        ("0s", 0),
    ],
)
def test_relative(text: str, seconds: float) -> None:
    assert parse_time(text, NOW) == pytest.approx(NOW.timestamp() - seconds)


def test_relative_with_the_default_now() -> None:
    t0 = time.time()
    got = parse_time("10m ago")
    assert t0 - 600 - 1 <= got <= time.time() - 600 + 1


@pytest.mark.parametrize("text, want", [("1795478222", 1795478222.0), ("1795478222.75", 1795478222.75),
                                        ("123456789", 123456789.0)])
def test_epoch_seconds(text: str, want: float) -> None:
    assert parse_time(text, NOW) == want


@pytest.mark.parametrize(
    "text",
    ["", "   ", "yesterday", "now", "10", "10 minutes ago", "10x", "m10", "25:00", "14:5", "14:05:", "2026-13-01",
     "2026-11-31 10:00", "1e9", "-1795478222", "12345678.5", "14h05"],
)
def test_invalid(text: str) -> None:
    with pytest.raises(BadInput, match="not a time"):
        parse_time(text, NOW)
