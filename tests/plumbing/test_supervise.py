"""Supervision (plumbing.supervise): a failing task is logged with its traceback, reported, restarted
with a growing backoff, reported healthy again; connection ends and cancellation pass through; a spawned
task's failure is never lost."""

from __future__ import annotations

import asyncio
import logging

import pytest

from standby.plumbing.link import LinkClosed
from standby.plumbing.supervise import describe, spawn, supervise


def test_a_failing_task_is_logged_reported_restarted_and_recovers(caplog):
    events: list[object] = []
    runs = {"n": 0}

    async def work() -> str:
        runs["n"] += 1
        if runs["n"] <= 2:
            raise KeyError("boom")
        await asyncio.sleep(0.2)
        return "done"

    async def main() -> str:
        return await supervise("disk x apply", work, on_failure=lambda e: events.append(describe(e)),
                               on_recovery=lambda: events.append("recovered"), backoff=0.01, healthy_after=0.05)

    with caplog.at_level(logging.ERROR, "standby.supervise"):
        assert asyncio.run(main()) == "done"
    assert events == ["KeyError: 'boom'", "KeyError: 'boom'", "recovered"]
    tracebacks = [r for r in caplog.records if r.exc_info and "disk x apply failed unexpectedly" in r.getMessage()]
    assert len(tracebacks) == 2


def test_connection_ends_and_cancellation_pass_through():
    async def closed() -> None:
        raise LinkClosed("peer gone")

    async def main() -> None:
        with pytest.raises(LinkClosed):
            await supervise("s", closed, passthrough=(LinkClosed,))
        t = asyncio.ensure_future(supervise("s", lambda: asyncio.sleep(10)))
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())


def test_a_spawned_task_that_fails_is_logged_with_its_traceback(caplog):
    async def bad() -> None:
        raise ValueError("lost otherwise")

    async def main() -> set[asyncio.Task[None]]:
        tasks: set[asyncio.Task[None]] = set()
        spawn(bad(), "answer", tasks)
        await asyncio.sleep(0.01)
        return tasks

    with caplog.at_level(logging.ERROR, "standby.supervise"):
        assert asyncio.run(main()) == set()
    [rec] = [r for r in caplog.records if "task answer failed unexpectedly" in r.getMessage()]
    assert rec.exc_info is not None and "lost otherwise" in str(rec.exc_info[1])
