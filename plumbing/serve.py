"""Answering a peer's request, the one way every daemon does it (promise 9: every request gets an
answer; a value from a peer is validated at the boundary before anything stores or acts on it).

`serve_request` checks the request against its typed definition (proto.requests: the op exists, the
peer's role may send it, every argument is of the right type and in range), runs the handler with the
validated arguments, and sends exactly one REPLY: the result, or an error with a code — the request's
own failure (`RequestFailed`, the one failure type of every daemon, with its code),
`bad-input`/`forbidden`/`unknown-request` for an invalid request (refused to that peer, logged, nothing
stored), or `failed` for a bug, whose traceback is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from standby.proto.enums import ErrorCode
from standby.proto.errors import ProtocolError
from standby.proto.messages import Reply, Request
from standby.proto.requests import BadRequest, parse_request

from .errors import RequestFailed, StandbyError
from .link import Link, LinkClosed
from .supervise import spawn

log = logging.getLogger("standby.serve")
# Refused requests logged per connection at WARNING; after that at DEBUG (a peer sending junk in a loop
# must not flood the journal).
LOG_REFUSALS = 10

Handler = Callable[..., Awaitable[dict[str, Any] | None]]


async def serve_request(link: Link, msg: Request, role: str, server: str, handler: Handler | None,
                        replies: set[asyncio.Task[Any]] | None = None) -> None:
    """Validate `msg` (from a peer of `role`, served by us as `server`), run `handler(**args)` and send
    its REPLY. `handler` None: no handler here for this op (answered `unknown-request`).

    `replies`: the REPLY is sent from a task of its own (held in that set) and this returns once the
    handler has run. A read loop passes it: a read loop must never wait on a write, or two daemons that
    each wait to write to the other, both connections' buffers full, stop reading for good (until a
    request times out) — found by the fuzzer's fake process server. Handlers still run in order."""
    reply = await answer(link, msg, role, server, handler)
    if replies is None:
        await send_reply(link, msg.op, reply)
    else:
        spawn(send_reply(link, msg.op, reply), f"reply to {msg.op}", replies)


async def send_reply(link: Link, op: str, reply: Reply) -> None:
    try:
        await link.send(reply)
    except LinkClosed as exc:
        log.debug("%s: request %s: cannot send the answer: %s", link.name, op, exc)


async def answer(link: Link, msg: Request, role: str, server: str, handler: Handler | None) -> Reply:
    try:
        req = parse_request(msg.op, msg.args, role, server)
        if handler is None:
            raise BadRequest(ErrorCode.UNKNOWN_REQUEST, f"{msg.op}: not served here")
    except BadRequest as exc:
        refused(link, msg, exc.code, str(exc))
        return Reply(msg.id, False, {}, exc.code, str(exc))
    try:
        result = await handler(**req.to_wire())
        return Reply(msg.id, True, result or {})
    except (asyncio.CancelledError, LinkClosed):
        raise
    except BadRequest as exc:  # a handler's own check of a peer's value
        refused(link, msg, exc.code, str(exc))
        return Reply(msg.id, False, {}, exc.code, str(exc))
    except RequestFailed as exc:  # the request's own failure, with its code
        return Reply(msg.id, False, {}, exc.code, str(exc))
    except StandbyError as exc:
        return Reply(msg.id, False, {}, ErrorCode.FAILED, str(exc))
    except ProtocolError as exc:  # a message a handler passed on was refused: answered with its reason code
        return Reply(msg.id, False, {}, exc.code, str(exc))
    except Exception as exc:
        log.exception("%s: request %s failed unexpectedly (a bug: please report it with this trace)", link.name,
                      msg.op)
        return Reply(msg.id, False, {}, ErrorCode.FAILED, f"{msg.op} failed: {exc!r}")


def refused(link: Link, msg: Request, code: str, text: str) -> None:
    n = getattr(link, "refusals", 0) + 1
    link.refusals = n  # type: ignore[attr-defined]
    level = logging.WARNING if n <= LOG_REFUSALS else logging.DEBUG
    log.log(level, "%s: refused request %s (%s): %s", link.name, str(msg.op)[:64], code, text)
