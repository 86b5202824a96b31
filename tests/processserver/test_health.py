"""A disk's health (processserver.health): problems set and cleared by their causes, logged once, kept
listed with their times for a while after they cleared."""

from __future__ import annotations

import logging

from standby.processserver.health import ALERT, CLEARED_KEEP, ERROR, Health


def test_set_clear_and_recent(caplog):
    h = Health("web01/sda")
    with caplog.at_level(logging.INFO, "standby.ps.health"):
        h.set("stalled", "stalled: 3 records waiting", ERROR, now=100.0)
        h.set("stalled", "stalled: 3 records waiting", ERROR, now=105.0)  # unchanged: not logged again
        h.set("rpo", "RPO 1000 s", ALERT, now=101.0)
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert h.texts(ERROR) == ["stalled: 3 records waiting"] and h.texts(ALERT) == ["RPO 1000 s"]
    h.set("stalled", "stalled: 9 records waiting", ERROR, now=110.0)  # new text, same episode
    assert h.active["stalled"].since == 100.0
    h.clear("stalled", now=130.0)
    h.clear("stalled", now=131.0)  # already cleared: no-op
    assert h.texts(ERROR) == []
    [c] = h.recent(now=140.0)
    assert (c["key"], c["since"], c["cleared_at"], c["text"]) == ("stalled", 100.0, 130.0, "stalled: 9 records waiting")
    assert h.recent(now=130.0 + CLEARED_KEEP + 1) == []
