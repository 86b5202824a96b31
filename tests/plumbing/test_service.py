"""plumbing.service: `kill -USR1 <pid>` logs where every task waits, down to the innermost coroutine.

asyncio's own stack of a suspended task shows only its outermost frame ("run_writer"), which says nothing
of what it waits for; the dump walks the chain of awaits (how the fuzzer's stuck-looking record was traced
to a queue that was simply empty).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from standby.plumbing.service import dump_tasks


async def innermost_wait(ev: asyncio.Event) -> None:
    await ev.wait()


async def middle(ev: asyncio.Event) -> None:
    await innermost_wait(ev)


async def outermost(ev: asyncio.Event) -> None:
    await middle(ev)


def test_the_dump_names_every_coroutine_a_task_awaits(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        ev = asyncio.Event()
        task = asyncio.create_task(outermost(ev), name="the-waiter")
        await asyncio.sleep(0)
        with caplog.at_level(logging.WARNING, logger="standby.service"):
            dump_tasks()
        ev.set()
        await task

    asyncio.run(main())
    text = "\n".join(r.getMessage() for r in caplog.records)
    block = text[text.index("task the-waiter:"):].split("\ntask ")[0]
    names = [line.rsplit(" in ", 1)[1] for line in block.splitlines()[1:]]
    assert names == ["outermost", "middle", "innermost_wait", "wait"], block
