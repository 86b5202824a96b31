"""Change trackers: tracefs block events (Linux, proves instants) and the portable full scan."""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

from .base import TrackingLost
from .fullscan import FullScanTracker

log = logging.getLogger("standby.agent.tracker")
TRACKERS = ("auto", "tracefs", "full-scan")  # the config's `tracker` choices


def make_tracker(choice: str, path: str, size: int, instance: str, buffer_kb: int) -> Any:
    """The tracker for a disk: tracefs where it works (`auto`), else the full scan. Asking for `tracefs`
    where it cannot work is an error, not a silent fallback."""
    is_block = stat.S_ISBLK(os.stat(path).st_mode)
    if choice in ("auto", "tracefs"):
        from . import tracefs

        why = "not a block device" if not is_block else tracefs.available()
        if why is None:
            return tracefs.TracefsTracker(path, instance, buffer_kb)
        if choice == "tracefs":
            raise TrackingLost(f"tracefs tracking of {path} is impossible: {why}")
        log.warning("%s: tracefs tracking unavailable (%s): using the full-scan tracker", path, why)
    return FullScanTracker(path, size)


__all__ = ["TRACKERS", "FullScanTracker", "TrackingLost", "make_tracker"]
