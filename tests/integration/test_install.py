"""systemd/install.sh (issue 11): all three roles installed into temporary roots on this machine, the
installed daemons (from the installed venvs, started with the command the script prints — not from the
checkout) replicating a loop device end to end; an upgrade in place while replication runs resumes without a
resync; uninstall leaves nothing but the state.

Where systemd is not PID 1 (here and in CI) the script does not start services: it prints the exact command,
which is what this test runs. The units themselves are tested under a real systemd elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tools import need

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "systemd" / "install.sh"
MiB = 1 << 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the install script needs root")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # --system-site-packages: the venv takes the dependencies this Python already has (no download here).
    res = subprocess.run(["bash", str(INSTALL), "--from", str(ROOT), "--system-site-packages", *args],
                         capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, f"install.sh {' '.join(args)} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
    return res


def start_command(out: str) -> list[str]:
    m = re.search(r"(?:start it|restart the running \S+) with: (.+)$", out, re.M)
    assert m, out
    return m.group(1).split()


class Daemons:
    """The installed daemons this test started (ended by PID, logs kept for the failure message)."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, {}  # type: ignore[var-annotated]

    def start(self, role: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{role}.log", "a")  # noqa: SIM115 - closed with the process
        self.procs[role] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)

    def stop(self, role: str) -> None:
        proc, log = self.procs.pop(role)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    def stop_all(self) -> None:
        for role in list(self.procs):
            self.stop(role)

    def tail(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.stop_all()


def test_install_replicate_upgrade_uninstall(tmp_path: Path, daemons: Daemons, make_loop) -> None:
    need("losetup")
    roots = {r: tmp_path / f"root-{r}" for r in ("ps", "mt", "agent")}
    port = free_port()

    # The process server: a new deployment.
    out = install("--role", "ps", "--root", str(roots["ps"]), "--name", "ps01", "--host", "127.0.0.1",
                  "--listen", "127.0.0.1", "--port", str(port)).stdout
    fingerprint = re.search(r"CA fingerprint:\s+(sha256:[0-9a-f]+)", out).group(1)  # type: ignore[union-attr]
    ps_state = roots["ps"] / "var/lib/standby/ps"
    assert (roots["ps"] / "etc/standby/ps.toml").resolve() == ps_state / "ps.toml"
    unit = (roots["ps"] / "etc/systemd/system/standby-ps.service").read_text()
    assert f"{roots['ps']}/opt/standby/venv/bin/standby-ps" in unit  # the unit starts the installed command
    ps_cmd = start_command(out)
    assert ps_cmd[0] == f"{roots['ps']}/opt/standby/venv/bin/standby-ps"
    daemons.start("ps", ps_cmd)
    passphrase = ps_state / "enroll-passphrase"
    common = ["--server", f"127.0.0.1:{port}", "--fingerprint", fingerprint, "--passphrase-file", str(passphrase)]

    # The master target: its retention volume shares this machine's disk (accepted), replicas beside it.
    retention = tmp_path / "retention"
    retention.mkdir()
    out = install("--role", "mt", "--root", str(roots["mt"]), "--name", "mt01", *common,
                  "--retention-dir", str(retention), "--shared-volume").stdout
    daemons.start("mt", start_command(out))

    # The agent, with one disk holding data.
    dev = make_loop(32 * MiB, "source")
    with open(dev, "r+b") as f:
        f.write(os.urandom(8 * MiB))
        f.seek(20 * MiB)
        f.write(b"standby" * 100_000)
    out = install("--role", "agent", "--root", str(roots["agent"]), "--name", "web01", *common,
                  "--disk", f"disk0={dev}").stdout
    daemons.start("agent", start_command(out))

    standby = [f"{roots['ps']}/opt/standby/venv/bin/standby", "--admin", str(ps_state / "admin")]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*standby, *args], capture_output=True, text=True, timeout=120)

    def disk0() -> dict | None:
        res = cli("status", "--json")
        if res.returncode != 0:
            return None
        st = json.loads(res.stdout)
        d = next((d for d in st["disks"] if d["machine"] == "web01"), None)
        return {**d, "mts": st["master_targets"]} if d else None

    def wait(pred, what: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        d = None
        while time.monotonic() < deadline:
            d = disk0()
            if d is not None and pred(d):
                return d
            time.sleep(0.3)
        raise AssertionError(f"{what} within {timeout} s; last status {d}\n{daemons.tail()}")

    wait(lambda d: "mt01" in d["mts"], "the agent's disk reported and the master target connected")
    replicas = tmp_path / "replicas"
    replicas.mkdir()
    res = cli("protect", "web01", "--mt", "mt01", "--format", "raw", "--replica-dir", str(replicas))
    assert res.returncode == 0, res.stderr + daemons.tail()
    wait(lambda d: d["replication"] == "Delta", "initial replication", 180)

    # Upgrade in place while replicating: every role again, the same state and identity, daemons restarted.
    agent_log = tmp_path / "agent.log"
    accepted = agent_log.read_text().count("clean-stop record accepted")
    for role, root in roots.items():
        extra = ["--disk", f"disk0={dev}"] if role == "agent" else []
        out = install("--role", role, "--root", str(root), *extra).stdout
        assert "keeping the state and identity" in out, out
        daemons.stop(role)
        daemons.start(role, start_command(out))
    # The upgraded agent takes its clean stop and tracks again (a write before that would rightly be a resync).
    deadline = time.monotonic() + 60
    while agent_log.read_text().count("clean-stop record accepted") == accepted:
        assert time.monotonic() < deadline, "the upgraded agent did not take its clean stop\n" + daemons.tail()
        time.sleep(0.2)
    with open(dev, "r+b") as f:  # writes after the upgrade are replicated as deltas
        f.seek(4 * MiB)
        f.write(os.urandom(1 * MiB))
        os.fsync(f.fileno())
    since = time.time()
    d = wait(lambda d: d["replication"] == "Delta" and (d.get("last_point_time") or 0) > since + 0.5
             and d["backlog_bytes"] == 0, "a point after the upgrade", 120)
    # No resync: none asked, none done, none running (a lost identity or state would have forced one).
    assert d["last_resync"] is None and d["resync"] is None and d["resync_requested"] is None, d

    # The replica equals the source once the writes are applied (the source is quiet now).
    daemons.stop("agent")
    replica = next(replicas.glob("web01-disk0*"))
    with open(dev, "rb") as f:
        source = f.read()
    assert replica.read_bytes() == source

    # Uninstall the agent: software and unit go, the state (identity, disk keys) stays.
    subprocess.run([f"{roots['agent']}/opt/standby/venv/bin/standby-agent", "cleanup", "--dir",
                    str(roots["agent"] / "var/lib/standby/agent")], capture_output=True, timeout=60)
    out = install("--role", "agent", "--root", str(roots["agent"]), "--uninstall").stdout
    assert "its state stays" in out
    left = sorted(str(p.relative_to(roots["agent"])) for p in roots["agent"].rglob("*") if not p.is_dir())
    assert left and all(p.startswith("var/lib/standby/agent/") for p in left), left
    install("--role", "agent", "--root", str(roots["agent"]), "--uninstall", "--purge")
    assert not (roots["agent"] / "var/lib/standby/agent").exists()


def test_refusals_come_before_any_change(tmp_path: Path) -> None:
    root = tmp_path / "root"
    res = install("--role", "mt", "--root", str(root), check=False)
    assert res.returncode == 2 and "needs --server, --fingerprint and --passphrase-file" in res.stderr
    assert not root.exists()
    res = install("--role", "web", "--root", str(root), check=False)
    assert res.returncode == 2 and "unknown role 'web'" in res.stderr
    res = install("--role", "mt", "--root", str(root), "--server", "127.0.0.1:1", "--fingerprint", "sha256:00",
                  "--passphrase-file", "/etc/hostname", "--retention-dir", str(tmp_path / "nope"), check=False)
    assert res.returncode == 2 and "retention volume" in res.stderr and "does not exist" in res.stderr
    with socket.socket() as s:  # a port in use
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        res = install("--role", "ps", "--root", str(root), "--listen", "127.0.0.1", "--port", str(busy),
                      check=False)
    assert res.returncode == 2 and f"port {busy} is in use" in res.stderr
    res = install("--role", "ps", "--root", str(root), "--python", sys.executable + "-missing", check=False)
    assert res.returncode == 2 and "not found" in res.stderr
    assert not root.exists()  # nothing was changed by any refusal
