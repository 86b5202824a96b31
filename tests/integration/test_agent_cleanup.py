"""An agent killed with SIGKILL leaves its disk's trace instance recording in the kernel;
`standby-agent cleanup` removes it (LocalDeployment.stop_all relies on that)."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest

from standby.agent.disk import trace_instance
from standby.agent.tracker.tracefs import available
from tests.conftest import needs_loop

from .conftest import MiB

WHY_NOT = available()
pytestmark = [needs_loop, pytest.mark.skipif(WHY_NOT is not None, reason=f"tracefs impossible here: {WHY_NOT}")]


def test_cleanup_removes_the_instance_a_killed_agent_left(deployment, protected) -> None:
    protected("raw", 16 * MiB)
    deployment.wait_for(lambda s: s["disks"][0].get("tracker") == "tracefs", 120, "the kernel tracker")
    state = deployment.root / "agent-src"
    uid = uuid.UUID(json.loads((state / "disks" / "disk0.json").read_text())["uid"])
    instance = Path("/sys/kernel/tracing/instances") / trace_instance(uid)
    assert instance.is_dir()
    deployment.kill("agent-src", signal.SIGKILL)
    assert (instance / "tracing_on").read_text() == "1\n"  # left behind, still recording
    res = deployment.run("agent", "cleanup", "--dir", str(state), check=False)
    assert res.returncode == 0, res.stderr
    assert f"removed trace instance {instance.name} of disk disk0" in res.stdout
    assert not instance.exists()
