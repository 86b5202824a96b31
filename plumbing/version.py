"""`--version` for the four commands: the version of the installed package (its metadata), so the answer
is the one pip installed, whichever checkout or wheel it came from."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "standby"


def installed_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install .)"


def add_version(parser: argparse.ArgumentParser) -> None:
    """`PROG --version` prints `PROG VERSION` and exits 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
