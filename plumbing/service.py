"""Daemon lifecycle: start up, serve, shut down — with systemd notifications and signal handling.

SIGTERM/SIGINT ask for a graceful stop (the daemon's `stop` event is set); a second one forces exit.
A daemon that never got to serve exits with EXIT_NOT_STARTED so systemd and scripts can tell.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .errors import EXIT_INTERRUPTED, EXIT_NOT_STARTED, EXIT_OK, StandbyError

log = logging.getLogger("standby.service")
# Seconds a stopping daemon waits for its worker threads after its own shutdown is done.
EXIT_GRACE = 5.0


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
    """SIGUSR1: log where every task of the daemon is waiting (for a stuck daemon at 3 a.m.): the whole
    chain of coroutines each one awaits, outermost first (asyncio's own stack shows only the outermost
    frame of a suspended task, which rarely says what it waits for)."""
    for task in asyncio.all_tasks():
        lines = [f"task {task.get_name()}:"]
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        log.warning("%s", "\n".join(lines))


def install_loop() -> None:
    """uvloop by default; STANDBY_EVENT_LOOP=asyncio selects asyncio's own loop (for diagnosis)."""
    if os.environ.get("STANDBY_EVENT_LOOP", "uvloop") == "asyncio":
        return
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; returns the soft limit now in force.

    Why: the soft limit is often 1,024 (a shell's default; systemd gives services 1,024 soft, 524,288 hard)
    while a daemon with many disks and peers legitimately holds more — cache segments, journal files,
    sockets. Running out fails whatever opens a file next, e.g. a cache append (finding 6). The hard limit
    is what the administrator allows; the soft one is only a guard for programs using select(), which we
    do not (uvloop and asyncio use epoll). The value is logged so an operator can see it in the journal.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux refuses an infinite RLIMIT_NOFILE: use the kernel's ceiling
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-file limit raised from %d to %d (the hard limit)", soft, target)
            return target
        except (OSError, ValueError) as exc:
            log.warning("open-file limit stays at %d: cannot raise it to %d: %s", soft, target, exc)
            return soft
    log.info("open-file limit: %s (hard limit %s)", _limit(soft), _limit(hard))
    return soft


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def run_daemon(name: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `main(stop)` until it returns; `stop` is set on the first SIGTERM/SIGINT."""
    raise_open_file_limit()
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

    code = EXIT_OK
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(runner())
    except StandbyError as exc:
        log.error("%s: %s", name, exc)
        code = exc.exit_code if started else EXIT_NOT_STARTED
    finally:
        busy = _close_loop(loop, name)
    if busy:
        # Durable state is written by now (each daemon's own shutdown did it); what is left are worker
        # threads busy with work nobody waits for any more (hashing a disk for a resync that ended). An
        # interpreter exit would wait for them — minutes, past systemd's stop timeout (issue 9, finding 7).
        logging.shutdown()
        os._exit(code)
    return code


def _close_loop(loop: asyncio.AbstractEventLoop, name: str) -> bool:
    """Cancel what still runs, then give worker threads EXIT_GRACE seconds. True if some are still busy."""
    try:
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        try:
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), EXIT_GRACE))
        except TimeoutError:
            busy = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
            log.warning("%s: %d worker thread(s) still busy after %.0f s (%s): exiting without them", name,
                        len(busy), EXIT_GRACE, ", ".join(busy[:8]))
            return True
        return False
    finally:
        loop.close()


def host_id() -> str:
    """This host's identity (systemd machine-id, else the host name): tells whether a peer shares it."""
    try:
        return Path("/etc/machine-id").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()
