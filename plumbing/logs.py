"""One logging configuration per process: a logger tree named after the daemon, to stderr (the journal)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(daemon: str, level: str | None = None) -> logging.Logger:
    level = (level or os.environ.get("STANDBY_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd the journal adds its own timestamp; elsewhere we need one.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(daemon)
