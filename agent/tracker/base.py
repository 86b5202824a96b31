"""What every change tracker shares."""

from __future__ import annotations


class TrackingLost(Exception):
    """The tracker cannot prove it saw every write: the disk needs a resync. str(exc) is the reason, for operators."""
