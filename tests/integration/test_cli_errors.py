"""The admin CLI and the daemons' start-up, as an operator meets them: clear messages and the documented
exit codes (standby.plumbing.errors: 2 bad input, 3 process server unreachable, 4 not enrolled/refused,
5 not started, 6 the daemon that must do it not connected).

Every command runs as a real subprocess against a real process server (the `deployment` fixture).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from standby.admin.localdeploy import free_port
from standby.plumbing.errors import (
    EXIT_BAD_INPUT,
    EXIT_NOT_CONNECTED,
    EXIT_NOT_STARTED,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
)
from tests.conftest import needs_loop
from tests.deploy import LocalDeployment

from .conftest import MiB, fill_mixed

DISK_SIZE = 4 * MiB
STATUS_FIELDS = (
    "replication",
    "disk_state",
    "progress",
    "rate",
    "eta_seconds",
    "bytes_received",
    "bytes_wire",
    "compression_ratio",
    "error",
)


def failed_with(res, code: int, *needles: str) -> None:
    """The command exited with `code`, printed every needle (case-insensitive) and no traceback."""
    text = res.stdout + res.stderr
    assert res.returncode == code, f"exit {res.returncode}, expected {code}: {text}"
    for needle in needles:
        assert needle.lower() in text.lower(), f"{needle!r} not in: {text}"
    assert "Traceback" not in text, text


@pytest.fixture
def ready(deployment: LocalDeployment, make_loop, tmp_path: Path) -> Path:
    """Master target mt1 running and connected, agent src running with disk0 (a 4 MiB loop device)
    reported, nothing protected yet. Returns an existing, empty replica directory."""
    dev = make_loop(DISK_SIZE, "source")
    fill_mixed(dev, DISK_SIZE)
    deployment.enroll("mt", "mt1")
    deployment.start("mt", "mt1")
    deployment.enroll("agent", "src")
    deployment.add_disk("src", "disk0", dev)
    deployment.start("agent", "src")
    deployment.wait_disks_known("src", 1)
    deployment.wait_mt_connected("mt1")
    rdir = tmp_path / "replicas"
    rdir.mkdir()
    return rdir


# ---- bad input: exit 2 -------------------------------------------------------------------------------


def test_protect_unknown_machine(deployment):
    res = deployment.cli("protect", "nosuch", "--mt", "mt1", "--replica-dir", "/tmp/x")
    failed_with(res, EXIT_BAD_INPUT, "unknown machine", "nosuch")


def test_protect_unknown_master_target(deployment):
    deployment.enroll("agent", "src")
    res = deployment.cli("protect", "src", "--mt", "nosuch", "--replica-dir", "/tmp/x")
    failed_with(res, EXIT_BAD_INPUT, "unknown master target", "nosuch")


def test_protect_a_master_target_as_machine_is_unknown_machine(deployment):
    deployment.enroll("mt", "mt1")
    res = deployment.cli("protect", "mt1", "--mt", "mt1", "--replica-dir", "/tmp/x")
    failed_with(res, EXIT_BAD_INPUT, "unknown machine")


@needs_loop
def test_protect_without_replica_dir_or_replica(deployment, ready):
    """Without a vCenter (a master target VM's replicas are made in vSphere), the process server asks for
    either option and says the third way; nothing is protected."""
    res = deployment.cli("protect", "src", "--mt", "mt1")
    failed_with(res, EXIT_BAD_INPUT, "no replica given for disk disk0", "--replica-dir", "--replica",
                "standby vcenter add")
    assert deployment.status()["disks"][0]["replication"] == "Off"


def test_protect_malformed_replica_option(deployment):
    res = deployment.cli("protect", "src", "--mt", "mt1", "--replica", "disk0-without-path")
    failed_with(res, EXIT_BAD_INPUT, "DISK=PATH")


@pytest.mark.parametrize("existing", ["descriptor", "flat"])
@needs_loop
def test_protect_replica_already_exists(deployment, ready, existing):
    name = "src-disk0.vmdk" if existing == "descriptor" else "src-disk0-flat.vmdk"
    (ready / name).write_bytes(b"precious data the master target must not overwrite\n")
    res = deployment.cli("protect", "src", "--mt", "mt1", "--replica-dir", str(ready))
    failed_with(res, EXIT_BAD_INPUT, "already exists", name, "protect with --existing")
    assert (ready / name).read_bytes() == b"precious data the master target must not overwrite\n"
    # Nothing was protected: the disk is still unassigned and a corrected command works.
    d = deployment.status("src")["disks"][0]
    assert d["mt"] is None and d["replica"] is None
    (ready / name).unlink()
    res = deployment.cli("protect", "src", "--mt", "mt1", "--replica-dir", str(ready))
    assert res.returncode == 0, res.stderr


@needs_loop
def test_protect_raw_replica_already_exists(deployment, ready):
    (ready / "src-disk0.img").write_bytes(b"x")
    res = deployment.cli("protect", "src", "--mt", "mt1", "--format", "raw", "--replica-dir", str(ready))
    failed_with(res, EXIT_BAD_INPUT, "already exists", "src-disk0.img", "protect with --existing")


@needs_loop
def test_protect_replica_dir_missing_on_master_target(deployment, ready):
    res = deployment.cli("protect", "src", "--mt", "mt1", "--replica-dir", str(ready / "nosuch"))
    failed_with(res, EXIT_BAD_INPUT, "does not exist")


@needs_loop
def test_protect_device_of_another_size(deployment, ready, make_loop):
    target = make_loop(DISK_SIZE + MiB, "target")
    res = deployment.cli("protect", "src", "--mt", "mt1", "--format", "device", "--replica", f"disk0={target}")
    failed_with(res, EXIT_BAD_INPUT, target, str(DISK_SIZE + MiB), str(DISK_SIZE))
    assert "size" in res.stderr.lower() or "bytes" in res.stderr.lower(), res.stderr
    assert deployment.status("src")["disks"][0]["mt"] is None


@needs_loop
def test_protect_device_needs_explicit_replica(deployment, ready):
    res = deployment.cli("protect", "src", "--mt", "mt1", "--format", "device", "--replica-dir", str(ready))
    failed_with(res, EXIT_BAD_INPUT, "--replica disk0=PATH")


@needs_loop
def test_protect_unknown_disk(deployment, ready):
    res = deployment.cli("protect", "src", "--mt", "mt1", "--replica", f"nosuch={ready}/x.vmdk")
    failed_with(res, EXIT_BAD_INPUT, "no disk nosuch")


@needs_loop
def test_protect_twice_is_refused(deployment, ready):
    res = deployment.cli("protect", "src", "--mt", "mt1", "--replica-dir", str(ready))
    assert res.returncode == 0, res.stderr
    assert f"protecting src/disk0 -> mt1:{ready}/src-disk0.vmdk (vmdk)" in res.stdout
    again = deployment.cli("protect", "src", "--mt", "mt1", "--replica-dir", str(ready / "other"))
    failed_with(again, EXIT_BAD_INPUT, "already protected", "disk0")
    d = deployment.status("src")["disks"][0]
    assert d["replica"] == f"{ready}/src-disk0.vmdk"  # the first assignment stands


# ---- unreachable (3), not enrolled (4), the daemon that must do it not connected (6) ---------------------


def test_server_unreachable(deployment):
    port = free_port()  # nobody listens there
    t0 = time.monotonic()
    res = deployment.run(
        "admin", "--admin", str(deployment.ps_dir / "admin"), "--server", f"127.0.0.1:{port}", "status", check=False
    )
    failed_with(res, EXIT_UNREACHABLE, "cannot reach", f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 30


@needs_loop
def test_protect_to_a_master_target_that_is_not_connected(deployment, ready):
    """The process server is there (not 3): the master target that must check the replica is not (6)."""
    deployment.enroll("mt", "mt2")  # enrolled, never started
    res = deployment.cli("protect", "src", "--mt", "mt2", "--replica-dir", str(ready))
    failed_with(res, EXIT_NOT_CONNECTED, "master target 'mt2' is not connected")
    assert deployment.status("src")["disks"][0]["mt"] is None  # nothing was assigned


def test_bad_server_address(deployment):
    res = deployment.run(
        "admin", "--admin", str(deployment.ps_dir / "admin"), "--server", "127.0.0.1:notaport", "status", check=False
    )
    failed_with(res, EXIT_BAD_INPUT, "not a server address")


def test_admin_not_enrolled(deployment, tmp_path):
    empty = tmp_path / "empty-admin"
    empty.mkdir()
    res = deployment.run("admin", "--admin", str(empty), "--server", deployment.server, "status", check=False)
    failed_with(res, EXIT_REFUSED, "not enrolled", str(empty))


def test_admin_not_enrolled_hint_names_a_real_command(deployment, tmp_path):
    empty = tmp_path / "empty-admin"
    empty.mkdir()
    res = deployment.run("admin", "--admin", str(empty), "--server", deployment.server, "status", check=False)
    assert res.returncode == EXIT_REFUSED
    assert "standby-ps init enroll" not in res.stderr, res.stderr


def test_agent_identity_used_as_admin_is_refused(deployment):
    d = deployment.enroll("agent", "src")
    res = deployment.run("admin", "--admin", str(d / "identity"), "--server", deployment.server, "status", check=False)
    failed_with(res, EXIT_REFUSED, "not the admin")


# ---- status and machines -----------------------------------------------------------------------------


def test_machines_lists_enrolled_names(deployment):
    deployment.enroll("agent", "web01")
    deployment.enroll("agent", "db02")
    deployment.enroll("mt", "mt1")
    res = deployment.cli("machines")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split()[1] for line in res.stdout.splitlines() if line.strip()}
    assert rows == {"web01": "agent", "db02": "agent", "mt1": "mt"}
    js = deployment.cli("machines", "--json")
    assert js.returncode == 0, js.stderr
    assert {(m["name"], m["role"]) for m in json.loads(js.stdout)["machines"]} == {
        ("web01", "agent"),
        ("db02", "agent"),
        ("mt1", "mt"),
    }


def test_status_without_disks(deployment):
    res = deployment.cli("status")
    assert res.returncode == 0, res.stderr
    assert "no disks reported yet" in res.stdout
    js = json.loads(deployment.cli("status", "--json").stdout)
    assert js["disks"] == [] and js["master_targets"] == []


@needs_loop
def test_status_json_and_human(deployment, ready):
    res = deployment.cli("protect", "src", "--mt", "mt1", "--format", "raw", "--replica-dir", str(ready))
    assert res.returncode == 0, res.stderr
    deployment.wait_synced("src", timeout=60)
    js = deployment.cli("status", "--json")
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert doc["master_targets"] == ["mt1"]
    assert isinstance(doc["cache_bytes"], int) and isinstance(doc["cache_quota"], int)
    (d,) = doc["disks"]
    missing = [f for f in STATUS_FIELDS if f not in d]
    assert not missing, f"status --json lacks {missing}: {d}"
    assert d["machine"] == "src" and d["disk"] == "disk0"
    assert d["replication"] == "Delta"
    assert d["progress"] == 1.0
    assert isinstance(d["rate"], int | float) and d["rate"] >= 0
    assert d["eta_seconds"] is None or (isinstance(d["eta_seconds"], int | float) and d["eta_seconds"] >= 0)
    assert d["bytes_received"] == DISK_SIZE
    assert isinstance(d["bytes_wire"], int) and d["bytes_wire"] > 0
    assert d["compression_ratio"] == pytest.approx(d["bytes_data"] / d["bytes_wire"])
    assert d["compression_ratio"] > 0
    assert d["error"] is None
    assert d["replica"] == f"{ready}/src-disk0.img" and d["format"] == "raw" and d["mt"] == "mt1"

    human = deployment.cli("status")
    assert human.returncode == 0, human.stderr
    assert "src/disk0 replication:Delta disk:UpToDate" in human.stdout, human.stdout
    assert "progress:100.0%" in human.stdout and "master-targets-connected:mt1" in human.stdout
    only = deployment.cli("status", "src", "--json")
    assert [x["disk"] for x in json.loads(only.stdout)["disks"]] == ["disk0"]
    none = deployment.cli("status", "nosuch", "--json")
    assert none.returncode == 0 and json.loads(none.stdout)["disks"] == []


# ---- daemons that cannot start: exit 5 --------------------------------------------------------------


def test_ps_run_nonexistent_dir(deployment, tmp_path):
    missing = tmp_path / "nonexistent"
    t0 = time.monotonic()
    res = deployment.run("ps", "run", "--dir", str(missing), check=False)
    assert time.monotonic() - t0 < 15
    failed_with(res, EXIT_NOT_STARTED, str(missing / "ps.toml"), "does not exist")
    assert not missing.exists(), "a failed start must not create the directory"


def test_ps_run_port_in_use(deployment):
    # The deployment's own process server already listens on its port: a second one cannot start.
    t0 = time.monotonic()
    res = deployment.run("ps", "run", "--dir", str(deployment.ps_dir), check=False)
    assert time.monotonic() - t0 < 15
    failed_with(res, EXIT_NOT_STARTED, "cannot start")


def test_agent_run_without_identity(deployment, tmp_path):
    d = deployment.enroll("agent", "src")
    (d / "identity").rename(tmp_path / "moved-identity")
    t0 = time.monotonic()
    res = deployment.run("agent", "run", "--dir", str(d), check=False)
    assert time.monotonic() - t0 < 15
    failed_with(res, EXIT_NOT_STARTED, "not enrolled", "standby-agent enroll")


def test_agent_run_empty_dir_says_enroll(deployment, tmp_path):
    empty = tmp_path / "agent-empty"
    empty.mkdir()
    res = deployment.run("agent", "run", "--dir", str(empty), check=False)
    failed_with(res, EXIT_NOT_STARTED, "enroll")


def test_mt_run_without_identity(deployment, tmp_path):
    d = deployment.enroll("mt", "mt1")
    (d / "identity").rename(tmp_path / "moved-identity")
    res = deployment.run("mt", "run", "--dir", str(d), check=False)
    failed_with(res, EXIT_NOT_STARTED, "not enrolled", "standby-mt enroll")
