"""`standby status --watch`: status again and again, through process server outages.

A watch is what an operator leaves running while the process server restarts or the network drops: an
unreachable server is a state to report, not a reason to exit. It is said once per outage (with the
reason and the retry interval) and again when the server answers; output resumes then. The watch ends
on Ctrl-C, or after `--for SECONDS` when the operator asked for a bound.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from standby.plumbing.errors import EXIT_OK, EXIT_UNREACHABLE, Unreachable

from .client import AdminClient

_PREFIX = "cannot reach the process server at "


def reason(exc: Unreachable) -> str:
    """The cause alone, without the 'cannot reach … at HOST:PORT' the watch's own line already says."""
    text = str(exc)
    if text.startswith(_PREFIX):
        return text[len(_PREFIX):].partition(": ")[2] or text
    return text


def watch_status(
    client: AdminClient,
    machine: str | None,
    as_json: bool,
    interval: float,
    total: float | None,
    render: Callable[[dict[str, Any]], str],
) -> int:
    """Print status every `interval` seconds until interrupted or `total` seconds passed. Returns 0 when the
    last attempt got an answer, 3 (unreachable) when the bound ran out during an outage."""
    deadline = None if total is None else time.monotonic() + total
    down = False
    while True:
        try:
            res = client.call("status", timeout=max(interval, 10.0), machine=machine)
        except Unreachable as exc:
            if not down:
                print(f"standby: process server at {client.where} unreachable: {reason(exc)}; "
                      f"retrying every {interval:g} s", file=sys.stderr, flush=True)
            down = True
        else:
            if down:
                print(f"standby: process server at {client.where} reachable again", file=sys.stderr, flush=True)
            down = False
            print(json.dumps(res, indent=2) if as_json else render(res), flush=True)
        if deadline is not None and time.monotonic() + interval > deadline:
            return EXIT_UNREACHABLE if down else EXIT_OK
        time.sleep(interval)
