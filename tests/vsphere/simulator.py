"""govmomi's vSphere API simulator (tools/vcsim), built from the repository's source and started on
127.0.0.1 for a test: a real SOAP server that pyvmomi talks to, not a mock. Nothing in it is a real block
device; the end-to-end tests pair it with loop devices for the data.

The build is cached by the hash of tools/vcsim's files under $XDG_CACHE_HOME (or ~/.cache)/standby, so
only the first test of a fresh machine pays the ~25 s of `go build`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from standby.vsphere.connect import VCenter

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "tools" / "vcsim"
GOVMOMI = Path("/usr/share/gocode/src/github.com/vmware/govmomi/simulator")
USER = "administrator@vsphere.local"
PASSWORD = "sim-password"


def missing() -> str | None:
    """Why the simulator cannot be built here, or None."""
    if shutil.which("go") is None:
        return "Go is not installed (Debian package golang-go)"
    if not GOVMOMI.is_dir():
        return "govmomi's simulator sources are not installed (Debian package golang-github-vmware-govmomi-dev)"
    return None


def build() -> Path:
    digest = hashlib.sha256()
    for f in sorted(SOURCE.iterdir()):
        if f.suffix in (".go", ".sh"):
            digest.update(f.name.encode() + f.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "standby"
    binary = cache / f"vcsim-{digest.hexdigest()[:16]}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(SOURCE / "build.sh"), str(binary)], check=True, timeout=600)
    return binary


@dataclass
class Simulator:
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    fingerprint: str
    url: str
    user: str = USER
    password: str = PASSWORD

    def vcenter(self, name: str = "vc1") -> VCenter:
        return VCenter(name, self.host, self.port, self.user, self.password, self.fingerprint)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start(binary: Path, workdir: Path, *flags: str) -> Simulator:
    """Start the simulator with `flags` (see tools/vcsim/main.go), its datastores under workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    info = workdir / f"vcsim-{time.monotonic_ns()}.json"
    log = open(workdir / "vcsim.log", "ab")  # noqa: SIM115 - the child keeps it
    env = {**os.environ, "TMPDIR": str(workdir)}  # its datastores are temporary directories
    proc = subprocess.Popen(
        [str(binary), "-username", USER, "-password", PASSWORD, "-info", str(info), *flags],
        stdout=subprocess.DEVNULL, stderr=log, env=env,
    )
    log.close()
    deadline = time.monotonic() + 30
    while not info.exists() or not info.read_text().endswith("\n"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"vcsim did not start: {(workdir / 'vcsim.log').read_text()[-2000:]}")
        time.sleep(0.02)
    meta = json.loads(info.read_text())
    host, port = meta["host"].rsplit(":", 1)
    return Simulator(proc, host, int(port), meta["fingerprint"], meta["url"])
