"""Which process server the admin CLI dials (admin.client): `--server` > `STANDBY_SERVER` > the admin
identity's admin.toml, and on the process server itself the local address when the advertised name does
not resolve there — with the certificate still checked against the advertised name. A real process
server, the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from standby.admin.localdeploy import command, free_port
from standby.plumbing.config import load_toml, save_toml
from standby.plumbing.errors import EXIT_REFUSED, EXIT_UNREACHABLE
from tests.deploy import LocalDeployment

ADVERTISED = "ps.invalid"  # RFC 2606: never resolves


@pytest.fixture
def unresolvable(tmp_path: Path) -> Iterator[LocalDeployment]:
    """A process server initialised with an advertised name that does not resolve on this machine."""
    dep = LocalDeployment(tmp_path / "deploy")
    dep.root.mkdir(parents=True)
    dep.logs.mkdir()
    dep.run("ps", "init", "--dir", str(dep.ps_dir), "--name", "ps", "--host", ADVERTISED,
            "--listen", "127.0.0.1", "--port", str(dep.port))
    dep.start("ps")
    try:
        yield dep
    finally:
        dep.stop_all()


def admin(dep: LocalDeployment, *args: str, server_env: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "STANDBY_SERVER"}
    if server_env is not None:
        env["STANDBY_SERVER"] = server_env
    return subprocess.run(command("admin", "--admin", str(dep.ps_dir / "admin"), *args),
                          capture_output=True, text=True, timeout=60, env=env)


def test_stored_name_that_does_not_resolve_reaches_the_local_server(unresolvable: LocalDeployment) -> None:
    conf = load_toml(unresolvable.ps_dir / "admin" / "admin.toml")
    assert conf["server"] == f"{ADVERTISED}:{unresolvable.port}"
    res = admin(unresolvable, "machines")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


def test_fallback_still_checks_the_certificate_name(unresolvable: LocalDeployment) -> None:
    """A stored name the server's certificate does not carry is refused on the local address too: the
    fallback changes where the CLI dials, never what it verifies."""
    path = unresolvable.ps_dir / "admin" / "admin.toml"
    conf = load_toml(path)
    save_toml(path, {**conf, "server": f"other.invalid:{unresolvable.port}"})
    res = admin(unresolvable, "machines")
    assert res.returncode == EXIT_REFUSED, res.stdout + res.stderr
    assert "certificate failed verification" in res.stderr
    assert "Traceback" not in res.stderr


def test_standby_server_environment_variable(unresolvable: LocalDeployment) -> None:
    good = f"127.0.0.1:{unresolvable.port}"
    bad = f"127.0.0.1:{free_port()}"
    assert admin(unresolvable, "machines", server_env=good).returncode == 0
    res = admin(unresolvable, "machines", server_env=bad)  # the variable wins over admin.toml
    assert res.returncode == EXIT_UNREACHABLE and bad in res.stderr, res.stderr
    res = admin(unresolvable, "--server", good, "machines", server_env=bad)  # the option wins over the variable
    assert res.returncode == 0, res.stderr
    res = admin(unresolvable, "--server", f"{ADVERTISED}:{unresolvable.port}", "machines")  # no fallback
    assert res.returncode == EXIT_UNREACHABLE and ADVERTISED in res.stderr, res.stderr
