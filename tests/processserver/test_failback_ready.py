"""When a failback may complete (processserver.tripstatus.failback_ready), on a real process server's
registry: a full download asks the agent for a resync, and until the agent begins it the disk is still in
delta replication with nothing to apply — yet not a block of the copy has been made. That window must not
read as ready (status) nor let `standby failback --complete` through."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from standby.processserver.trips import Trip
from standby.processserver.tripstatus import failback_ready
from standby.proto.states import Direction, Phase, Replication
from tests.processserver.test_sessions import make_hub


def test_a_requested_resync_not_begun_is_not_caught_up(tmp_path: Path) -> None:
    hub = make_hub(tmp_path)
    try:
        row = hub.registry.add_disk("web01-rec", "disk0", "uid-0", "/dev/sda", 1 << 20)
        hub.registry.update_disk(row.id, mt="mthome", replication=Replication.DELTA.value)
        trip = Trip("web01", Direction.REVERSE, Phase.SYNCHRONISING, "web01-rec", "web01-rec", 0, {"sync": "full"})
        # Neither daemon connected: the shutdown step and the final sync could not run.
        assert "agent web01-rec is not connected" in failback_ready(hub, trip)
        hub.agent_sessions["web01-rec"] = SimpleNamespace()  # only their presence is asked for
        assert "master target mthome (the original site) is not connected" in failback_ready(hub, trip)
        hub.mt_sessions["mthome"] = SimpleNamespace()  # type: ignore[assignment]
        assert failback_ready(hub, trip) == ""  # caught up: nothing to copy, nothing to apply
        row = hub.registry.disk(row.id)
        assert row is not None
        agent = hub.agent_sessions.pop("web01-rec")
        hub.request_resync(row, "full", "failback with full download")  # asked while the agent is away
        hub.agent_sessions["web01-rec"] = agent
        assert failback_ready(hub, trip) == "disk disk0 is to be copied again (its resync has not begun yet)"
        hub.registry.update_disk(row.id, resync_request=None, replication=Replication.RESYNC.value)  # begun
        assert failback_ready(hub, trip) == "disk disk0 is Resync (synchronising)"
    finally:
        hub.agent_sessions.clear()
        hub.mt_sessions.clear()
        asyncio.run(hub.close())
