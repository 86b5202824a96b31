"""plumbing.serve: a read loop that answers requests never waits on a write.

Two daemons whose read loops each wait to write to the other stop reading once both connections' buffers
are full, until a request times out (the fuzzer's fake process server found the master target silent for
60 s that way). Real TCP on 127.0.0.1 with a peer that does not read: the write of a reply blocks for
real.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from standby.plumbing.errors import BadInput, RequestFailed
from standby.plumbing.link import Link
from standby.plumbing.serve import answer, serve_request
from standby.proto.errors import LocalProtocolError
from standby.proto.messages import Request
from tests.plumbing.tcp import close, tcp_link


async def blocked_link() -> tuple[Link, socket.socket, asyncio.Server]:
    """A Link whose peer never reads, its send buffer already full: any further write waits."""
    link, peer, server = await tcp_link(peer_rcvbuf=4096)
    writer = link.writer
    writer.transport.set_write_buffer_limits(high=0)
    # Fill the kernel buffers until a write stays pending: from now on drain() waits for a reader.
    for _ in range(10_000):
        writer.write(b"\0" * 65536)
        if writer.transport.get_write_buffer_size() > 0:
            try:
                await asyncio.wait_for(writer.drain(), 0.2)
            except TimeoutError:
                break
    else:
        raise AssertionError("the peer's buffers never filled")
    return link, peer, server


def test_a_reply_sent_from_its_own_task_does_not_hold_up_the_read_loop() -> None:
    async def main() -> None:
        link, peer, server = await blocked_link()
        ran: list[dict[str, Any]] = []

        async def handler(**args: Any) -> dict[str, Any]:
            ran.append(args)
            return {}

        replies: set[asyncio.Task[Any]] = set()
        try:
            req = Request(1, "mt_report", {"disks": {}})
            await asyncio.wait_for(serve_request(link, req, "mt", "ps", handler, replies), 2)
            assert ran == [{"disks": {}}], "the handler runs before serve_request returns"
            assert len(replies) == 1 and not next(iter(replies)).done(), "the answer waits for the peer, apart"
            # Without `replies` the same call waits on the write: what a read loop must never do.
            try:
                await asyncio.wait_for(serve_request(link, Request(2, "mt_report", {"disks": {}}), "mt", "ps",
                                                     handler), 1)
            except TimeoutError:
                pass
            else:
                raise AssertionError("a reply to a peer that does not read was written at once: the test is void")
        finally:
            for t in replies:
                t.cancel()
            await asyncio.gather(*replies, return_exceptions=True)
            close(link, peer, server)

    asyncio.run(main())



class _NamedLink:
    """`answer` uses its link only to name the peer in log lines."""

    name = "peer"


def _answer(exc: BaseException) -> tuple[bool, str, str]:
    async def handler(**_: Any) -> dict[str, Any]:
        raise exc

    reply = asyncio.run(answer(_NamedLink(), Request(7, "status", {}), "admin", "ps", handler))  # type: ignore[arg-type]
    assert reply.id == 7
    return reply.ok, reply.code, reply.message


def test_a_request_fails_the_one_way_with_its_code_and_a_bug_with_failed_and_a_traceback(caplog: Any) -> None:
    assert _answer(RequestFailed("refused", "web01 is failed over")) == (False, "refused", "web01 is failed over")
    assert _answer(RequestFailed("unknown-point", "no point 9")) == (False, "unknown-point", "no point 9")
    assert _answer(BadInput("no such file")) == (False, "failed", "no such file")
    assert _answer(LocalProtocolError("bad-batch", "too big")) == (False, "bad-batch", "too big")
    assert not [r for r in caplog.records if r.exc_info]
    ok, code, text = _answer(KeyError("machine"))
    assert (ok, code) == (False, "failed") and "KeyError" in text
    assert [r for r in caplog.records if r.exc_info and "a bug" in r.getMessage()]
