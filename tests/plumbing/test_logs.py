"""plumbing.logs: under systemd (JOURNAL_STREAM naming our stderr, or INVOCATION_ID) every line carries its
syslog priority and no timestamp of its own; elsewhere lines start with the time; `--log-file` appends
with timestamps and follows a rotation. Each case runs a real process whose stderr is a real file, as the
journal's stream would be."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, sys
from pathlib import Path
from standby.plumbing.logs import setup_logging
log = setup_logging("standby.test", "DEBUG", Path(sys.argv[1]) if len(sys.argv) > 1 else None)
log.debug("a debug line")
log.info("an info line")
log.warning("a warning line")
log.error("an error line\\nits second line")
if len(sys.argv) > 2:
    Path(sys.argv[1]).rename(sys.argv[2])  # logrotate's move
    log.info("after the rotation")
"""
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def run(tmp_path: Path, env: dict[str, str], *args: str, journal: bool = False) -> list[str]:
    err = tmp_path / "stderr"
    with open(err, "wb") as f:
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")} | env
        if journal:
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, stderr=f, check=True)
    return err.read_text().splitlines()


def test_under_the_journal_lines_carry_priorities_and_no_timestamp(tmp_path):
    assert run(tmp_path, {}, journal=True) == [
        "<7>DEBUG standby.test: a debug line",
        "<6>INFO standby.test: an info line",
        "<4>WARNING standby.test: a warning line",
        "<3>ERROR standby.test: an error line",
        "<3>its second line",
    ]


def test_invocation_id_alone_means_systemd(tmp_path):
    lines = run(tmp_path, {"INVOCATION_ID": "0123456789abcdef0123456789abcdef"})
    assert lines[1] == "<6>INFO standby.test: an info line"


def test_a_journal_stream_that_is_not_our_stderr_is_not_the_journal(tmp_path):
    """A child of a service whose stderr was redirected inherits JOURNAL_STREAM: it is not writing there."""
    lines = run(tmp_path, {"JOURNAL_STREAM": "1:2"})
    assert all(STAMP.match(line) for line in lines[:4]), lines
    assert lines[1].endswith(" INFO standby.test: an info line")


def test_outside_systemd_lines_start_with_the_time(tmp_path):
    lines = run(tmp_path, {})
    assert len(lines) == 5 and all(STAMP.match(line) for line in lines[:4]), lines
    assert lines[2].endswith(" WARNING standby.test: a warning line")
    assert not any(line.startswith("<") for line in lines)


def test_a_log_file_is_appended_with_timestamps_and_follows_a_rotation(tmp_path):
    log, rotated = tmp_path / "daemon.log", tmp_path / "daemon.log.1"
    log.write_text("an older line\n")
    assert run(tmp_path, {}, str(log), str(rotated), journal=True) == []  # nothing on stderr, even under systemd
    old = rotated.read_text().splitlines()
    assert old[0] == "an older line" and all(STAMP.match(line) for line in old[1:5]), old
    assert old[3].endswith(" WARNING standby.test: a warning line")
    new = log.read_text().splitlines()
    assert len(new) == 1 and STAMP.match(new[0]) and new[0].endswith(" INFO standby.test: after the rotation"), new
