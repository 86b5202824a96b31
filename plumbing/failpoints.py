"""Fail points: named places in the daemons where a test can make an unexpected exception happen, to
prove that supervision catches it (promise 9: "a test kills one on purpose").

Off unless the environment sets `STANDBY_FAILPOINTS`, a comma-separated list of `NAME` or `NAME=COUNT`
(how many times it fires; default once), read once at import. Production never sets it; the cost of an
unset fail point is one dictionary lookup. The names in use are listed in FAILPOINTS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

log = logging.getLogger("standby.failpoints")
STALL_SECONDS = 2.0

FAILPOINTS = {
    "mt.apply": "the master target's apply task of a disk, before it writes a group",
    "mt.poll": "the master target's task that learns disk assignments",
    "ps.writer": "the process server's cache writer of a disk, before it appends",
    "ps.sender": "the process server's task that sends a disk's records to its master target",
    "agent.epoch": "the agent's delta epoch loop of a disk, before a cut",
    "service.stall": "any daemon: SIGUSR2 blocks its event loop for good (the systemd watchdog's test)",
    "ps.final_sync": "the process server's failback --complete holds STALL_SECONDS in its final sync, each disk held "
                     "at its final point (a window to kill a daemon in: tests/faults/test_roundtrip_faults.py)",
}


class InjectedFault(RuntimeError):
    """An exception a fail point raised on purpose."""


def _parse(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, count = item.partition("=")
        out[name] = int(count) if count.isdigit() else 1
    return out


_armed = _parse(os.environ.get("STANDBY_FAILPOINTS", ""))
_lock = threading.Lock()


def armed(name: str) -> bool:
    """Whether fail point `name` is armed and has not fired its count yet."""
    with _lock:
        return _armed.get(name, 0) > 0


def _take(name: str) -> bool:
    """Count fail point `name` down once if it is armed; whether it fires now."""
    if not _armed:
        return False
    with _lock:
        left = _armed.get(name, 0)
        if left <= 0:
            return False
        _armed[name] = left - 1
    return True


def hit(name: str) -> None:
    """Raise InjectedFault if fail point `name` is armed (and count it down)."""
    if not _take(name):
        return
    log.warning("fail point %s fires (STANDBY_FAILPOINTS)", name)
    raise InjectedFault(f"injected fault at {name}")


async def stall(name: str, seconds: float = STALL_SECONDS) -> None:
    """Hold the caller `seconds` if fail point `name` is armed (counted down like hit): not a fault but a
    known moment, long enough for a test to kill a daemon while a step is under way."""
    if not _take(name):
        return
    log.warning("fail point %s holds %.1f s (STANDBY_FAILPOINTS)", name, seconds)
    await asyncio.sleep(seconds)
