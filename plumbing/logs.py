"""One logging configuration per process: a logger tree named after the daemon, to stderr — or to a file.

Under systemd (its journal reads our stderr) each line starts with its syslog priority, `<3>` error,
`<4>` warning, `<6>` info, `<7>` debug (sd-daemon(3)), so `journalctl -p warning` and the journal's
colours work, and carries no timestamp of its own: the journal stamps every line. Every line of a
multi-line message (a traceback, a task dump) gets the prefix, or the journal would file the rest at
the default priority. Elsewhere lines start with the time, as they always did.

`--log-file PATH` (installs without systemd): appended to, with timestamps; reopened by itself when
logrotate moves or removes the file (WatchedFileHandler checks the file before each line, so no signal
is needed).
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from .errors import NotStarted

FORMAT = "%(levelname)s %(name)s: %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon(3): SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """No timestamp; `<N>` on every line of the record."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def under_systemd(env: Mapping[str, str] = os.environ, stream: object = None) -> bool:
    """Whether our stderr goes to systemd (JOURNAL_STREAM or INVOCATION_ID set). JOURNAL_STREAM names the
    journal's stream as DEVICE:INODE: if stderr is something else (a child of a service that redirected
    it) the lines are not the journal's; INVOCATION_ID alone (StandardError=kmsg, syslog) still is."""
    journal = env.get("JOURNAL_STREAM")
    if journal:
        try:
            dev, ino = (int(x) for x in journal.split(":"))
            st = os.fstat((stream or sys.stderr).fileno())  # type: ignore[attr-defined]
        except (ValueError, OSError, AttributeError):
            return False
        return (st.st_dev, st.st_ino) == (dev, ino)
    return bool(env.get("INVOCATION_ID"))


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """A daemon's `run` options for its log."""
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--log-file", type=Path, default=None, metavar="PATH",
                        help="append the log to PATH, with timestamps (default: stderr; under systemd, the journal); "
                        "reopened by itself when rotated")


def setup_logging(daemon: str, level: str | None = None, log_file: Path | None = None) -> logging.Logger:
    """Log to stderr, or to `log_file` (NotStarted if it cannot be opened)."""
    level = (level or os.environ.get("STANDBY_LOG_LEVEL") or "INFO").upper()
    handler: logging.Handler
    if log_file is not None:
        try:
            handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise NotStarted(f"cannot open the log file {log_file}: {exc.strerror or exc}") from None
        handler.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter() if under_systemd() else logging.Formatter("%(asctime)s " + FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(daemon)
