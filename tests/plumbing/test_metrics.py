"""plumbing.metrics: the [metrics] table, and the endpoint on the daemon's loop (GET /metrics only,
bounded requests, a collector's bug answered 500 while the daemon goes on)."""

from __future__ import annotations

import asyncio

import pytest

from standby.plumbing.errors import BadInput
from standby.plumbing.metrics import MetricsConfig, MetricsEndpoint, gauge, parse_metrics


def test_off_without_a_table_and_local_by_default():
    assert parse_metrics(None) is None
    assert parse_metrics({"port": 9464}) == MetricsConfig(9464, "127.0.0.1")
    assert parse_metrics({"port": 9464, "address": "0.0.0.0"}).address == "0.0.0.0"


@pytest.mark.parametrize("raw, why", [
    ({}, "port must be 1..65535"), ({"port": 0}, "port must be"), ({"port": "9464"}, "port must be"),
    ({"port": True}, "port must be"), ({"port": 9464, "adress": "x"}, "unknown setting"), ("9464", "a table"),
    ({"port": 9464, "address": ""}, "address must be"),
])
def test_bad_tables_are_refused_with_the_reason(raw, why):
    with pytest.raises(BadInput, match=why):
        parse_metrics(raw)


class One:
    def __init__(self) -> None:
        self.fail = False

    def collect(self):
        if self.fail:
            raise RuntimeError("a bug")
        yield gauge("standby_test_value", "A value", ("disk",), [(("d0",), 1.5), (("d1",), None)])


async def fetch(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def test_the_endpoint_serves_get_metrics_on_the_loop():
    async def main() -> None:
        one = One()
        ep = MetricsEndpoint(MetricsConfig(0), [one])
        await ep.start()
        try:
            got = await fetch(ep.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = got.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 OK") and b"text/plain; version=0.0.4" in head
            assert b'standby_test_value{disk="d0"} 1.5' in body and b"d1" not in body
            assert b"process_cpu_seconds_total" in body
            assert (await fetch(ep.port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
            assert (await fetch(ep.port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
            assert (await fetch(ep.port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400")
            assert await fetch(ep.port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 5000) == b""  # too long
            one.fail = True
            assert (await fetch(ep.port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 500")
            one.fail = False
            assert (await fetch(ep.port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
        finally:
            await ep.close()

    asyncio.run(main())


def test_each_daemons_config_reads_the_table(tmp_path):
    """ps.toml, mt.toml and agent.toml: off without [metrics]; on with it; a bad one refuses to start."""
    from standby.agent.config import AgentConfig
    from standby.mastertarget.config import MTConfig
    from standby.plumbing.config import save_toml
    from standby.plumbing.errors import NotStarted
    from standby.processserver.deployment import PSConfig

    base = {"ps": {"name": "ps"}, "mt": {"name": "mt1", "server": "127.0.0.1:9443"},
            "agent": {"name": "src", "server": "127.0.0.1:9443"}}
    for kind, load in (("ps", PSConfig.load), ("mt", MTConfig.load), ("agent", AgentConfig.load)):
        d = tmp_path / kind
        d.mkdir()
        save_toml(d / f"{kind}.toml", base[kind])
        assert load(d).metrics is None
        save_toml(d / f"{kind}.toml", {**base[kind], "metrics": {"port": 9464}})
        assert load(d).metrics == MetricsConfig(9464, "127.0.0.1")
        save_toml(d / f"{kind}.toml", {**base[kind], "metrics": {"port": 70000}})
        with pytest.raises(NotStarted, match=r"\[metrics\] port must be 1..65535"):
            load(d)
