"""`standby unprotect` and `standby forget` with real daemons: unprotect keeps the replica and its
retention journal (set aside), protecting again works (here seeding from the kept replica), unprotect
--delete-replicas deletes them, forget is refused while the machine is protected and afterwards makes the
agent's next connection refused with the reason."""

from __future__ import annotations

import time
from pathlib import Path

from standby.plumbing.errors import EXIT_FAILED
from tests.conftest import needs_loop
from tests.deploy import LocalDeployment

from .conftest import MiB

SIZE = 8 * MiB


def same(dev: str, replica: Path) -> bool:
    with open(dev, "rb") as a, open(replica, "rb") as b:
        return a.read() == b.read(SIZE)


def wait_log(dep: LocalDeployment, key: str, needle: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in dep.log_text(key):
        assert time.monotonic() < deadline, f"{needle!r} not in {key}'s log: {dep.log_text(key)[-3000:]}"
        time.sleep(0.1)


def unprotected(dep: LocalDeployment) -> None:
    """The agent reconnected and reported its disk again, unprotected (a new registry row)."""
    dep.wait_for(lambda s: [d["mt"] for d in s["disks"] if d["machine"] == "src"] == [None], 30,
                 "src's disk to be reported unprotected")


@needs_loop
def test_unprotect_keeps_replicas_protect_again_delete_and_forget(deployment: LocalDeployment, protected,
                                                                  tmp_path: Path) -> None:
    dev, replica = protected("raw", SIZE)
    deployment.wait_synced("src")
    retention = deployment.retention_dir("mt1")

    res = deployment.cli("forget", "src")
    assert res.returncode == EXIT_FAILED and "still protected" in res.stderr and "unprotect" in res.stderr, res.stderr

    res = deployment.cli("unprotect", "src")
    assert res.returncode == 0, res.stderr
    assert "kept" in res.stdout and str(replica) in res.stdout, res.stdout
    assert replica.exists() and same(dev, replica)
    assert [p.name for p in retention.iterdir() if ".unprotected-" in p.name], list(retention.iterdir())
    unprotected(deployment)
    wait_log(deployment, "agent-src", "no longer protected: change tracking stopped")
    time.sleep(2.5)  # a status report of the agent's (every 2 s): an unprotected disk is not tracked on purpose
    assert [d["alerts"] for d in deployment.status("src")["disks"]] == [[]]
    assert "Traceback" not in deployment.log_text("mt-mt1")

    with open(dev, "r+b") as f:  # written while unprotected: the seeding compare finds it
        f.write(b"x" * 65536)
    res = deployment.cli("protect", "src", "--mt", "mt1", "--format", "raw", "--replica", f"disk0={replica}",
                         "--existing")
    assert res.returncode == 0, res.stderr
    deployment.wait_synced("src")
    assert same(dev, replica)

    res = deployment.cli("unprotect", "src", "--delete-replicas")
    assert res.returncode == 0, res.stderr
    assert "deleted" in res.stdout and str(replica) in res.stdout, res.stdout
    assert not replica.exists()
    assert not [p for p in retention.iterdir() if p.is_dir() and ".unprotected-" not in p.name]
    unprotected(deployment)

    res = deployment.cli("forget", "src")
    assert res.returncode == 0, res.stderr
    wait_log(deployment, "agent-src", "not enrolled (forgotten by the operator?)")
    machines = deployment.cli("machines").stdout
    assert "src" not in machines and "mt1" in machines
    res = deployment.cli("unprotect", "src")
    assert res.returncode == 2 and "unknown machine" in res.stderr, res.stderr
