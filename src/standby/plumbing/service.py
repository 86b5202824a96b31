"""Daemon lifecycle: start up, serve, shut down — with systemd notifications and signal handling.

SIGTERM/SIGINT ask for a graceful stop (the daemon's `stop` event is set); a second one forces exit.
A daemon that never got to serve exits with EXIT_NOT_STARTED so systemd and scripts can tell.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from .errors import EXIT_INTERRUPTED, EXIT_NOT_STARTED, EXIT_OK, StandbyError

log = logging.getLogger("standby.service")


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about READY=1 / STOPPING=1 / STATUS=…; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)


def dump_tasks() -> None:
    """SIGUSR1: log where every task of the daemon is waiting (for a stuck daemon at 3 a.m.)."""
    import io

    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(limit=8, file=buf)
        log.warning("task %s:\n%s", task.get_name(), buf.getvalue())


def install_loop() -> None:
    """uvloop by default; STANDBY_EVENT_LOOP=asyncio selects asyncio's own loop (for diagnosis)."""
    if os.environ.get("STANDBY_EVENT_LOOP", "uvloop") == "asyncio":
        return
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass


def run_daemon(name: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `main(stop)` until it returns; `stop` is set on the first SIGTERM/SIGINT."""
    install_loop()
    started = False

    async def runner() -> None:
        nonlocal started
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now")
                os._exit(EXIT_INTERRUPTED)
            log.info("%s: received %s, shutting down", name, signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        started = True
        await main(stop)

    try:
        asyncio.run(runner())
    except StandbyError as exc:
        log.error("%s: %s", name, exc)
        return exc.exit_code if started else EXIT_NOT_STARTED
    return EXIT_OK


def host_id() -> str:
    """This host's identity (systemd machine-id, else the host name): tells whether a peer shares it."""
    try:
        return Path("/etc/machine-id").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()
