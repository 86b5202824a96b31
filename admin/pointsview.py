"""`standby points`: a machine's recovery points as people read them — a summary by age, then the newest few
(a disk cutting a point every few seconds has thousands: listing them all helps nobody at 3 a.m.).

`--since` and `--limit` choose which points are listed (in `--json` too, where nothing is left out unless
asked); the summary always counts them all.
"""

from __future__ import annotations

import time
from typing import Any

from .display import human_bytes, when

DEFAULT_LIMIT = 20  # newest points listed by default (human output); 0: all
AGES = ((600.0, "<10m"), (3600.0, "<1h"), (86400.0, "<24h"))  # the summary's age buckets


def select(res: dict[str, Any], since: float | None, limit: int | None) -> dict[str, Any]:
    """The reply with each disk's points at or after `since` and the newest `limit` of those (None or 0:
    all); `listed_of` keeps how many there were."""
    disks = []
    for d in res["disks"]:
        pts = [p for p in d["points"] if since is None or p["time"] >= since]
        if limit:
            pts = pts[-limit:]
        disks.append({**d, "points": pts, "listed_of": len(d["points"])})
    return {**res, "disks": disks}


def summary(points: list[dict[str, Any]], now: float) -> str:
    """`by age: <10m 300 · <1h 1500 · <24h 24 · older 0; app-consistent 3, newest 14:05:31`"""
    counts = [0] * (len(AGES) + 1)
    for p in points:
        age = now - p["time"]
        counts[next((i for i, (limit, _) in enumerate(AGES) if age < limit), len(AGES))] += 1
    ages = " · ".join(f"{label} {n}" for (_, label), n in zip(AGES, counts, strict=False))
    app = sum(1 for p in points if p["consistency"] == "app-consistent")
    newest = f", newest {when(points[-1]['time'])}" if points else ""
    return f"by age: {ages} · older {counts[-1]}; app-consistent {app}{newest}"


def format_points(full: dict[str, Any], since: float | None, limit: int | None, now: float | None = None) -> str:
    now = time.time() if now is None else now
    shown = select(full, since, limit)
    lines = []
    trip = full.get("roundtrip")
    if trip:
        toward = "the original site" if trip["direction"] == "reverse" else "the recovery site"
        lines.append(f"{full['machine']}: direction {trip['direction']} (points of {trip['active']}, replicated to "
                     f"{toward}), round trip phase {trip['phase']}")
    for d, all_of in zip(shown["disks"], full["disks"], strict=True):
        fo = d.get("failover")
        head = f"{full['machine']}/{d['disk']}: {len(all_of['points'])} point(s), history " \
               f"{human_bytes(d['journal_bytes'])}"
        if fo:
            head += f"; FAILED OVER to point {fo['at']}" + (" (committed)" if fo.get("committed") else "")
        lines.append(head)
        if d.get("alert"):
            lines.append(f"    ALERT: {d['alert']}")
        lines.append(f"    {summary(all_of['points'], now)}")
        if not d["points"]:
            lines.append("    no point listed" + (f" since {when(since)}" if since is not None else ""))
            continue
        lines.append(f"    {'ID':>10}  {'TIME':<23}  {'KIND':<16}  {'HISTORY':>10}  TAG")
        for p in d["points"]:
            pid = p["sequence"] if len(full["disks"]) == 1 else f"{d['disk']}:{p['sequence']}"
            lines.append(f"    {pid!s:>10}  {when(p['time']):<23}  {p['consistency']:<16}  "
                         f"{human_bytes(p['history_bytes']):>10}  {p['tag']}")
        if len(d["points"]) < len(all_of["points"]):
            lines.append(f"    (the newest {len(d['points'])} of {len(all_of['points'])} listed: --limit N lists N, "
                         "--limit 0 all, --since TIME those after TIME)")
    return "\n".join(lines)
