"""plumbing.link: a request's waiting ends with its task's cancellation, always.

On Python 3.11 `asyncio.wait_for` swallows a cancellation that arrives in the same loop iteration as the
awaited result (CPython gh-86296). `Link.request` used it: the master target's assignment poll, cancelled
as its session was torn down, went on and waited 60 s for the answer to its next request on a connection
nobody read any more (the fuzzer's fake process server saw it silent for a minute, again and again).
Real TCP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from standby.proto.messages import Reply
from tests.plumbing.tcp import close, tcp_link


def test_a_request_cancelled_as_its_reply_arrives_is_cancelled() -> None:
    async def main() -> None:
        link, peer, server = await tcp_link()
        try:
            for _ in range(20):
                task = asyncio.ensure_future(link.request("status", timeout=60))
                while not link._pending:  # the request is on its way
                    await asyncio.sleep(0)
                await asyncio.sleep(0.02)  # sent: now only its reply is awaited
                (rid,) = link._pending
                # The reply and the cancellation in the same loop iteration, as when a session ends.
                link.deliver(Reply(rid, True, {}))
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, 5)
        finally:
            close(link, peer, server)

    asyncio.run(main())


def test_a_request_still_gets_its_reply_and_times_out() -> None:
    async def main() -> None:
        link, peer, server = await tcp_link()
        got: list[dict[str, Any]] = []
        try:
            task = asyncio.ensure_future(link.request("status", timeout=60))
            while not link._pending:
                await asyncio.sleep(0)
            (rid,) = link._pending
            link.deliver(Reply(rid, True, {"ok": 1}))
            got.append(await asyncio.wait_for(task, 5))
            with pytest.raises(TimeoutError):
                await link.request("status", timeout=0.2)
            assert not link._pending, "a request that timed out leaves nothing behind"
        finally:
            close(link, peer, server)
        assert got == [{"ok": 1}]

    asyncio.run(main())
