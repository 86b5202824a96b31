"""Daemon lifecycle: start up, serve, shut down — with systemd notifications and signal handling.

SIGTERM/SIGINT ask for a graceful stop (the daemon's `stop` event is set, systemd hears STOPPING=1); a
second one forces exit. A daemon that never got to serve exits with EXIT_NOT_STARTED so systemd and
scripts can tell. What systemd hears and when (READY=1, STATUS=, WATCHDOG=1): plumbing.notify.

How long a stop takes, at most (the units' TimeoutStopSec= is set above it): the daemon's own ordered
shutdown (closing sessions, the agent's clean-stop records, the master target's applies in flight) gets
STOP_LIMIT seconds — past that, where each task waits is logged and the rest is cancelled — then its
worker threads get EXIT_GRACE seconds, then the process exits without them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import failpoints
from .errors import EXIT_INTERRUPTED, EXIT_NOT_STARTED, EXIT_OK, StandbyError
from .memory import tune_malloc
from .notify import Notifier
from .supervise import supervise

log = logging.getLogger("standby.service")
# Seconds a stopping daemon waits for its worker threads after its own shutdown is done.
EXIT_GRACE = 5.0
# Seconds a daemon's own ordered shutdown may take before what is left of it is cancelled.
STOP_LIMIT = 20.0
# The daemon's main coroutine: `main(stop, notifier)` serves until `stop` is set, and tells `notifier`
# when it serves (READY=1) and what it does (STATUS=).
Main = Callable[[asyncio.Event, Notifier], Awaitable[None]]


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


def run_daemon(name: str, main: Main) -> int:
    """Run `main(stop, notifier)` until it returns; `stop` is set on the first SIGTERM/SIGINT."""
    raise_open_file_limit()
    tune_malloc()
    install_loop()
    started = False

    async def runner() -> None:
        nonlocal started
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        notifier = Notifier()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now")
                os._exit(EXIT_INTERRUPTED)
            what = signal.Signals(signum).name
            log.info("%s: received %s, shutting down", name, what)
            notifier.stopping(f"received {what}")
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        if failpoints.armed("service.stall"):
            loop.add_signal_handler(signal.SIGUSR2, stall)
        started = True
        notifying = asyncio.create_task(supervise("systemd notifications", notifier.run),
                                        name="systemd notifications")
        try:
            await within_stop_limit(main(stop, notifier), stop, name)
        finally:
            notifying.cancel()

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


async def within_stop_limit(work: Awaitable[None], stop: asyncio.Event, name: str,
                            limit: float = STOP_LIMIT) -> None:
    """Await `work`; once `stop` is set it has `limit` seconds to end, then where each task waits is
    logged (the stuck shutdown's diagnosis) and it is cancelled."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            done, _ = await asyncio.wait([task], timeout=limit)
            if not done:
                log.warning("%s: shutdown still not done after %.0f s: cancelling what is left (where each task "
                            "waits follows)", name, limit)
                dump_tasks()
                task.cancel()
                await asyncio.wait([task])
                if not task.cancelled():
                    task.result()  # it ended after all, maybe with its own error
                return
        await task
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()


def stall() -> None:
    """Fail point service.stall (STANDBY_FAILPOINTS): on SIGUSR2 the event loop blocks for good, as a loop
    stuck in a blocking call would — the systemd watchdog's test (WATCHDOG=1 stops; systemd kills us)."""
    log.warning("fail point service.stall fires: the event loop blocks for good")
    while True:
        time.sleep(3600)


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
