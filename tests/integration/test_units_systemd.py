"""The units of systemd/ under a real systemd (issue 11), booted as PID 1 of private namespaces by
tests/systemdns.py: each daemon is active only once it said READY=1, is restarted after kill -9, is killed and
restarted by the watchdog when it stalls, and stops cleanly (the agent writes its clean-stop record); the
three services replicate a loop device end to end.

The units are this checkout's, installed as written, except:
- their Exec lines run this venv's commands (the units name the installed ones): the command's directory is
  replaced, its arguments are kept;
- a drop-in of test-only settings, each with its reason (`harness_dropin`): ProtectHome=read-only when this
  venv's interpreter lives in a home (pyenv under /root), the checkout bound back in under PrivateTmp= when
  it lives in /tmp, WatchdogSec= at most 10 s (the units say 30 s; the daemons ping at half of what systemd
  gives them, so the code tested is the same), and the fail point that stalls a daemon's event loop armed.
The deployment is made inside the namespaces with the command-line tools, as admin/localdeploy.py does
outside (init, enroll, add-disk, protect), at the paths the units use. Those paths are empty host directories
bound in (under tmp_path/root): the host's own /var/lib/standby, if any, is never seen, and a failed test
leaves its state for reading. The loop device is made on the host and only its node is bound in.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from standby.agent.cli import TRACEFS
from standby.agent.config import DEFAULT_DIR as AGENT_DIR
from standby.agent.disk import trace_instance
from standby.mastertarget.config import DEFAULT_DIR as MT_DIR
from standby.mastertarget.config import DEFAULT_RETENTION_DIR
from standby.plumbing import failpoints
from standby.plumbing.config import DEFAULT_PORT, load_toml, save_toml
from standby.plumbing.durable import load_json
from standby.processserver.deployment import DEFAULT_DIR as PS_DIR
from tests import systemdns
from tests.systemdns import SystemdNamespace

REPO = Path(__file__).resolve().parents[2]
ROLES = ("ps", "mt", "agent")
UNIT_FILES = {role: REPO / "systemd" / f"standby-{role}.service" for role in ROLES}
COMMANDS = {"ps": "standby-ps", "mt": "standby-mt", "agent": "standby-agent"}
DEFAULT_DIRS = {"ps": PS_DIR, "mt": MT_DIR, "agent": AGENT_DIR}
BIN = Path(sys.executable).parent  # this venv's commands
MiB = 1 << 20
SERVER = f"127.0.0.1:{DEFAULT_PORT}"  # the namespace has a network of its own: the default port is free
STALL = "service.stall"  # the fail point that blocks a daemon's event loop on SIGUSR2
WATCHDOG = 10.0  # seconds: the longest WatchdogSec= the tests wait for (harness_dropin)

REASON = systemdns.unavailable() or (
    "systemd/standby-*.service not in this checkout" if not all(p.exists() for p in UNIT_FILES.values()) else None
)
pytestmark = [pytest.mark.root, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
EXEC = re.compile(r"^(Exec\w+\s*=\s*)([-@:+!|]*)(\S+)(.*)$")
TIMESPAN = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def seconds(span: str) -> float:
    """A systemd time span ("10", "5s", "1min 30s", "500ms") in seconds."""
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)\s*([a-z]*)", span):
        total += float(number) * TIMESPAN.get(unit or "s", 1)
    return total


@dataclass
class Unit:
    role: str
    text: str

    @property
    def name(self) -> str:
        return f"standby-{self.role}.service"

    def values(self, key: str) -> list[str]:
        return [v.strip() for k, v in re.findall(r"^\s*(\w+)\s*=(.*)$", self.text, re.M) if k == key]

    @property
    def state_dir(self) -> Path:
        """Where the daemon keeps its state: ExecStart's --dir, else the command's default."""
        argv = shlex.split(self.values("ExecStart")[-1].lstrip("-@:+!|"))
        for i, word in enumerate(argv[:-1]):
            if word == "--dir":
                return Path(argv[i + 1])
            if word.startswith("--dir="):
                return Path(word.split("=", 1)[1])
        return DEFAULT_DIRS[self.role]

    @property
    def writable(self) -> list[Path]:
        return [Path(p.lstrip("-+")) for v in self.values("ReadWritePaths") for p in v.split()]

    @property
    def user(self) -> str:
        return (self.values("User") or ["root"])[-1]

    @property
    def watchdog(self) -> float:
        return seconds((self.values("WatchdogSec") or ["0"])[-1])

    def localised(self) -> str:
        """The unit with its Exec lines running this venv's commands."""
        def swap(line: str) -> str:
            m = EXEC.match(line)
            if not m or not (Path(m[3]).name.startswith(("standby", "python"))):
                return line
            return f"{m[1]}{m[2]}{BIN / Path(m[3]).name}{m[4]}"

        return "\n".join(swap(line) for line in self.text.splitlines()) + "\n"


def harness_dropin(unit: Unit) -> str:
    """Test-only settings, each one for a reason of the test's, not of the unit's."""
    lines = ["[Service]"]
    code = {REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.executable).resolve()}
    if any(p.is_relative_to("/root") or p.is_relative_to("/home") for p in code):
        # This venv's interpreter lives in a home directory (pyenv under /root); installs put theirs in /opt.
        lines.append("ProtectHome=read-only")
    for p in sorted(p for p in code if p.is_relative_to("/tmp") or p.is_relative_to("/var/tmp")):
        # A checkout (or venv) under /tmp would vanish behind PrivateTmp=: bound back in.
        lines.append(f"BindReadOnlyPaths={p}")
    if unit.watchdog > WATCHDOG:
        # The daemon pings at half of whatever WATCHDOG_USEC systemd gives it: a shorter period tests the same
        # code and keeps each stall below half a minute (the units say 30 s).
        lines.append(f"WatchdogSec={WATCHDOG:g}s")
    if STALL in failpoints.FAILPOINTS:
        # Arms the fail point that lets SIGUSR2 block the event loop: the watchdog's real case, a stuck loop.
        lines.append(f"Environment=STANDBY_FAILPOINTS={STALL}")
    return "\n".join(lines) + "\n"


def load_units() -> dict[str, Unit]:
    return {role: Unit(role, UNIT_FILES[role].read_text()) for role in ROLES}


def mt_paths(unit: Unit) -> tuple[Path, Path]:
    """(retention, replica directory) of the master target: among the unit's ReadWritePaths= when it names
    them, else the defaults (the retention volume's, and replicas beside the state)."""
    others = [p for p in unit.writable if not p.is_relative_to(unit.state_dir)]
    replicas = next((p for p in others if "replica" in str(p)), unit.state_dir / "replicas")
    retention = next((p for p in others if "replica" not in str(p)), DEFAULT_RETENTION_DIR)
    return retention, replicas


class Inside:
    """The deployment inside the namespaces, made and driven with the command-line tools."""

    def __init__(self, sd: SystemdNamespace, units: dict[str, Unit]) -> None:
        self.sd = sd
        self.units = units
        self.dirs = {role: u.state_dir for role, u in units.items()}
        self.retention, self.replicas = mt_paths(units["mt"])
        self.fingerprint = ""
        self.dev = ""  # the agent's disk0: a loop device of the host

    def cli(self, command: str, *args: str, timeout: float = 120) -> str:
        res = self.sd.run(str(BIN / command), *args, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"{command} {shlex.join(args)} failed ({res.returncode}):\n{res.stderr}{res.stdout}")
        return res.stdout

    def init(self) -> None:
        out = self.cli("standby-ps", "init", "--dir", str(self.dirs["ps"]), "--name", "ps", "--host", "127.0.0.1",
                       "--listen", "127.0.0.1", "--cache-quota", str(1 << 30))
        self.fingerprint = next(line.split()[-1] for line in out.splitlines() if "CA fingerprint" in line)
        self.own("ps")

    def enroll(self, role: str, name: str) -> None:
        extra: list[str] = []
        if role == "mt":
            for d in (self.retention, self.replicas):
                self.sd.run("mkdir", "-p", str(d), check=True)
            extra = ["--retention-dir", str(self.retention), "--shared-volume"]
        self.cli(COMMANDS[role], "enroll", "--server", SERVER, "--fingerprint", self.fingerprint,
                 "--passphrase-file", str(self.dirs["ps"] / "enroll-passphrase"), "--name", name,
                 "--dir", str(self.dirs[role]), *extra)
        if role == "mt":  # a small reserve on the shared volume, as admin/localdeploy.py keeps
            conf = self.sd.path(self.dirs["mt"] / "mt.toml")
            raw = load_toml(conf)
            raw.setdefault("retention", {})["reserve"] = "64M"
            save_toml(conf, raw)
        self.own(role)

    def own(self, role: str) -> None:
        """A unit that runs as a user of its own gets its state (an install script chowns the same)."""
        user = self.units[role].user
        if user != "root":
            paths = [self.dirs[role], *((self.retention, self.replicas) if role == "mt" else ())]
            self.sd.run("chown", "-R", f"{user}:", *map(str, paths), check=True)

    def admin(self, *args: str) -> str:
        return self.cli("standby", "--admin", str(self.dirs["ps"] / "admin"), "--server", SERVER, *args)

    def status(self) -> dict[str, Any]:
        return json.loads(self.admin("status", "--json"))

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if predicate(last):
                    return last
            except AssertionError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"not {what} within {timeout} s; last status: {last}")


def prepare_users(sd: SystemdNamespace, units: dict[str, Unit]) -> None:
    """Users the units name, made in the namespace's overlay (the install script's job on a machine); and
    the way to this venv's interpreter opened to them when it lives under /root (mode 700): only the
    overlay's upper layer changes, on its tmpfs, never the host's /root."""
    users = {u.user for u in units.values()} - {"root"}
    for user in sorted(users):
        if sd.run("id", user).returncode != 0:
            sd.run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user, check=True)
    if users and Path(sys.executable).resolve().is_relative_to("/root"):
        sd.run("chmod", "o+x", "/root", check=True)


@pytest.fixture
def inside(tmp_path: Path, make_loop: Callable[..., str]) -> Iterator[Inside]:
    """The namespaces booted with the three units installed, the process server initialised and running,
    the master target and agent enrolled, the agent given a loop device of the host as disk0."""
    units = load_units()
    dev = make_loop(64 * MiB, "source")
    retention, replicas = mt_paths(units["mt"])
    state = sorted({*(u.state_dir for u in units.values()), retention, replicas})
    tops = [p for p in state if not any(p != q and p.is_relative_to(q) for q in state)]
    root = tmp_path / "root"
    for top in tops:
        (root / top.relative_to("/")).mkdir(parents=True)
    files: list[Path | tuple[str, str]] = []
    for u in units.values():
        files += [(u.name, u.localised()), (f"{u.name}.d/harness.conf", harness_dropin(u))]
    with SystemdNamespace(tmp_path / "ns", units=files, binds=[(root / t.relative_to("/"), t) for t in tops],
                          devices=[dev]) as sd:
        prepare_users(sd, units)
        dep = Inside(sd, units)
        dep.dev = dev
        try:
            dep.init()
            sd.systemctl("start", units["ps"].name)
            dep.enroll("mt", "mt1")
            dep.enroll("agent", "src")
            dep.cli("standby-agent", "add-disk", "disk0", dev, "--dir", str(dep.dirs["agent"]))
            yield dep
        finally:
            for u in units.values():
                print(f"----- {u.name} -----\n{sd.status(u.name)}\n{sd.journalctl(u.name)[-6000:]}")
            sd.systemctl("stop", *(units[r].name for r in ("agent", "mt", "ps")), check=False)
    agent_dir = root / units["agent"].state_dir.relative_to("/")
    if (agent_dir / "agent.toml").exists():  # an agent killed (kill -9, the watchdog) leaves trace instances
        subprocess.run([str(BIN / "standby-agent"), "cleanup", "--dir", str(agent_dir)], check=False, timeout=60)
    left = [trace_instance(uuid.UUID(load_json(f)["uid"])) for f in agent_dir.glob("disks/*.json")
            if "uid" in load_json(f)]
    assert not [i for i in left if (TRACEFS / "instances" / i).exists()], "trace instances left behind"


def restarted(sd: SystemdNamespace, unit: str, before: int, restarts: int) -> Callable[[], bool]:
    """Whether `unit` runs again, in a new main process, after `restarts` restarts in all."""
    def check() -> bool:
        s = sd.show(unit, "ActiveState", "MainPID", "NRestarts")
        return s["ActiveState"] == "active" and int(s["MainPID"]) not in (0, before) and int(s["NRestarts"]) >= restarts
    return check


def serves(dep: Inside, role: str) -> bool:
    """What READY=1 promises: the process server listens; the others say what they do in STATUS=."""
    if role == "ps":
        probe = f"import socket; socket.create_connection(('127.0.0.1', {DEFAULT_PORT}), timeout=5).close()"
        return dep.sd.run(sys.executable, "-c", probe).returncode == 0
    return bool(dep.sd.prop(dep.units[role].name, "StatusText"))


@pytest.mark.parametrize("role", ROLES)
def test_ready_restart_watchdog_and_stop(inside: Inside, role: str) -> None:
    sd, unit = inside.sd, inside.units[role]
    name = unit.name
    assert unit.watchdog > 0, f"{name} has no WatchdogSec="
    sd.systemctl("stop", name)
    sd.systemctl("start", name)  # Type=notify: returns once READY=1 came, or fails
    assert sd.show(name, "Type", "ActiveState") == {"Type": "notify", "ActiveState": "active"}
    assert serves(inside, role), f"{name} active but not serving"
    watchdog = min(unit.watchdog, WATCHDOG)

    first = sd.main_pid(name)
    ready = sd.prop(name, "WatchdogTimestampMonotonic")  # READY=1 armed the watchdog; WATCHDOG=1 moves it on
    sd.wait(lambda: sd.prop(name, "WatchdogTimestampMonotonic") != ready, watchdog, f"a WATCHDOG=1 from {name}")
    assert sd.main_pid(name) == first and sd.n_restarts(name) == 0
    sd.kill(name, "SIGKILL")
    sd.wait(restarted(sd, name, first, 1), 60, f"{name} restarted after kill -9")

    second = sd.main_pid(name)
    sd.kill(name, "SIGSTOP")  # alive but silent: no WATCHDOG=1 any more
    sd.wait(restarted(sd, name, second, 2), 2 * watchdog + 60, f"{name} restarted by the watchdog")
    assert "Watchdog timeout" in sd.journalctl(name)

    if STALL in failpoints.FAILPOINTS:  # the real case: the event loop stuck, the process otherwise fine
        third = sd.main_pid(name)
        sd.kill(name, "SIGUSR2")
        sd.wait(restarted(sd, name, third, 3), 2 * watchdog + 60, f"{name} restarted after its loop stalled")

    sd.systemctl("stop", name)
    assert sd.show(name, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}


def fill(dev: str, offset: int, size: int, seed: int) -> None:
    """Random bytes at `offset` of the source disk, written from the host and synced."""
    with open(dev, "r+b", buffering=0) as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(size))
        os.fsync(f.fileno())


def caught_up(since: float) -> Callable[[dict[str, Any]], bool]:
    """Every disk of src up to date, nothing in the cache, a point applied at or after `since`."""
    def check(s: dict[str, Any]) -> bool:
        disks = [d for d in s["disks"] if d["machine"] == "src"]
        return bool(disks) and all(d["replication"] == "Delta" and d["applied_seq"] == d["received_seq"]
                                   and (d["last_point_time"] or 0) >= since for d in disks)
    return check


def test_three_services_replicate_a_loop_device(inside: Inside) -> None:
    sd, units = inside.sd, inside.units
    dev = inside.dev
    fill(dev, 0, 8 * MiB, 1)
    fill(dev, 40 * MiB, 4 * MiB, 2)
    sd.systemctl("start", units["mt"].name, units["agent"].name)
    inside.wait_status(lambda s: "mt1" in s["master_targets"] and any(d["machine"] == "src" for d in s["disks"]),
                       60, "the master target connected and src's disk known")
    inside.admin("protect", "src", "--mt", "mt1", "--format", "raw", "--replica-dir", str(inside.replicas))
    since = time.time()
    fill(dev, 20 * MiB, 2 * MiB, 3)  # written while the initial replication runs
    inside.wait_status(caught_up(since), 300, "src replicated")
    replica = sd.path(inside.replicas / "src-disk0.img")
    assert Path(dev).read_bytes() == replica.read_bytes()

    # A clean stop writes the agent's clean-stop record; the next start takes it instead of a resync.
    agent = units["agent"].name
    sd.systemctl("stop", agent)
    assert sd.show(agent, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    agent_dir = sd.path(inside.dirs["agent"])
    assert list(agent_dir.rglob("*.clean-stop.json")), "no clean-stop record after systemctl stop"
    sd.systemctl("start", agent)
    sd.wait(lambda: "clean-stop record accepted" in sd.journalctl(agent), 60, "the clean-stop record taken")
    assert not list(agent_dir.rglob("*.clean-stop.json"))

    since = time.time()
    fill(dev, 30 * MiB, 1 * MiB, 4)
    inside.wait_status(caught_up(since), 120, "src caught up after the agent's restart")
    assert Path(dev).read_bytes() == replica.read_bytes()
    for role in ("agent", "mt", "ps"):
        sd.systemctl("stop", units[role].name)
        assert sd.prop(units[role].name, "Result") == "success", role
