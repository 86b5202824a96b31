"""Log lines rate-limited per key (a source address), pure: what a flood of strangers may cost the journal.
Used by the listener's gate (gate.py) and by enrollment (enroll.py)."""

from __future__ import annotations

import logging
from typing import Any

LOG_WINDOW = 60.0
"""Rate-limited log lines: at most one per key (source address) per window, with a count."""

LOG_KEYS_MAX = 1024
"""Addresses tracked by a rate-limited log at once; beyond, they share one line (bounded memory against
a flood from many addresses)."""


class RateLimitedLog:
    """At most one line per key per `window` seconds; what was held back is counted and told later.

    Pure: `record` returns the line to log now (or None: counted), `flush` returns the summaries of
    windows that have ended with lines held back, each with the highest level held back. Every line
    starts with its key (a source address). Memory is bounded by `max_keys`; keys beyond share the key
    "other addresses".
    """

    OTHERS = "other addresses"

    def __init__(self, window: float = LOG_WINDOW, max_keys: int = LOG_KEYS_MAX) -> None:
        self.window = window
        self.max_keys = max_keys
        # key -> [window start, lines held back, last message held back, highest level held back]
        self._keys: dict[str, list[Any]] = {}

    def record(self, key: str, message: str, now: float, level: int = logging.WARNING) -> str | None:
        if key not in self._keys and len(self._keys) >= self.max_keys:
            self.flush(now)  # forgets ended windows (their summaries are dropped: those keys went quiet)
            if len(self._keys) >= self.max_keys:
                key = self.OTHERS
        entry = self._keys.get(key)
        if entry is None or now - entry[0] >= self.window:
            earlier = f" (before it: {self._held(entry)})" if entry is not None and entry[1] else ""
            self._keys[key] = [now, 0, "", logging.NOTSET]
            return f"{key}: {message}{earlier}"
        entry[1] += 1
        entry[2] = message
        entry[3] = max(entry[3], level)
        return None

    def flush(self, now: float) -> list[tuple[int, str]]:
        """(level, summary) of ended windows that held lines back; keys whose window ended are forgotten."""
        out = []
        for key in [k for k, e in self._keys.items() if now - e[0] >= self.window]:
            entry = self._keys.pop(key)
            if entry[1]:
                out.append((entry[3], f"{key}: {self._held(entry)}"))
        return out

    def pending(self) -> bool:
        """Whether any line is held back (a flush at the end of its window would say something)."""
        return any(e[1] for e in self._keys.values())

    def _held(self, entry: list[Any]) -> str:
        return f"{entry[1]} more like this within {self.window:.0f} s, the last: {entry[2]}"
