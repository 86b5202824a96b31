"""A failed-over or committed disk takes no resync (issue 11, item 7): `standby resync` is refused with the
reason (it answered ok, and the agent was then refused at resync_begin and asked again for ever), the
system's own resync requests are dropped for it, and a request stored before the failover is never handed
to the agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from standby.plumbing.errors import EXIT_FAILED, RequestFailed
from standby.plumbing.link import Link
from standby.processserver.hub import Hub
from standby.proto.states import Replication
from tests.processserver.test_sessions import SIZE, UID, open_disk, run
from tests.proto.test_requests import EXAMPLES

REPORT = EXAMPLES[("disk_report", "agent")][0]["report"]  # a valid agent report


def protect(hub: Hub, replication: Replication) -> int:
    row = hub.registry.add_disk("m1", "sda", UID[1], "/dev/sda", SIZE)
    hub.registry.update_disk(row.id, mt="mt1", wrapped_key=b"k", replica_path="/r/sda.vmdk", replica_format="vmdk",
                             replication=replication.value)
    return row.id


@pytest.mark.parametrize("state, words", [
    (Replication.FAILED_OVER, "m1/sda is failed over: a resync would overwrite the failed-over replica"),
    (Replication.COMMITTED, "m1/sda is committed: its replica is the machine now, and a resync would overwrite it"),
])
def test_resync_of_a_failed_over_disk_is_refused_with_the_reason(tmp_path: Path, state, words) -> None:
    async def scenario(hub: Hub, admin: Link) -> None:
        disk = protect(hub, state)
        for args in ({}, {"full": True}, {"disk": "sda"}):
            with pytest.raises(RequestFailed) as exc:
                await admin.call("resync", machine="m1", **args)
            assert exc.value.code == "refused" and exc.value.exit_code == EXIT_FAILED
            assert words in str(exc.value)
        row = hub.registry.disk(disk)
        assert row is not None and row.resync_request is None and row.replication is state

    run(tmp_path, "admin", scenario)


def test_resync_of_a_replicating_disk_is_still_requested(tmp_path: Path) -> None:
    async def scenario(hub: Hub, admin: Link) -> None:
        disk = protect(hub, Replication.DELTA)
        assert await admin.call("resync", machine="m1") == {"disks": ["sda"]}
        row = hub.registry.disk(disk)
        assert row is not None and json.loads(row.resync_request or "{}")["mode"] == "checksum"

    run(tmp_path, "admin", scenario)


def test_the_system_asks_no_resync_of_a_failed_over_disk(tmp_path: Path) -> None:
    async def scenario(hub: Hub, admin: Link) -> None:
        disk = protect(hub, Replication.FAILED_OVER)
        row = hub.registry.disk(disk)
        assert row is not None
        hub.request_resync(row, "checksum", "disk size changed")
        row = hub.registry.disk(disk)
        assert row is not None and row.resync_request is None

    run(tmp_path, "admin", scenario)


def test_an_agent_of_a_failed_over_disk_is_handed_no_stored_resync(tmp_path: Path) -> None:
    """A request stored before the failover (a registry from before it was dropped at failover) must not
    send the agent to a resync_begin that is refused for ever; resync_begin itself says why."""

    async def scenario(hub: Hub, agent: Link) -> None:
        disk = await open_disk(hub, agent)
        hub.registry.update_disk(disk, resync_request=json.dumps({"mode": "checksum", "reason": "operator"}))
        assert (await agent.call("disk_report", disk=disk, report=REPORT))["resync"] == {"mode": "checksum",
                                                                                     "reason": "operator"}
        hub.registry.update_disk(disk, replication=Replication.FAILED_OVER.value)
        assert (await agent.call("disk_report", disk=disk, report=REPORT))["resync"] is None
        res = await agent.call("disk_open", name="sda", path="/dev/sda", size=SIZE, uid=UID[1])
        assert res["resync"] is None
        with pytest.raises(RequestFailed, match="m1/sda is failed over: a resync would overwrite") as exc:
            await agent.call("resync_begin", disk=disk, generation=2, mode="checksum", reason="tracking lost")
        assert exc.value.code == "refused"

    run(tmp_path, "agent", scenario)
