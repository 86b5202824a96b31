"""The systemd units in systemd/: `systemd-analyze verify` is clean, their settings agree with what the
daemons do (Type=notify, the watchdog, a stop timeout past the daemons' own stop limit), and README gives
the exposure scores `systemd-analyze security` measures for them.

The units start the installed commands (/opt/standby/venv/bin/...), which this machine need not have:
`verify` would only say so. So the units are verified as copies whose ExecStart names this checkout's
commands (the same arguments) — everything else exactly as shipped. (Running them under a real systemd is
the job of the systemd harness tests.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from standby.plumbing.service import EXIT_GRACE, STOP_LIMIT
from tests.tools import needs

ROOT = Path(__file__).resolve().parent.parent
UNITS = {
    "standby-ps.service": "/opt/standby/venv/bin/standby-ps run --dir /var/lib/standby/ps",
    "standby-mt.service": "/opt/standby/venv/bin/standby-mt run --dir /var/lib/standby/mt",
    "standby-agent.service": "/opt/standby/venv/bin/standby-agent run --dir /var/lib/standby/agent",
}


def installed(command: str) -> Path:
    """This checkout's command: where pip put the scripts of this Python (a venv's bin, /usr/local/bin), else
    on PATH."""
    found = Path(sysconfig.get_path("scripts")) / command
    if not found.exists():
        found = Path(shutil.which(command) or found)
    assert found.exists(), f"{command} is not installed (pip install -e .)"
    return found


def settings(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, value
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


def test_the_units_are_the_three_daemons():
    assert sorted(p.name for p in (ROOT / "systemd").glob("*.service")) == sorted(UNITS)
    for name, exec_start in UNITS.items():
        s = settings(name)
        assert s["ExecStart"] == [exec_start]
        assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"] and s["Restart"] == ["on-failure"]
        assert 10 <= seconds(s["WatchdogSec"][0]) <= 60
        # The daemon's own stop (STOP_LIMIT) and its threads' grace (EXIT_GRACE) end before systemd's SIGKILL.
        assert seconds(s["TimeoutStopSec"][0]) >= STOP_LIMIT + EXIT_GRACE + 10
        assert int(s["LimitNOFILE"][0]) >= 65536
        assert s["StateDirectory"] == [f"standby/{name.split('-')[1].split('.')[0]}"]


def test_the_process_server_runs_unprivileged_and_read_only_but_its_state():
    s = settings("standby-ps.service")
    assert s["User"] == ["standby"] and s["CapabilityBoundingSet"] == [""] and s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"] and s["ReadWritePaths"] == ["/var/lib/standby/ps"]
    assert s["SystemCallFilter"][0] == "@system-service" and s["PrivateTmp"] == ["yes"]


@needs("systemd-analyze")
def test_systemd_analyze_verify_is_clean(tmp_path: Path):
    for name, exec_start in UNITS.items():
        text = (ROOT / "systemd" / name).read_text()
        command = exec_start.split()[0].rsplit("/", 1)[1]
        args = exec_start.split(command, 1)[1]
        text = text.replace(f"ExecStart={exec_start}", f"ExecStart={installed(command)}{args}")
        (tmp_path / name).write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == res.stderr == "", res


@needs("systemd-analyze")
def test_readme_gives_the_exposure_scores_systemd_analyze_measures():
    readme = (ROOT / "README.md").read_text()
    for name in UNITS:
        res = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                              str(ROOT / "systemd" / name)], capture_output=True, text=True, timeout=120)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", res.stdout + res.stderr)
        if m is None:
            pytest.skip(f"this systemd-analyze cannot score units offline: {res.stderr.strip()[:200]}")
        rows = [line for line in readme.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1 and rows[0].endswith(f"| {m.group(1)} {m.group(2)} |"), (rows, m.group(0))
