"""The process server's side of `standby unprotect` and `standby forget` (processserver.unprotect) on a
real hub (registry and cache in a temporary directory) with fake peers: what is refused changes nothing,
unprotect asks the master target to release (keeping replicas unless asked) and then drops the disks'
caches and rows, forget revokes an identity only when nothing depends on it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from standby.plumbing.errors import RequestFailed
from standby.processserver.hub import Hub
from standby.processserver.unprotect import forget, unprotect
from standby.proto.enums import ErrorCode
from tests.processserver.test_sessions import UID, make_hub


class FakeLink:
    def __init__(self, answer: dict[str, Any] | None = None) -> None:
        self.answer = answer
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.closed: tuple[str | None, str] | None = None

    async def request(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        self.requests.append((op, args))
        if self.answer is None:
            raise RequestFailed(ErrorCode.FAILED, "disk full")
        return self.answer

    async def close(self, code: str | None = None, reason: str = "") -> None:
        self.closed = (code, reason)


class FakeMT:
    def __init__(self, name: str, answer: dict[str, Any] | None) -> None:
        self.name = name
        self.link = FakeLink(answer)
        self.stopped: list[int] = []

    def sending(self, disk: int) -> bool:
        return disk not in self.stopped

    def stop_sender(self, disk: int) -> None:
        self.stopped.append(disk)


class FakeAgent:
    def __init__(self, hub: Hub, machine: str) -> None:
        self.link = FakeLink()
        self.hub, self.machine = hub, machine

    async def _close(self, code: str | None = None, reason: str = "") -> None:
        self.link.closed = (code, reason)
        del self.hub.agent_sessions[self.machine]  # as AgentSession.run's finally does


def setup(tmp_path: Path) -> tuple[Hub, int]:
    hub = make_hub(tmp_path)
    hub.registry.add_machine("web01", "agent", 1, b"pem")
    hub.registry.add_machine("mt1", "mt", 2, b"pem")
    row = hub.registry.add_disk("web01", "sda", UID[1], "/dev/sda", 1 << 20)
    hub.registry.update_disk(row.id, mt="mt1", wrapped_key=b"k", replica_path="/r/web01-sda.img", replica_format="raw")
    hub.open_stream(hub.registry.disk(row.id) or row)
    return hub, row.id


def run(coro_fn: Any) -> None:
    asyncio.run(coro_fn())


def test_unprotect_refused_without_the_master_target_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        hub, disk = setup(tmp_path)
        with pytest.raises(RequestFailed) as exc:
            await unprotect(hub, "web01")
        assert exc.value.code == ErrorCode.UNREACHABLE and "nothing was changed" in str(exc.value)
        row = hub.registry.disk(disk)
        assert row is not None and row.mt == "mt1" and row.wrapped_key == b"k"
        assert (tmp_path / "cache" / f"disk-{disk}").is_dir()
        await hub.close()

    run(main)


def test_unprotect_releases_then_drops_cache_and_rows(tmp_path: Path) -> None:
    async def main() -> None:
        hub, disk = setup(tmp_path)
        answer = {"disks": [{"disk": disk, "replica": "/r/web01-sda.img", "journal": "/j/u.unprotected-1",
                             "removed": []}]}
        mt = hub.mt_sessions["mt1"] = FakeMT("mt1", answer)  # type: ignore[assignment]
        agent = FakeAgent(hub, "web01")
        agent.link.close = agent._close  # type: ignore[method-assign]
        hub.agent_sessions["web01"] = agent  # type: ignore[assignment]
        res = await unprotect(hub, "web01")
        assert res == {"machine": "web01", "disks": [{"disk": "sda", "mt": "mt1", "replica": "/r/web01-sda.img",
                                                      "journal": "/j/u.unprotected-1", "removed": []}]}
        assert mt.link.requests == [("release", {"disks": [disk], "delete": False})]
        assert mt.stopped == [disk]
        assert agent.link.closed is not None and agent.link.closed[0] == "unprotected"
        assert hub.registry.disk(disk) is None and disk not in hub.streams
        assert not (tmp_path / "cache" / f"disk-{disk}").exists()
        assert hub.registry.machine("web01") is not None  # still enrolled
        with pytest.raises(RequestFailed) as exc:  # nothing left to unprotect
            await unprotect(hub, "web01")
        assert exc.value.code == ErrorCode.BAD_INPUT
        await hub.close()

    run(main)


def test_unprotect_delete_is_passed_on_and_a_failed_release_is_said(tmp_path: Path) -> None:
    async def main() -> None:
        hub, disk = setup(tmp_path)
        mt = hub.mt_sessions["mt1"] = FakeMT("mt1", None)  # type: ignore[assignment]
        with pytest.raises(RequestFailed) as exc:
            await unprotect(hub, "web01", delete_replicas=True)
        assert mt.link.requests == [("release", {"disks": [disk], "delete": True})]
        assert "no longer protected" in str(exc.value) and "disk full" in str(exc.value)
        assert hub.registry.disk(disk) is None  # the process server's part is done all the same
        await hub.close()

    run(main)


def test_forget(tmp_path: Path) -> None:
    async def main() -> None:
        hub, disk = setup(tmp_path)
        for who, needle in (("web01", "still protected"), ("mt1", "still holds the replicas of web01")):
            with pytest.raises(RequestFailed) as exc:
                await forget(hub, who)
            assert exc.value.code == ErrorCode.REFUSED and needle in str(exc.value)
        assert hub.registry.machine("web01") is not None
        with pytest.raises(RequestFailed) as exc:
            await forget(hub, "nobody")
        assert exc.value.code == ErrorCode.UNKNOWN_MACHINE
        hub.registry.update_disk(disk, mt=None, wrapped_key=None)  # unprotected
        mt = hub.mt_sessions["mt1"] = FakeMT("mt1", {})  # type: ignore[assignment]
        await forget(hub, "web01")
        assert hub.registry.machine("web01") is None and hub.registry.disks(machine="web01") == []
        await forget(hub, "mt1")
        assert hub.registry.machine("mt1") is None
        assert mt.link.closed is not None and mt.link.closed[0] == "forbidden"
        await hub.close()

    run(main)
