"""`standby status --watch` through a process server outage: a real process server stopped and started
again under a running watch, which says once that it is unreachable, retries, and resumes its output; the
watch ends by itself (`--for`) or on Ctrl-C, without a traceback."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from standby.admin.localdeploy import command
from standby.plumbing.errors import EXIT_INTERRUPTED, EXIT_UNREACHABLE
from tests.deploy import LocalDeployment


def _default_sigint() -> None:
    """Ctrl-C as at a terminal: a test run started in the background by a shell inherits SIGINT ignored,
    and Python keeps an inherited SIG_IGN, so the watch would never see the SIGINT the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_watch(dep: LocalDeployment, out: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:
        return subprocess.Popen(
            command("admin", "--admin", str(dep.ps_dir / "admin"), "--server", dep.server, "status", *args),
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_default_sigint,
        )


def wait_text(out: Path, needle: str, count: int = 1, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        if text.count(needle) >= count:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} x{count} not printed within {timeout} s: {out.read_text(errors='replace')}")


def test_watch_survives_a_restart_of_the_process_server(deployment: LocalDeployment, tmp_path: Path) -> None:
    out = tmp_path / "watch.out"
    watch = start_watch(deployment, out, "--watch", "0.2", "--for", "60")
    try:
        wait_text(out, "cache:", 2)
        deployment.kill("ps", signal.SIGTERM)
        wait_text(out, "unreachable")
        time.sleep(1.5)  # several failed retries: still one line
        deployment.start("ps")
        text = wait_text(out, "reachable again")
        before = text.count("cache:")
        wait_text(out, "cache:", before + 2)
    finally:
        watch.send_signal(signal.SIGINT)
        rc = watch.wait(timeout=30)
    text = out.read_text(errors="replace")
    assert text.count("unreachable:") == 1, text
    assert f"process server at {deployment.server} unreachable:" in text
    assert "retrying every 0.2 s" in text
    assert text.index("unreachable:") < text.index("reachable again") < text.rindex("cache:")
    assert rc == EXIT_INTERRUPTED and "Traceback" not in text, text


def test_bounded_watch_ends_by_itself_and_says_why(deployment: LocalDeployment, tmp_path: Path) -> None:
    deployment.kill("ps", signal.SIGTERM)
    out = tmp_path / "watch.out"
    watch = start_watch(deployment, out, "--watch", "0.2", "--for", "2")
    rc = watch.wait(timeout=60)
    text = out.read_text(errors="replace")
    assert rc == EXIT_UNREACHABLE, text
    assert text.count("unreachable:") == 1 and "retrying every 0.2 s" in text, text
    assert "Traceback" not in text


def test_watch_bound_alone_is_refused(deployment: LocalDeployment) -> None:
    res = deployment.cli("status", "--for", "3")
    assert res.returncode == 2 and "--watch" in res.stderr, res.stderr
