"""How the admin CLI shows sizes and instants to people; every command's output uses these two, so a
size or a time reads the same in `standby status` and in `standby points`."""

from __future__ import annotations

import datetime as dt


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def when(t: float | None) -> str:
    """An instant in local time to the millisecond (recovery points are often less than a second apart);
    '-' for none."""
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
