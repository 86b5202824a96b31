"""`standby points` as people read it (standby.admin.pointsview): a summary by age that counts every point,
then the newest few; `--since` and `--limit` choose which are listed."""

from __future__ import annotations

from typing import Any

from standby.admin.pointsview import format_points, select, summary

NOW = 1_800_000_000.0


def reply(n: int, step: float = 2.0) -> dict[str, Any]:
    pts = [{"sequence": i + 1, "time": NOW - (n - i) * step, "consistency": "app-consistent" if i % 50 == 0
            else "crash-consistent", "tag": "", "history_bytes": 4096 * (n - i)} for i in range(n)]
    return {"machine": "web01", "disks": [{"disk": "sda", "disk_id": 1, "points": pts, "journal_bytes": 1 << 20,
                                           "applied_seq": n, "alert": "", "failover": None}]}


def rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()[:1].isdigit()]


def test_the_newest_twenty_are_listed_and_the_summary_counts_all() -> None:
    text = format_points(reply(2000), None, 20, NOW)
    listed = rows(text)
    assert len(listed) == 20 and listed[-1].split()[0] == "2000" and listed[0].split()[0] == "1981"
    assert "web01/sda: 2000 point(s)" in text
    # 2 s apart: 299 younger than 10 min (600 s is the 300th), 1500 more under an hour... all of them here.
    assert "by age: <10m 299 · <1h 1500 · <24h 201 · older 0; app-consistent 40" in text
    assert "the newest 20 of 2000 listed" in text


def test_limit_zero_lists_all_and_since_keeps_a_window() -> None:
    assert len(rows(format_points(reply(300), None, 0, NOW))) == 300
    window = format_points(reply(300), NOW - 61, 0, NOW)
    assert len(rows(window)) == 30  # 2 s apart: the last 60 s
    assert "no point listed since" in format_points(reply(5), NOW + 1, 0, NOW)


def test_json_keeps_everything_unless_asked() -> None:
    full = reply(100)
    assert len(select(full, None, None)["disks"][0]["points"]) == 100
    got = select(full, NOW - 21, 3)["disks"][0]
    assert [p["sequence"] for p in got["points"]] == [98, 99, 100] and got["listed_of"] == 100


def test_summary_of_nothing() -> None:
    assert summary([], NOW) == "by age: <10m 0 · <1h 0 · <24h 0 · older 0; app-consistent 0"
