"""A whole deployment on one machine — process server, master target(s), agent(s) as separate
processes on 127.0.0.1 with real TLS — in one directory, driven only through the command-line tools
(`standby-ps`, `standby-mt`, `standby-agent`, `standby`), the admin client and the daemons' config files.
`standby demo` runs on it, and so do the benchmarks and (tests/deploy.py adds what only they need) the
integration tests, so all of them exercise exactly what an operator runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from standby.plumbing.config import load_toml, save_toml
from standby.plumbing.errors import StandbyError

from .client import AdminClient

COMMANDS = {
    "ps": "standby.processserver.cli",
    "mt": "standby.mastertarget.cli",
    "agent": "standby.agent.cli",
    "admin": "standby.admin.cli",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(kind: str, *args: str) -> list[str]:
    return [sys.executable, "-m", COMMANDS[kind], *args]


class LocalDeployment:
    def __init__(self, root: Path, port: int | None = None, cache_quota: int = 4 << 30) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.cache_quota = cache_quota
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = self.root / "logs"
        self.ps_dir = self.root / "ps"
        self.fingerprint = ""

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, kind: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(command(kind, *args), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise StandbyError(f"{COMMANDS[kind]} {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    # -- set-up -------------------------------------------------------------------------------------
    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        out = self.run(
            "ps",
            "init",
            "--dir",
            str(self.ps_dir),
            "--name",
            "ps",
            "--host",
            "127.0.0.1",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--cache-quota",
            str(self.cache_quota),
        )
        for line in out.stdout.splitlines():
            if "CA fingerprint" in line:
                self.fingerprint = line.split()[-1]
        if not self.fingerprint.startswith("sha256:"):
            raise StandbyError(f"standby-ps init printed no fingerprint: {out.stdout}")

    def enroll(self, kind: str, name: str) -> Path:
        d = self.root / f"{kind}-{name}"
        if kind == "mt":
            self.retention_dir(name).mkdir(exist_ok=True)  # checked before enrolling
        self.run(
            kind,
            "enroll",
            "--server",
            self.server,
            "--fingerprint",
            self.fingerprint,
            "--passphrase-file",
            str(self.ps_dir / "enroll-passphrase"),
            "--name",
            name,
            "--dir",
            str(d),
            # A local deployment shares the machine's disk (accepted: --shared-volume).
            *(["--retention-dir", str(self.retention_dir(name)), "--shared-volume"] if kind == "mt" else []),
        )
        if kind == "mt":
            # A local deployment shares the machine's disk: keep a small reserve there, not the default 5 %
            # (up to 4 GiB) of that disk, or history would be pruned whenever the disk is fairly full.
            self.set_mt_option(name, reserve="64M")
        return d

    def retention_dir(self, mt: str) -> Path:
        return self.root / f"retention-{mt}"

    def set_mt_option(self, mt: str, **retention: Any) -> None:
        """Change [retention] in mt.toml (takes effect at the master target's next start)."""
        conf = self.root / f"mt-{mt}" / "mt.toml"
        raw = load_toml(conf)
        raw.setdefault("retention", {}).update(retention)
        save_toml(conf, raw)

    def add_disk(self, agent: str, disk: str, path: str | Path) -> None:
        self.run("agent", "add-disk", disk, str(path), "--dir", str(self.root / f"agent-{agent}"))

    def set_agent_option(self, agent: str, **options: Any) -> None:
        conf = self.root / f"agent-{agent}" / "agent.toml"
        raw = load_toml(conf)
        raw.update(options)
        save_toml(conf, raw)

    # -- processes ----------------------------------------------------------------------------------
    def start(self, kind: str, name: str = "") -> subprocess.Popen[bytes]:
        key = f"{kind}-{name}" if name else kind
        d = self.ps_dir if kind == "ps" else self.root / key
        log = open(self.logs / f"{key}.log", "ab")
        env = dict(os.environ, STANDBY_LOG_LEVEL=os.environ.get("STANDBY_LOG_LEVEL", "INFO"))
        proc = subprocess.Popen(
            command(kind, "run", "--dir", str(d)), stdout=log, stderr=log, env=env, stdin=subprocess.DEVNULL
        )
        log.close()
        self.procs[key] = proc
        if kind == "ps":
            self.wait_listening(proc)
        return proc

    def wait_listening(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StandbyError(f"the process server exited ({proc.returncode}); see {self.logs / 'ps.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise StandbyError("the process server did not start listening in time")

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(key, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                # Stuck: have it log where each task waits (SIGUSR1), then kill it.
                proc.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
                proc.kill()
                proc.wait()
                print(f"{key} did not stop within 15 s of {signal.Signals(sig).name}: killed (tasks in its log)")

    def stop_all(self) -> None:
        for key in ["agent", "mt", "ps"]:  # agents first, process server last
            for k in [k for k in self.procs if k.split("-")[0] == key]:
                self.kill(k, signal.SIGTERM)
        self.clean_up_agents()

    def clean_up_agents(self) -> None:
        """Agents killed with SIGKILL leave their kernel trace instances behind (ring buffers that keep
        recording): `standby-agent cleanup` removes those of each agent here. Only root agents make them."""
        if os.geteuid() != 0:
            return
        for conf in sorted(self.root.glob("agent-*/agent.toml")):  # an agent never enrolled never ran
            # Clean-up goes on (loop devices, directories) whatever happens to one agent's.
            try:
                res = self.run("agent", "cleanup", "--dir", str(conf.parent), check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"could not remove the trace instances of {conf.parent.name}: {exc!r}")
                continue
            if res.returncode != 0:
                print(f"could not remove the trace instances of {conf.parent.name}: {res.stderr.strip()}")

    # -- admin --------------------------------------------------------------------------------------
    def admin(self) -> AdminClient:
        return AdminClient(self.ps_dir / "admin", self.server)

    def status(self, machine: str | None = None) -> dict[str, Any]:
        return self.admin().call("status", machine=machine)

    def wait_for(self, predicate: Any, timeout: float, what: str, interval: float = 0.2) -> dict[str, Any]:
        """Poll status until predicate(status) holds; raises with the last status on timeout."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if predicate(last):
                    return last
            except StandbyError:
                pass
            time.sleep(interval)
        raise StandbyError(f"timed out after {timeout:.0f} s waiting for {what}; last status: {last}")

    def wait_disks_known(self, machine: str, count: int, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for(
            lambda s: len([d for d in s["disks"] if d["machine"] == machine]) >= count,
            timeout,
            f"{count} disk(s) of {machine} to be reported",
        )

    def wait_mt_connected(self, name: str, timeout: float = 30.0) -> None:
        self.wait_for(lambda s: name in s["master_targets"], timeout, f"master target {name} to connect")

    def wait_synced(self, machine: str, timeout: float = 300.0) -> dict[str, Any]:
        return self.wait_for(
            lambda s: (
                all(d["replication"] == "Delta" for d in s["disks"] if d["machine"] == machine)
                and any(d["machine"] == machine for d in s["disks"])
            ),
            timeout,
            f"{machine} to be up to date",
        )

    def wait_caught_up(self, machine: str, since: float, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until every disk of `machine` is up to date, has nothing in the cache and has a recovery
        point applied whose instant is at or after `since` (wall clock): the replica then holds every
        write completed before `since`."""
        return self.wait_for(
            lambda s: all(
                d["replication"] == "Delta"
                and d["applied_seq"] == d["received_seq"]
                and (d["last_point_time"] or 0) >= since
                for d in s["disks"]
                if d["machine"] == machine
            ),
            timeout,
            f"the replicas of {machine} to catch up with a point after {since:.3f}",
        )

    def log_text(self, key: str) -> str:
        p = self.logs / f"{key}.log"
        return p.read_text(errors="replace") if p.exists() else ""
