"""Promise 9, end to end: a task that dies unexpectedly logs its traceback, turns its disk — only that
disk — failed in status with the reason, and is started again; nothing is lost (issue 9: "no task
anywhere can die without a log line with its traceback (a test kills one on purpose)").

The daemons' fail points (standby.plumbing.failpoints, armed by STANDBY_FAILPOINTS in the daemon's
environment) raise an unexpected exception inside a chosen long-lived task.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import needs_loop

from .conftest import MiB
from .test_delta import disk
from .test_fault_findings import burst, same

pytestmark = [needs_loop]


@pytest.mark.parametrize(
    ("daemon", "point", "key"),
    [
        ("mt-mt1", "mt.apply", "mt-replica"),
        ("ps", "ps.sender", "ps-sender"),
        ("agent-src", "agent.epoch", "agent"),
    ],
)
def test_a_task_killed_on_purpose_is_logged_reported_and_restarted(deployment, protected, monkeypatch, daemon,
                                                                    point, key):
    dev, replica = protected("raw", 32 * MiB, fill=False)
    deployment.wait_synced("src", timeout=60)
    kind, _, name = daemon.partition("-")
    monkeypatch.setenv("STANDBY_FAILPOINTS", f"{point}=2")
    deployment.kill(daemon, 15)
    if kind == "ps":
        deployment.start("ps")
    else:
        deployment.start(kind, name)
    monkeypatch.delenv("STANDBY_FAILPOINTS")
    burst(dev, 8 * MiB, 64 * 1024, 1, (0, 32 * MiB))
    end = time.time()
    # The failure shows in status as this disk's, with the reason (a sample of status over the retries).
    seen = deployment.wait_for(
        lambda s: any(key == c["key"] for c in disk(s)["cleared"]) or any(p["key"] == key for p in disk(s)["problems"]),
        90, f"the {point} failure to show in status",
        interval=0.1,
    )
    problems = disk(seen)["problems"] + disk(seen)["cleared"]
    assert any("injected fault" in p["text"] for p in problems if p["key"] == key), problems
    text = deployment.log_text(daemon)
    assert "Traceback" in text and f"injected fault at {point}" in text, text[-3000:]
    # Restarted by its supervisor: replication catches up, the replica equals the source, the error is gone.
    deployment.wait_caught_up("src", end, timeout=120)
    d = disk(deployment.wait_for(lambda s: disk(s)["error"] is None, 30, "the error to clear"))
    assert d["applying"] == "running", d
    assert same(dev, replica, 32 * MiB) == 0
    assert os.path.exists(Path(replica))
