"""What systemd hears from a daemon (sd_notify(3), Type=notify units): READY=1, STATUS=, WATCHDOG=1,
STOPPING=1 — each one datagram to the AF_UNIX socket named by $NOTIFY_SOCKET. Outside systemd (no
NOTIFY_SOCKET) every call is a no-op.

Why our own few lines and not a library: the protocol is one datagram of `KEY=value` lines. `sdnotify`
(PyPI) is the same fifteen lines, last released in 2017, and hides a failed send unless built in debug
mode; it knows nothing of the watchdog's WATCHDOG_USEC/WATCHDOG_PID (sd_watchdog_enabled(3)), which is
the part that needs care. python-systemd needs libsystemd's headers to build. So: `sd_notify` below, and
the `Notifier` that decides *when* to say what.

The watchdog promise: WATCHDOG=1 goes out from a task of the daemon's own event loop, every half of
WATCHDOG_USEC. A loop that is stuck (a blocking call, a busy loop) cannot run that task, the pings stop,
and systemd kills and restarts the daemon (WatchdogSec= in the unit). A thread would keep pinging for a
dead loop: that is why it is a task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("standby.service")
# Seconds between refreshes of STATUS= (it is also sent at once when the daemon says something changed).
STATUS_INTERVAL = 2.0


def sd_notify(state: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send `state` (newline-separated KEY=value) to systemd; False outside systemd or if it failed."""
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # an abstract socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as exc:
        log.debug("cannot notify systemd: %s", exc)
        return False


def watchdog_interval(env: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds within which systemd wants a WATCHDOG=1, or None when the watchdog is off for this process.

    As sd_watchdog_enabled(3): WATCHDOG_USEC must be a positive integer, and WATCHDOG_PID, when set, must
    be this process (a child that inherited the environment — a pre/post script — must not ping for us)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and owner != str(os.getpid() if pid is None else pid):
        return None
    return usec / 1e6


class Notifier:
    """The daemon's side of the conversation with systemd: READY=1 once, STATUS= kept current in words,
    WATCHDOG=1 from the event loop, STOPPING=1 when an ordered shutdown begins."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.env = env
        self.describe: Callable[[], str] | None = None
        self.is_ready = False
        self.stopping_since: float | None = None
        self.last_status: str | None = None
        self.failed = False

    def send(self, state: str) -> None:
        if not sd_notify(state, self.env) and self.env.get("NOTIFY_SOCKET") and not self.failed:
            self.failed = True  # said once: the watchdog would repeat it every few seconds
            log.warning("cannot notify systemd at %s (NOTIFY_SOCKET): it will not hear from this daemon",
                        self.env["NOTIFY_SOCKET"])

    def ready(self, describe: Callable[[], str]) -> None:
        """The daemon serves (or keeps retrying for a reason `describe()` tells): READY=1 with its STATUS the
        first time; afterwards only the STATUS, at once (call it again when something changed)."""
        self.describe = describe
        text = self._text()
        if not self.is_ready:
            self.is_ready = True
            self.last_status = text
            self.send(f"READY=1\nSTATUS={text}")
        else:
            self.status(text)

    def status(self, text: str) -> None:
        """STATUS=text, unless it is what systemd shows already, or the daemon is stopping (that says so)."""
        if self.stopping_since is not None or text == self.last_status:
            return
        self.last_status = text
        self.send(f"STATUS={text}")

    def stopping(self, why: str) -> None:
        if self.stopping_since is None:
            self.last_status = f"stopping: {why}"
            self.send(f"STOPPING=1\nSTATUS={self.last_status}")
            self.stopping_since = time.monotonic()

    def _text(self) -> str:
        try:
            text = self.describe() if self.describe is not None else ""
        except Exception as exc:  # a status line must never take the daemon down
            log.debug("status line failed: %r", exc)
            return self.last_status or ""
        return " ".join(text.split())  # one line: STATUS= ends at a newline

    async def run(self) -> None:
        """Keep STATUS= current and, when systemd asks for it, ping the watchdog — for ever (cancel it)."""
        interval = watchdog_interval(self.env)
        if interval is not None:
            log.info("systemd watchdog: every %.1f s (WatchdogSec=%.0f s)", interval / 2, interval)
        next_status = time.monotonic() + STATUS_INTERVAL
        step = min(STATUS_INTERVAL, interval / 2) if interval else STATUS_INTERVAL
        while True:
            if interval is not None:
                self.send("WATCHDOG=1")
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_INTERVAL
                if self.is_ready:
                    self.status(self._text())
            await asyncio.sleep(step)
