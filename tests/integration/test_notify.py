"""What systemd hears from the real daemons (sd_notify(3)): each daemon runs as a subprocess of a local
deployment with NOTIFY_SOCKET naming a real AF_UNIX datagram socket of the test, as systemd's would, and
WATCHDOG_USEC set. READY=1 comes only when the daemon serves (the process server: its port accepts
connections; master target and agent: connected, or retrying with the reason), WATCHDOG=1 at half the
interval from the event loop (a stuck loop stops it), STATUS= in true words, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from standby.admin.localdeploy import command
from tests.deploy import LocalDeployment

WATCHDOG_USEC = 1_000_000  # systemd's WatchdogSec=1s: a ping every 0.5 s


class NotifySocket:
    """systemd's end: a datagram socket that records (monotonic time, message) of every datagram; at the
    READY=1 datagram it tries the process server's port at once (`port`), to see whether it accepts."""

    def __init__(self, port: int | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="sdn-")  # short: a socket path has at most 107 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.port = port
        self.accepted_at_ready: bool | None = None
        self.got: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(65536).decode()
            except (TimeoutError, OSError):
                continue
            if "READY=1" in data.split("\n") and self.port is not None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    self.accepted_at_ready = True
                except OSError:
                    self.accepted_at_ready = False
            with self.lock:
                self.got.append((time.monotonic(), data))

    def messages(self, key: str) -> list[tuple[float, str]]:
        """(time, value) of every KEY=value received, in order."""
        with self.lock:
            got = list(self.got)
        return [(t, line.split("=", 1)[1]) for t, data in got for line in data.split("\n")
                if line.startswith(key + "=")]

    def wait_for(self, key: str, match: str = "", timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, value in self.messages(key):
                if match in value:
                    return value
            time.sleep(0.05)
        raise AssertionError(f"no {key}= containing {match!r} in {timeout} s; got {self.got}")

    def env(self, **extra: str) -> dict[str, str]:
        return dict(os.environ, NOTIFY_SOCKET=self.path, WATCHDOG_USEC=str(WATCHDOG_USEC), **extra)

    def close(self) -> None:
        self.closed = True
        self.thread.join()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def dep(tmp_path: Path) -> Iterator[LocalDeployment]:
    d = LocalDeployment(tmp_path / "deploy", cache_quota=1 << 30)
    d.init()
    yield d
    d.stop_all()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def start(dep: LocalDeployment, kind: str, directory: Path, env: dict[str, str],
          procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    log = open(dep.logs / f"{kind}-notify.log", "ab")
    p = subprocess.Popen(command(kind, "run", "--dir", str(directory)), env=env, stdout=log, stderr=log,
                         stdin=subprocess.DEVNULL)
    log.close()
    procs.append(p)
    return p


def test_the_process_server_is_ready_when_it_listens_pings_the_watchdog_and_says_stopping(dep, procs):
    ns = NotifySocket(port=dep.port)
    try:
        ps = start(dep, "ps", dep.ps_dir, ns.env(), procs)
        status = ns.wait_for("READY", "1") and ns.wait_for("STATUS")
        assert ns.accepted_at_ready is True, "READY=1 came before the port accepted connections"
        assert status == f"listening on port {dep.port}: no disks; 0 agents, 0 master targets connected"
        time.sleep(3.0)
        pings = [t for t, _ in ns.messages("WATCHDOG")]
        ready_at = ns.messages("READY")[0][0]
        recent = [t for t in pings if t > ready_at]
        assert len(recent) >= 5, pings
        gaps = [b - a for a, b in zip(recent, recent[1:], strict=False)]
        # Half of WatchdogSec=1 s; the upper bound leaves room for a loaded machine, still well under 1 s.
        assert 0.3 < sum(gaps) / len(gaps) < 0.7 and max(gaps) < 0.95, gaps
        ps.send_signal(signal.SIGTERM)
        assert ps.wait(timeout=30) == 0
        assert ns.wait_for("STOPPING", "1")
        assert ns.wait_for("STATUS", "stopping") == "stopping: received SIGTERM"
    finally:
        ns.close()


def test_the_status_follows_the_connections(dep, procs):
    """The master target is ready while the process server is down — retrying, with the reason — and says
    connected once it is; the process server's status counts it."""
    dep.start("ps")
    mt_dir = dep.enroll("mt", "mt1")
    dep.kill("ps", signal.SIGTERM)
    mt_ns, ps_ns = NotifySocket(), NotifySocket(port=dep.port)
    try:
        start(dep, "mt", mt_dir, mt_ns.env(), procs)
        mt_ns.wait_for("READY", "1")
        retrying = mt_ns.wait_for("STATUS", "retrying")
        assert f"cannot reach the process server at 127.0.0.1:{dep.port}" in retrying, retrying
        assert retrying.endswith("; applying 0 disks"), retrying
        start(dep, "ps", dep.ps_dir, ps_ns.env(), procs)
        assert mt_ns.wait_for("STATUS", "connected") == f"connected to 127.0.0.1:{dep.port}; applying 0 disks"
        assert ps_ns.wait_for("STATUS", "1 master target connected").endswith(
            "no disks; 0 agents, 1 master target connected")
        assert len(mt_ns.messages("READY")) == 1
    finally:
        mt_ns.close()
        ps_ns.close()


def test_the_agent_says_what_its_disks_do(dep, procs, tmp_path: Path):
    image = tmp_path / "disk0.img"
    image.write_bytes(b"\0" * (1 << 20))
    dep.start("ps")
    agent_dir = dep.enroll("agent", "src")
    dep.add_disk("src", "disk0", image)
    ns = NotifySocket()
    try:
        start(dep, "agent", agent_dir, ns.env(STANDBY_LOG_LEVEL="DEBUG"), procs)
        ns.wait_for("READY", "1")
        status = ns.wait_for("STATUS", "connected")
        assert status == f"connected to 127.0.0.1:{dep.port}; disks: 1 not protected (yet)", status
    finally:
        ns.close()


def test_a_stuck_event_loop_stops_the_watchdog(dep, procs):
    """Fail point service.stall: SIGUSR2 blocks the loop (the process lives on); the pings stop, so systemd
    would kill and restart it."""
    ns = NotifySocket()
    try:
        ps = start(dep, "ps", dep.ps_dir, ns.env(STANDBY_FAILPOINTS="service.stall"), procs)
        ns.wait_for("READY", "1")
        time.sleep(1.0)
        assert ns.messages("WATCHDOG"), "no WATCHDOG=1 before the stall"
        ps.send_signal(signal.SIGUSR2)
        time.sleep(0.5)  # a ping already on its way may still arrive
        stalled_at = time.monotonic()
        time.sleep(2.5)
        assert ps.poll() is None, "the daemon died instead of stalling"
        late = [t for t, _ in ns.messages("WATCHDOG") if t > stalled_at]
        assert late == [], f"{len(late)} WATCHDOG=1 after the loop stalled"
    finally:
        ns.close()


def test_a_watchdog_meant_for_another_process_is_not_pinged(dep, procs):
    """WATCHDOG_PID names the process systemd watches: a child that inherited the environment stays quiet."""
    ns = NotifySocket()
    try:
        start(dep, "ps", dep.ps_dir, ns.env(WATCHDOG_PID="1"), procs)
        ns.wait_for("READY", "1")
        time.sleep(1.5)
        assert ns.messages("WATCHDOG") == []
    finally:
        ns.close()


def test_the_watchdog_pid_of_the_daemon_itself_is_honoured(dep, procs):
    """As systemd sets it: WATCHDOG_PID is the daemon's own pid (sh's $$, which exec keeps)."""
    ns = NotifySocket()
    try:
        cmd = " ".join(f"'{a}'" for a in command("ps", "run", "--dir", str(dep.ps_dir)))
        p = subprocess.Popen(["sh", "-c", f"WATCHDOG_PID=$$ exec {cmd}"], env=ns.env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        ns.wait_for("READY", "1")
        ns.wait_for("WATCHDOG", "1", timeout=5)
    finally:
        ns.close()


def test_run_log_file(dep, procs, tmp_path: Path):
    """`run --log-file PATH` appends the daemon's log there, with timestamps; a path that cannot be opened is
    a start-up failure (exit 5) that says so."""
    bad = subprocess.run(command("ps", "run", "--dir", str(dep.ps_dir), "--log-file", str(tmp_path / "no" / "x.log")),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 5 and "cannot open the log file" in bad.stderr and "Traceback" not in bad.stderr, bad
    log = tmp_path / "ps.log"
    p = subprocess.Popen(command("ps", "run", "--dir", str(dep.ps_dir), "--log-file", str(log)),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    dep.wait_listening(p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out == err == b"", (out, err)
    lines = log.read_text().splitlines()
    assert any(" INFO standby.ps: process server ps listening on 127.0.0.1:" in line for line in lines), lines
    assert all(line[:4].isdigit() for line in lines), lines
