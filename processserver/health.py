"""A disk's health as `standby status` shows it: the problems active now and those that cleared lately.

Each problem has a key (what kind of condition), a text that says what is wrong and, where we know, what
to do, the time it began, and a level: `error` (the disk is not replicating: failed, quarantined,
stalled) or `alert` (replicating, but the operator must know: RPO over the threshold, tracking lost,
retention pressure). Whoever detects a condition sets its problem; whoever sees the condition end clears
it — so status never keeps an error whose cause is gone, and never drops one whose cause is still there.
A cleared problem stays listed (with when it cleared) for CLEARED_KEEP seconds, so the operator who looks
later still sees what happened. Every change is logged once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("standby.ps.health")
CLEARED_KEEP = 600.0
CLEARED_MAX = 20
ERROR, ALERT = "error", "alert"
MAX_TEXT = 2000


def clean(text: str, limit: int = MAX_TEXT) -> str:
    """Printable, bounded text for status, logs and the typed status reply (which refuses control bytes)."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Problem:
    key: str
    text: str
    since: float
    level: str

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "text": self.text, "since": self.since, "level": self.level}


class Health:
    def __init__(self, name: str) -> None:
        self.name = name  # machine/disk, for the log
        self.active: dict[str, Problem] = {}
        self.cleared: deque[tuple[Problem, float]] = deque(maxlen=CLEARED_MAX)

    def set(self, key: str, text: str, level: str = ERROR, now: float | None = None) -> None:
        """The condition `key` holds, described by `text` (logged when it begins or its text changes). The
        text may quote a peer (a master target's reject reason): control characters and excess go."""
        text = clean(text)
        old = self.active.get(key)
        if old is not None and old.text == text and old.level == level:
            return
        now = time.time() if now is None else now
        self.active[key] = Problem(key, text, old.since if old is not None else now, level)
        if old is None or old.text != text:
            if level == ERROR:
                log.error("disk %s: %s", self.name, text)
            else:
                log.warning("ALERT disk %s: %s", self.name, text)

    def update(self, key: str, text: str | None, level: str = ERROR) -> None:
        """Set `key` with `text`, or clear it when there is no text (a peer's periodic word on a condition)."""
        if text:
            self.set(key, text, level)
        else:
            self.clear(key)

    def clear(self, key: str, now: float | None = None) -> None:
        """The condition `key` ended (a no-op if it was not set)."""
        p = self.active.pop(key, None)
        if p is None:
            return
        now = time.time() if now is None else now
        self.cleared.append((p, now))
        log.info("disk %s: cleared after %.0f s: %s", self.name, now - p.since, p.text)

    def has(self, key: str) -> bool:
        return key in self.active

    def texts(self, level: str) -> list[str]:
        return [p.text for p in self.active.values() if p.level == level]

    def recent(self, now: float | None = None) -> list[dict[str, Any]]:
        """Problems cleared in the last CLEARED_KEEP seconds, newest first."""
        now = time.time() if now is None else now
        return [{**p.as_dict(), "cleared_at": at} for p, at in reversed(self.cleared) if now - at < CLEARED_KEEP]
