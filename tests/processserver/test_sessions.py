"""The process server's sessions driven through a fake link (fakelink.py): an agent, a master target and
an admin send what their daemons send, and the session answers through the same request dispatch and
the same disk writer as in production — no sockets, no TLS, no other daemon. The hub is real (registry
and cache in a temporary directory).

What the integration tests reach only with real daemons, here in milliseconds: the request tables per
role (unknown and forbidden requests answered, never dropped), identities confined to their own disks
(promise 7), ACK once durable (promise 1), BUSY over the quota and after a failover (promise 8), and the
connection closed at a sequence gap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import Link, LinkClosed
from standby.processserver.admin import AdminSession
from standby.processserver.agentsession import AgentSession
from standby.processserver.deployment import PSConfig
from standby.processserver.hub import Hub
from standby.processserver.mtsession import MTSession
from standby.processserver.server import serve_connection
from standby.proto.messages import SEAL_SIZE, Ack, Batch, BatchKind, Busy, Extent, ExtentKind, Message
from standby.proto.requests import OPS
from tests.processserver.fakelink import link_pair
from tests.proto.test_connection import handshake

TIMEOUT = 10.0
SIZE = 1 << 20
UID = [f"00000000-0000-4000-8000-{i:012d}" for i in range(10)]


def make_hub(tmp_path: Path, quota: int = 1 << 30) -> Hub:
    cfg = PSConfig(state_dir=tmp_path, name="ps", listen="127.0.0.1", port=0, cache_dir=tmp_path / "cache",
                   cache_quota=quota)
    return Hub(cfg)


def batch(disk: int, sequence: int, generation: int = 1) -> Batch:
    return Batch(disk, sequence, generation, BatchKind.DELTA, 0, (Extent(ExtentKind.ZERO, 0, 4096),),
                 b"\0" * SEAL_SIZE)


Scenario = Callable[[Hub, Link], Awaitable[None]]


def run(tmp_path: Path, role: str, scenario: Scenario, quota: int = 1 << 30, name: str = "m1") -> None:
    """Run the session of `role` for peer `name` on a fresh hub, and `scenario(hub, client)` against it."""

    async def main() -> None:
        hub = make_hub(tmp_path, quota)
        client, server = link_pair(role)
        if role == "agent":
            session = AgentSession(hub, server, name).run()
        elif role == "mt":
            session = MTSession(hub, server, name).run()
        else:
            session = AdminSession(hub, server).run()
        task = asyncio.create_task(serve_connection(server, session))  # as the listener runs it
        try:
            await asyncio.wait_for(scenario(hub, client), TIMEOUT)
        finally:
            await client.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await hub.close()

    asyncio.run(main())


async def open_disk(hub: Hub, agent: Link, protect: bool = True) -> int:
    res = await agent.call("disk_open", name="sda", path="/dev/sda", size=SIZE, uid=UID[1])
    if protect:
        hub.registry.update_disk(res["disk"], mt="mt1", wrapped_key=b"k", replica_path="/r/sda.vmdk",
                                 replica_format="vmdk")
    return int(res["disk"])


async def answers(link: Link, n: int) -> list[Message]:
    return [await link.recv() for _ in range(n)]


# -- request dispatch -------------------------------------------------------------------------------------


def test_disk_open_registers_the_disk_and_tells_where_to_start(tmp_path: Path) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        res = await agent.call("disk_open", name="sda", path="/dev/sda", size=SIZE, uid=UID[1])
        assert res["next_sequence"] == 1 and res["protected"] is False and res["generation"] == 1
        row = hub.registry.disk(res["disk"])
        assert row is not None and row.machine == "m1" and row.size == SIZE
        again = await agent.call("disk_open", name="sda", path="/dev/sda", size=SIZE, uid=UID[1])
        assert again["disk"] == res["disk"]
        with pytest.raises(RequestFailed) as exc:  # the agent lost its state: never guessed
            await agent.call("disk_open", name="sda", path="/dev/sda", size=SIZE, uid=UID[2])
        assert exc.value.code == "bad-input"

    run(tmp_path, "agent", scenario)


@pytest.mark.parametrize(
    ("op", "args", "code"),
    [
        ("no_such_op", {}, "unknown-request"),
        ("pull", {"disk": 1, "applied_seq": 0}, "forbidden"),  # a master target's request
        ("status", {}, "forbidden"),  # an admin's request
        ("disk_open", {"name": "sda"}, "bad-input"),  # arguments missing
        ("disk_report", {"disk": "one", "report": {}}, "bad-input"),
    ],
)
def test_a_request_the_agent_may_not_send_is_answered_with_a_reason(tmp_path: Path, op: str, args: dict,
                                                                    code: str) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        with pytest.raises(RequestFailed) as exc:
            await agent.call(op, **args)
        assert exc.value.code == code
        # The session goes on serving: a refused request closes nothing.
        await agent.call("disk_open", name="sda", path="/dev/sda", size=SIZE, uid=UID[1])

    run(tmp_path, "agent", scenario)


def test_an_agent_touches_only_its_own_disks(tmp_path: Path) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        other = hub.registry.add_disk("m2", "sda", UID[9], "/dev/sda", SIZE)
        with pytest.raises(RequestFailed) as exc:
            await agent.call("resync_begin", disk=other.id, generation=2, mode="checksum", reason="test")
        assert exc.value.code == "forbidden"

    run(tmp_path, "agent", scenario)


def test_a_master_target_is_given_only_its_disks_with_a_key(tmp_path: Path) -> None:
    async def scenario(hub: Hub, mt: Link) -> None:
        reg = hub.registry
        mine = reg.add_disk("m1", "sda", UID[1], "/dev/sda", SIZE)
        keyless = reg.add_disk("m1", "sdb", UID[2], "/dev/sdb", SIZE)
        theirs = reg.add_disk("m2", "sda", UID[3], "/dev/sda", SIZE)
        reg.update_disk(mine.id, mt="mt1", wrapped_key=b"k", replica_path="/r/a.vmdk", replica_format="vmdk")
        reg.update_disk(keyless.id, mt="mt1", replica_path="/r/b.vmdk", replica_format="vmdk")
        reg.update_disk(theirs.id, mt="mt2", wrapped_key=b"k", replica_path="/r/c.vmdk", replica_format="vmdk")
        res = await mt.call("subscribe")
        assert [d["disk"] for d in res["disks"]] == [mine.id]
        with pytest.raises(RequestFailed) as exc:
            await mt.call("pull", disk=theirs.id, applied_seq=0)
        assert exc.value.code == "forbidden"

    run(tmp_path, "mt", scenario, name="mt1")


def test_admin_status_lists_the_disks(tmp_path: Path) -> None:
    async def scenario(hub: Hub, admin: Link) -> None:
        hub.registry.add_disk("m1", "sda", UID[1], "/dev/sda", SIZE)
        res = await admin.call("status")
        assert [(d["machine"], d["disk"], d["replication"], d["disk_state"]) for d in res["disks"]] == [
            ("m1", "sda", "Off", "Inconsistent")
        ]
        with pytest.raises(RequestFailed) as exc:
            await admin.call("pause", machine="nobody")
        assert exc.value.code == "unknown-machine"

    run(tmp_path, "admin", scenario)


# -- records: ACK, BUSY, sequence gap -------------------------------------------------------------------


def test_records_in_order_are_acknowledged_once_stored(tmp_path: Path) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        disk = await open_disk(hub, agent)
        for seq in (1, 2, 3):
            await agent.send(batch(disk, seq))
        assert await answers(agent, 3) == [Ack(disk, 1, 1), Ack(disk, 2, 1), Ack(disk, 3, 1)]
        row = hub.registry.disk(disk)
        assert row is not None and row.received_seq == 3
        assert [e.sequence for e in hub.streams[disk].cache.after(0)] == [1, 2, 3]
        await agent.send(batch(disk, 2))  # a retransmission: acknowledged again, not stored twice
        assert await answers(agent, 1) == [Ack(disk, 2, 1)]
        assert [e.sequence for e in hub.streams[disk].cache.after(0)] == [1, 2, 3]

    run(tmp_path, "agent", scenario)


def test_records_over_the_quota_are_refused_in_order_and_not_stored(tmp_path: Path) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        disk = await open_disk(hub, agent)
        for seq in (1, 2):
            await agent.send(batch(disk, seq))
        got = await answers(agent, 2)
        assert all(isinstance(m, Busy) and m.retry_after == 1.0 and "quota" in m.reason for m in got)
        assert [m.sequence for m in got if isinstance(m, Busy)] == [1, 2]
        st = hub.streams[disk]
        assert st.received_seq == 0 and st.refused_records == 2 and st.cache.after(0) == []

    run(tmp_path, "agent", scenario, quota=0)


def test_a_failed_over_machine_records_are_refused(tmp_path: Path) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        disk = await open_disk(hub, agent)
        hub.streams[disk].failed_over = True
        await agent.send(batch(disk, 1))
        (busy,) = await answers(agent, 1)
        assert isinstance(busy, Busy) and busy.retry_after == 10.0 and "failed over" in busy.reason
        assert hub.streams[disk].received_seq == 0

    run(tmp_path, "agent", scenario)


def test_a_sequence_gap_closes_the_connection(tmp_path: Path) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        disk = await open_disk(hub, agent)
        await agent.send(batch(disk, 1))
        assert await answers(agent, 1) == [Ack(disk, 1, 1)]
        await agent.send(batch(disk, 3))
        with pytest.raises(LinkClosed) as exc:
            await agent.recv()
        assert exc.value.code == "sequence-gap" and "expected sequence 2, got 3" in str(exc.value)
        assert hub.streams[disk].received_seq == 1

    run(tmp_path, "agent", scenario)


def test_records_for_an_unprotected_disk_end_the_session(tmp_path: Path) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        disk = await open_disk(hub, agent, protect=False)
        await agent.send(batch(disk, 1))
        with pytest.raises(LinkClosed) as exc:
            await agent.recv()
        assert exc.value.code == "not-protected"

    run(tmp_path, "agent", scenario)


def test_records_for_another_machine_disk_are_refused(tmp_path: Path) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        other = hub.registry.add_disk("m2", "sda", UID[9], "/dev/sda", SIZE)
        await agent.send(batch(other.id, 1))
        with pytest.raises(LinkClosed) as exc:
            await agent.recv()
        assert exc.value.code == "forbidden"

    run(tmp_path, "agent", scenario)


def send_together(agent: Link, *msgs: Batch) -> None:
    """Write the frames in one piece: the session reads them in one go, and its disk writer takes them as
    one group (the writer runs only once the read loop waits for more)."""
    agent.writer.write(b"".join(agent.conn.send(m) for m in msgs))


def test_a_gap_within_one_group_stores_nothing_of_it(tmp_path: Path) -> None:
    async def scenario(hub: Hub, agent: Link) -> None:
        disk = await open_disk(hub, agent)
        send_together(agent, batch(disk, 1), batch(disk, 2))
        assert await answers(agent, 2) == [Ack(disk, 1, 1), Ack(disk, 2, 1)]
        send_together(agent, batch(disk, 3), batch(disk, 5))
        with pytest.raises(LinkClosed) as exc:
            await agent.recv()  # no ACK for 3 first
        assert exc.value.code == "sequence-gap" and "expected sequence 4, got 5" in str(exc.value)
        assert hub.streams[disk].received_seq == 2

    run(tmp_path, "agent", scenario)


def test_records_behind_a_refused_one_are_refused_too(tmp_path: Path) -> None:
    frame = len(handshake()[0].send(batch(1, 1)))  # what one record costs in the cache

    async def scenario(hub: Hub, agent: Link) -> None:
        disk = await open_disk(hub, agent)
        assert disk == 1 and hub.cache_bytes == 0
        send_together(agent, *(batch(disk, s) for s in (1, 2, 3, 4)))
        got = await answers(agent, 4)
        assert got[:2] == [Ack(disk, 1, 1), Ack(disk, 2, 1)]
        assert [(type(m), m.sequence) for m in got[2:]] == [(Busy, 3), (Busy, 4)]

    run(tmp_path, "agent", scenario, quota=2 * frame)


@pytest.mark.parametrize("role", ["agent", "mt", "admin"])
def test_each_role_is_served_exactly_the_requests_proto_defines_for_it(tmp_path: Path, role: str) -> None:
    async def main() -> None:
        hub = make_hub(tmp_path)
        _, server = link_pair(role)
        session = {"agent": AgentSession, "mt": MTSession}.get(role)
        table = session(hub, server, "m1").handlers() if session else AdminSession(hub, server).handlers()
        defined = {op for (op, r), spec in OPS.items() if r == role and "ps" in spec.served_by}
        assert set(table) == defined
        await hub.close()

    asyncio.run(main())
