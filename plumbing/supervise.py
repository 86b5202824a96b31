"""Supervision of long-lived tasks (promise 9: nothing fails unseen).

Every long-lived task of a daemon runs under `supervise`: an unexpected exception is logged with its
traceback, reported to the owner (who turns the affected disk — only that disk — failed in status, with
the reason), and the work is started again after a backoff that grows while it keeps failing. Exceptions
that end a *connection* (`LinkClosed`, protocol errors, socket errors: the `passthrough` types) are not
bugs of the task: they propagate to whoever owns the connection, which reconnects.

`spawn` is for short-lived tasks nobody awaits (answering one request): whatever escapes is logged with
its traceback instead of vanishing into an unretrieved task exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("standby.supervise")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
# A task that ran this long before failing is considered to have recovered: its backoff starts over.
HEALTHY_AFTER = 60.0


def describe(exc: BaseException) -> str:
    """A one-line reason for status: the exception's type and message."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def supervise(
    name: str,
    work: Callable[[], Awaitable[Any]],
    *,
    on_failure: Callable[[BaseException], Any] | None = None,
    on_recovery: Callable[[], Any] | None = None,
    passthrough: tuple[type[BaseException], ...] = (),
    restart: bool = True,
    backoff: float = BACKOFF_FIRST,
    healthy_after: float = HEALTHY_AFTER,
) -> Any:
    """Run `work()` until it returns; restart it after an unexpected exception (logged with its traceback
    and handed to `on_failure`). After a failure, `on_recovery` runs once the restarted `work` has run
    `healthy_after` seconds without failing, or has returned normally. Cancellation and `passthrough`
    exceptions propagate."""
    delay = backoff
    failed = False
    while True:
        started = time.monotonic()
        task = asyncio.ensure_future(work())
        watch = asyncio.ensure_future(asyncio.sleep(healthy_after)) if failed and on_recovery else None
        try:
            if watch is not None:
                await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
                if not task.done():
                    _call(on_recovery, None, name)  # type: ignore[arg-type]
                    failed = False
            result = await task
        except asyncio.CancelledError:
            task.cancel()
            raise
        except passthrough:
            raise
        except Exception as exc:
            log.exception("%s failed unexpectedly (a bug: please report it with this trace); %s", name,
                          f"restarting in {delay:.0f} s" if restart else "not restarting")
            failed = True
            if on_failure is not None:
                _call(on_failure, exc, name)
            if not restart:
                raise
            if time.monotonic() - started > healthy_after:
                delay = backoff
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            continue
        finally:
            if watch is not None:
                watch.cancel()
        if failed and on_recovery is not None:
            _call(on_recovery, None, name)
        return result


def _call(fn: Callable[..., Any], arg: BaseException | None, name: str) -> None:
    try:
        fn(arg) if arg is not None else fn()
    except Exception:  # the reporter itself must not take the supervisor down
        log.exception("%s: reporting a failure failed", name)


def spawn(coro: Awaitable[Any], name: str, tasks: set[asyncio.Task[Any]] | None = None) -> asyncio.Task[Any]:
    """Start a task nobody awaits; if it fails, its traceback is logged (never lost). `tasks`: a set that
    holds it while it runs (so it is not garbage-collected, and its owner can cancel it)."""
    task = asyncio.ensure_future(coro)
    task.set_name(name)
    if tasks is not None:
        tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        if tasks is not None:
            tasks.discard(t)
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None and not _quiet(exc):
            log.error("task %s failed unexpectedly (a bug: please report it with this trace)", name,
                      exc_info=(type(exc), exc, exc.__traceback__))

    task.add_done_callback(done)
    return task


def _quiet(exc: BaseException) -> bool:
    """Connection ends are how a session's helpers stop: not worth a traceback."""
    from .link import LinkClosed

    return isinstance(exc, LinkClosed | ConnectionError)
