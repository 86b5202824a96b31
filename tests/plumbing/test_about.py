"""`about` (standby.plumbing.about): an agent or a master target tells the process server which machine it runs
on (SMBIOS system UUID and host name) at the start of each session; the process server keeps it in its
machines table, and `standby machines` shows it. The UUID comes from the firmware unless the config says
otherwise; a process server that does not know the request, or any failure of it, never ends a session."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from standby.agent.config import AgentConfig
from standby.mastertarget.config import DEFAULT_BY_ID_DIR, MTConfig
from standby.plumbing.about import AboutReporter, parse_system_uuid, read_system_uuid
from standby.plumbing.config import load_toml, save_toml
from standby.plumbing.errors import BadInput, NotStarted, RequestFailed
from standby.plumbing.link import Link
from standby.plumbing.serve import serve_request
from standby.processserver.agentsession import AgentSession
from standby.processserver.hub import Hub
from standby.processserver.mtsession import MTSession
from standby.proto.enums import ErrorCode
from standby.proto.messages import Reply, Request
from tests.deploy import LocalDeployment
from tests.processserver.fakelink import link_pair
from tests.processserver.test_sessions import make_hub

U1 = "4213a1b2-5c6d-7e8f-9a0b-1c2d3e4f5a6b"
U2 = "564d7f1e-0a2b-3c4d-5e6f-708192a3b4c5"


def dmi(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "product_uuid"
    p.write_text(text)
    return p


# ---- where the UUID comes from ------------------------------------------------------------------------------


def test_the_firmware_uuid_is_read_and_made_canonical(tmp_path: Path) -> None:
    assert read_system_uuid(dmi(tmp_path, U1.upper() + "\n")) == U1


@pytest.mark.parametrize("text", ["00000000-0000-0000-0000-000000000000\n", "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF\n",
                                  "Not Settable\n", "", "\x00\xff"])
def test_a_placeholder_or_junk_from_the_firmware_is_unknown(tmp_path: Path, text: str) -> None:
    assert read_system_uuid(dmi(tmp_path, text)) == ""


def test_a_missing_or_unreadable_firmware_uuid_is_unknown(tmp_path: Path) -> None:
    assert read_system_uuid(tmp_path / "absent") == ""
    (tmp_path / "dir").mkdir()
    assert read_system_uuid(tmp_path / "dir") == ""  # unreadable: a directory (root reads every file)
    assert read_system_uuid(dmi(tmp_path, U1) / "below-a-file") == ""


def test_the_config_wins_over_the_firmware(tmp_path: Path) -> None:
    firmware = dmi(tmp_path, U1)
    assert AboutReporter(None, firmware).about.system_uuid == U1
    assert AboutReporter(U2, firmware).about.system_uuid == U2
    assert AboutReporter("", firmware).about.system_uuid == ""  # the operator says: unknown
    assert AboutReporter(None, tmp_path / "absent").about.system_uuid == ""
    assert AboutReporter(None, firmware).about.hostname  # this machine's name


def test_the_config_key_is_checked() -> None:
    assert parse_system_uuid(None) is None
    assert parse_system_uuid("") == ""
    assert parse_system_uuid(U1.upper()) == U1
    assert parse_system_uuid("{" + U1 + "}") == U1
    for bad in ("not-a-uuid", "00000000-0000-0000-0000-000000000000", 5, ["x"], True):
        with pytest.raises(BadInput):
            parse_system_uuid(bad)


def test_agent_toml_and_mt_toml_take_system_uuid(tmp_path: Path) -> None:
    agent, mt = tmp_path / "agent", tmp_path / "mt"
    agent.mkdir()
    mt.mkdir()
    (agent / "agent.toml").write_text(f'name = "web01"\nserver = "ps:9443"\nsystem_uuid = "{U1.upper()}"\n')
    (mt / "mt.toml").write_text(f'name = "mt01"\nserver = "ps:9443"\nsystem_uuid = "{U2}"\n'
                                'disk_by_id_dir = "/srv/by-id"\n')
    assert AgentConfig.load(agent).system_uuid == U1
    m = MTConfig.load(mt)
    assert m.system_uuid == U2 and m.disk_by_id_dir == Path("/srv/by-id")
    (mt / "mt.toml").write_text('name = "mt01"\nserver = "ps:9443"\n')
    m = MTConfig.load(mt)
    assert m.system_uuid is None and m.disk_by_id_dir == DEFAULT_BY_ID_DIR == Path("/dev/disk/by-id")
    for bad in ('system_uuid = "nope"', 'disk_by_id_dir = "relative/by-id"', "disk_by_id_dir = 5"):
        (mt / "mt.toml").write_text(f'name = "mt01"\nserver = "ps:9443"\n{bad}\n')
        with pytest.raises(NotStarted, match="system_uuid|disk_by_id_dir"):
            MTConfig.load(mt)
    (agent / "agent.toml").write_text('name = "web01"\nserver = "ps:9443"\nsystem_uuid = "nope"\n')
    with pytest.raises(NotStarted, match="system_uuid"):
        AgentConfig.load(agent)


# ---- telling the process server -------------------------------------------------------------------------------


async def _pair(hub: Hub, role: str, name: str, older: bool = False) -> tuple[Link, asyncio.Task[None]]:
    """A client link to a session of `role` on `hub`; `older`: a process server that serves nothing (its
    answer to every request is unknown-request, as one from before `about` answers it)."""
    client, server = link_pair(role)

    async def older_ps() -> None:
        while True:
            msg = await server.recv()
            if isinstance(msg, Request):
                await serve_request(server, msg, role, "ps", None)

    if older:
        session = older_ps()
    elif role == "agent":
        session = AgentSession(hub, server, name).run()
    else:
        session = MTSession(hub, server, name).run()
    task = asyncio.create_task(session)

    async def reader() -> None:
        while True:
            msg = await client.recv()
            if isinstance(msg, Reply):
                client.deliver(msg)

    t2 = asyncio.create_task(reader())
    task.add_done_callback(lambda _: t2.cancel())
    return client, task


def _run(tmp_path: Path, scenario: Any) -> None:
    async def main() -> None:
        hub = make_hub(tmp_path)
        hub.registry.add_machine("web01", "agent", 1, b"PEM")
        hub.registry.add_machine("mt01", "mt", 2, b"PEM")
        try:
            await asyncio.wait_for(scenario(hub), 10)
        finally:
            await hub.close()

    asyncio.run(main())


def test_agent_and_master_target_sessions_store_what_they_say(tmp_path: Path) -> None:
    async def scenario(hub: Hub) -> None:
        for role, name, uid in (("agent", "web01", U1), ("mt", "mt01", "")):
            client, task = await _pair(hub, role, name)
            reporter = AboutReporter(uid)
            await reporter.tell(client)
            m = hub.registry.machine(name)
            assert m is not None and m["system_uuid"] == uid and m["hostname"] == reporter.about.hostname
            assert m["reported_at"] is not None
            await client.close()
            task.cancel()

    _run(tmp_path, scenario)


def test_an_older_process_server_is_said_once_and_nothing_breaks(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(hub: Hub) -> None:
        client, task = await _pair(hub, "agent", "web01", older=True)
        reporter = AboutReporter(U1)
        with caplog.at_level(logging.INFO, logger="standby.about"):
            await reporter.tell(client)
            await reporter.tell(client)  # the next session's
        said = [r for r in caplog.records if r.name == "standby.about"]
        assert len(said) == 1 and said[0].levelno == logging.INFO and "older" in said[0].getMessage()
        assert hub.registry.machine("web01")["system_uuid"] is None  # type: ignore[index]
        assert not task.done()  # the session goes on
        await client.close()
        task.cancel()

    _run(tmp_path, scenario)


def test_any_other_failure_is_a_warning_never_an_exception(caplog: pytest.LogCaptureFixture) -> None:
    class Failing:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        async def request(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
            raise self.exc

    reporter = AboutReporter(U1)
    with caplog.at_level(logging.INFO, logger="standby.about"):
        for exc in (RequestFailed(ErrorCode.FORBIDDEN, "no"), TimeoutError(), ValueError("bug")):
            asyncio.run(reporter.tell(Failing(exc)))  # type: ignore[arg-type]
    assert [r.levelno for r in caplog.records if r.name == "standby.about"] == [logging.WARNING] * 3


# ---- a real deployment ------------------------------------------------------------------------------------------


def test_a_deployment_shows_each_machine_s_system_uuid(tmp_path: Path) -> None:
    """Daemons as separate processes: the agent configured with system_uuid, the master target with "" (its
    firmware's would be read otherwise: the test must not depend on the machine it runs on); `standby
    machines` shows both, --json and in words."""
    dep = LocalDeployment(tmp_path / "deploy", cache_quota=1 << 30)
    dep.init()
    dep.start("ps")
    try:
        dep.enroll("mt", "mt1")
        dep.enroll("agent", "web01")
        dep.set_agent_option("web01", system_uuid=U1.upper())
        conf = dep.root / "mt-mt1" / "mt.toml"
        raw = load_toml(conf)
        raw["system_uuid"] = ""
        save_toml(conf, raw)
        dep.start("mt", "mt1")
        dep.start("agent", "web01")
        deadline = time.monotonic() + 60
        listed: dict[str, Any] = {}
        while time.monotonic() < deadline:
            res = dep.cli("machines", "--json")
            assert res.returncode == 0, res.stderr
            listed = {m["name"]: m for m in json.loads(res.stdout)["machines"]}
            if all(m["reported_at"] for m in listed.values()):
                break
            time.sleep(0.2)
        assert listed["web01"]["system_uuid"] == U1 and listed["web01"]["hostname"]
        assert listed["mt1"]["system_uuid"] == "" and listed["mt1"]["reported_at"]
        words = dep.cli("machines").stdout.splitlines()
        assert any(line.startswith("web01") and f"system UUID {U1}" in line for line in words), words
        assert any(line.startswith("mt1") and "system UUID unknown" in line for line in words), words
    finally:
        dep.stop_all()
