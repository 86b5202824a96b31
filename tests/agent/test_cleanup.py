"""`standby-agent cleanup`: the trace instances a stopped agent left behind go; one still in use stays."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from standby.agent.disk import trace_instance
from standby.agent.tracker.tracefs import available
from standby.plumbing.errors import EXIT_BAD_INPUT, EXIT_FAILED

TRACEFS = Path("/sys/kernel/tracing")
WHY_NOT = available()
needs_tracefs = pytest.mark.skipif(WHY_NOT is not None, reason=f"tracefs impossible here: {WHY_NOT}")


def cleanup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "standby.agent.cli", "cleanup", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def stopped_agent(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An agent's state directory with one disk, and that disk's trace instance left recording as an agent
    killed with SIGKILL leaves it (removed after the test if the command did not)."""
    state = tmp_path / "agent"
    (state / "disks").mkdir(parents=True)
    (state / "agent.toml").write_text('name = "m1"\nserver = "127.0.0.1:9443"\ndisks = []\n')
    uid = uuid.uuid4()
    (state / "disks" / "disk0.json").write_text(f'{{"uid": "{uid}", "key": ""}}')
    (state / "disks" / "disk0.clean-stop.json").write_text('{"path": "/dev/null", "size": 0}')  # no disk's
    instance = TRACEFS / "instances" / trace_instance(uid)
    instance.mkdir()
    try:
        (instance / "events/block/block_rq_issue/enable").write_text("1")
        yield state, instance
    finally:
        if instance.exists():
            instance.rmdir()


@needs_tracefs
def test_removes_the_instance_a_killed_agent_left_recording(stopped_agent: tuple[Path, Path]) -> None:
    state, instance = stopped_agent
    assert (instance / "tracing_on").read_text() == "1\n"
    res = cleanup("--dir", str(state))
    assert res.returncode == 0, res.stderr
    assert f"removed trace instance {instance.name} of disk disk0" in res.stdout
    assert not instance.exists()
    again = cleanup("--dir", str(state))
    assert again.returncode == 0, again.stderr
    assert "nothing left behind" in again.stdout


@needs_tracefs
def test_leaves_an_instance_in_use_alone_and_says_so(stopped_agent: tuple[Path, Path]) -> None:
    state, instance = stopped_agent
    fd = os.open(instance / "per_cpu/cpu0/trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK)  # a running agent's read
    try:
        res = cleanup("--dir", str(state))
        assert res.returncode == EXIT_FAILED
        assert f"trace instance {instance.name} is in use" in res.stderr
        assert "Traceback" not in res.stderr
        assert (instance / "tracing_on").read_text() == "1\n"  # neither stopped nor removed
    finally:
        os.close(fd)
    assert cleanup("--dir", str(state)).returncode == 0
    assert not instance.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_damaged_disk_record_is_reported_not_skipped(tmp_path: Path) -> None:
    (tmp_path / "disks").mkdir()
    (tmp_path / "agent.toml").write_text('name = "m1"\nserver = "127.0.0.1:9443"\ndisks = []\n')
    (tmp_path / "disks" / "disk0.json").write_text('{"uid": "not-a-uuid"}')
    (tmp_path / "disks" / "disk1.json").write_text('{"uid": ')
    res = cleanup("--dir", str(tmp_path))
    assert res.returncode == EXIT_FAILED
    assert "disk disk0: unreadable" in res.stderr and "disk disk1: unreadable" in res.stderr
    assert "Traceback" not in res.stderr


def test_refuses_a_directory_that_is_no_agent_state(tmp_path: Path) -> None:
    res = cleanup("--dir", str(tmp_path))
    assert res.returncode == EXIT_BAD_INPUT
    assert "not an agent's state directory" in res.stderr


def test_help_says_what_it_removes_and_what_it_keeps() -> None:
    res = subprocess.run([sys.executable, "-m", "standby.agent.cli", "cleanup", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "usage: standby-agent cleanup" in text
    assert "tracefs instance of each of its disks" in text
    assert "a running agent still reads is left alone" in text
    assert "exit codes:" in text
    top = subprocess.run([sys.executable, "-m", "standby.agent.cli", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert "cleanup" in top.stdout
