"""plumbing.notify and the stop limit of plumbing.service, against a real datagram socket standing in for
systemd's (the daemons themselves: tests/integration/test_notify.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time

import pytest

from standby.plumbing.notify import Notifier, sd_notify, watchdog_interval
from standby.plumbing.service import within_stop_limit


@pytest.fixture
def systemd():
    d = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.5)
    yield path, s
    s.close()
    os.unlink(path)
    os.rmdir(d)


def received(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except TimeoutError:
            return out


def test_watchdog_interval_as_sd_watchdog_enabled():
    pid = os.getpid()
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(pid)}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(pid + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_outside_systemd_nothing_is_sent():
    assert sd_notify("READY=1", {}) is False
    Notifier({}).ready(lambda: "fine")  # no socket, no error


def test_ready_once_then_status_only_when_it_changes_and_nothing_after_stopping(systemd):
    path, s = systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    text = "one"
    n.ready(lambda: text)
    n.ready(lambda: text)  # the same words: nothing new to say
    text = "two\nlines"
    n.ready(lambda: text)
    n.stopping("received SIGTERM")
    n.status("after")
    assert received(s) == ["READY=1\nSTATUS=one", "STATUS=two lines", "STOPPING=1\nSTATUS=stopping: received SIGTERM"]


def test_a_failing_status_line_keeps_the_last_words(systemd):
    path, s = systemd
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready(lambda: "fine")
    n.ready(lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    assert received(s) == ["READY=1\nSTATUS=fine"]


def test_an_abstract_socket_is_reached(systemd):
    name = f"standby-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(1)
        assert sd_notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"WATCHDOG=1"


def test_a_shutdown_past_the_limit_is_cancelled_with_the_tasks_dumped(caplog):
    async def main() -> float:
        stop = asyncio.Event()
        cancelled = asyncio.Event()

        async def stuck_shutdown() -> None:
            await stop.wait()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        asyncio.get_running_loop().call_later(0.1, stop.set)
        t0 = time.monotonic()
        await within_stop_limit(stuck_shutdown(), stop, "standby-test", limit=0.3)  # returns: the stop goes on
        assert cancelled.is_set()
        return time.monotonic() - t0

    with caplog.at_level(logging.WARNING, logger="standby.service"):
        took = asyncio.run(main())
    assert 0.35 < took < 5, took
    assert "shutdown still not done after 0 s" in caplog.text and "stuck_shutdown" in caplog.text
