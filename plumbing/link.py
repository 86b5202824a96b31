"""The asyncio adapter around the sans-I/O `proto.connection.Connection`: the one place where frames
meet sockets. Every daemon and the CLI use it; it knows nothing about disks.

A `Link` reads with `recv()` and writes with `send()`. `request()` sends a REQUEST and waits for the
REPLY with its id; replies are routed by whoever runs the read loop calling `deliver()` — the owner of
a link reads it in exactly one task.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from standby.proto.connection import CLOSED, NEED_DATA, Connection, Role
from standby.proto.enums import GoodbyeCode
from standby.proto.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from standby.proto.messages import Goodbye, Hello, Message, Reply, Request, Welcome
from standby.proto.requests import OPS, BadRequest, parse_reply

from .aio import wait_event
from .errors import Refused, RequestFailed, StandbyError, Unreachable
from .tls import PeerIdentity, peer_identity

log = logging.getLogger("standby.link")
READ_CHUNK = 1 << 20


# LinkClosed's code when the connection ended without a GOODBYE (lost, closed, or closed by us): never on the wire.
NO_GOODBYE = "closed"


class LinkClosed(Exception):
    """The peer closed the connection (or said goodbye).

    `code` is the peer's GOODBYE code as text (a newer peer may send one this release does not know; compare
    it with proto.enums.GoodbyeCode members), or NO_GOODBYE."""

    def __init__(self, message: str, code: str = NO_GOODBYE) -> None:
        super().__init__(message)
        self.code = code


class Link:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection, name: str) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.name = name  # for logs: who is on the other side
        self.peer: PeerIdentity | None = None
        sslobj = writer.get_extra_info("ssl_object")
        if sslobj is not None:
            self.peer = peer_identity(sslobj)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._wlock = asyncio.Lock()
        self.closed = False
        self.quiet = False  # owner's hint: log this link's comings and goings at DEBUG
        # Our HELLO role on this link ("ps" on the server's side): replies to our requests are validated
        # against their typed definitions for it (proto.requests); None: not validated (tests' fakes).
        self.role: str | None = None

    async def recv(self) -> Message:
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                try:
                    data = await self.reader.read(READ_CHUNK)
                except (ConnectionError, ssl.SSLError, OSError) as exc:
                    raise LinkClosed(f"connection to {self.name} lost: {exc}") from None
                self.conn.receive_data(data)
                continue
            if ev is CLOSED:
                raise LinkClosed(f"{self.name} closed the connection")
            if isinstance(ev, Goodbye):
                raise LinkClosed(f"{self.name} said goodbye: {ev.reason}", ev.code)
            return ev  # type: ignore[return-value]

    async def send(self, msg: Message) -> None:
        await self._write_whole(msg)

    async def send_frame(self, frame: bytes | bytearray) -> None:
        """Forward an already-encoded operational frame (BATCH or MARKER read from the cache) byte for byte."""
        await self._write_whole(frame)

    async def _write_whole(self, item: Message | bytes | bytearray) -> None:
        """Write one frame completely. Shielded: a caller cancelled mid-frame (a sender replaced after a
        reject, a session ending) must not leave half a frame on the wire for the next writer to follow."""
        if self.closed:
            raise LinkClosed(f"connection to {self.name} is closed")
        task = asyncio.ensure_future(self._locked_write(item))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if nobody awaits
        await asyncio.shield(task)

    async def _locked_write(self, item: Message | bytes | bytearray) -> None:
        async with self._wlock:
            # Checked again under the lock: a write queued while the link was being closed must not reach a
            # closed transport (asyncio then fails with AttributeError) or a closed protocol state.
            if self.closed or self.writer.is_closing():
                raise LinkClosed(f"connection to {self.name} is closed")
            try:
                data = item if isinstance(item, bytes | bytearray) else self.conn.send(item)
            except LocalProtocolError as exc:  # the protocol is closed (a GOODBYE went or came)
                raise LinkClosed(f"connection to {self.name}: {exc}") from None
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, ssl.SSLError, OSError, AttributeError) as exc:
                raise LinkClosed(f"connection to {self.name} lost: {exc!r}") from None

    async def request(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        """Send a request; the read loop must be running elsewhere (see `deliver`)."""
        rid = next(self._ids)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send(Request(rid, op, args))
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that meets the reply
            # (plumbing.aio). The master target's poll loop then went on after its session was torn down and
            # waited 60 s for the answer to its next request on a dead connection (found by the fuzzer).
            async with asyncio.timeout(timeout):
                reply = await fut
        finally:
            self._pending.pop(rid, None)
        if not reply.ok:
            raise RequestFailed(reply.code, reply.message)
        return self.checked(op, reply.result)

    def checked(self, op: str, result: dict[str, Any]) -> dict[str, Any]:
        """A peer's reply result, validated at the boundary (promise 9): its typed definition for `op`
        as sent by our role, back as the JSON dict it stands for. `subscribe` is checked by its caller
        (one bad assignment must fail that disk alone, not the whole reply)."""
        if self.role is None or op == "subscribe" or (op, self.role) not in OPS:
            return result  # only what proto.requests defines (every op the daemons send; test fakes add some)
        try:
            return parse_reply(op, result, self.role).to_wire()
        except BadRequest as exc:
            log.warning("%s: invalid reply to %s: %s", self.name, op, exc)
            raise RequestFailed(exc.code, f"{self.name} sent an invalid reply: {exc}") from None

    async def call(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        """Send a request and read the reply inline (for simple one-request-at-a-time clients)."""
        rid = next(self._ids)
        await self.send(Request(rid, op, args))
        while True:
            async with asyncio.timeout(timeout):
                msg = await self.recv()
            if isinstance(msg, Reply) and msg.id == rid:
                if not msg.ok:
                    raise RequestFailed(msg.code, msg.message)
                return self.checked(op, msg.result)

    def deliver(self, reply: Reply) -> None:
        fut = self._pending.get(reply.id)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    def fail_pending(self, exc: BaseException) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)

    async def close(self, code: GoodbyeCode | None = None, reason: str = "") -> None:
        """Close the connection, first saying GOODBYE with `code` and `reason` unless `code` is None."""
        if self.closed:
            return
        self.closed = True
        self.fail_pending(LinkClosed(f"connection to {self.name} closed"))
        try:
            if code is not None:
                self.writer.write(self.conn.send(Goodbye(code, reason)))
                await asyncio.wait_for(self.writer.drain(), 5)
        except (ProtocolError, ConnectionError, OSError, TimeoutError, ssl.SSLError):
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (ConnectionError, OSError, TimeoutError, ssl.SSLError):
            pass


async def dial(
    host: str, port: int, ctx: ssl.SSLContext, role: str, server_hostname: str | None = None, timeout: float = 15.0
) -> Link:
    """Connect over TLS and do the handshake. Raises Unreachable or Refused with a clear message.

    Refused (exit 4) when either side turns the other's certificate down; Unreachable (exit 3) when the
    connection cannot be made or is lost. Under TLS 1.3 the client's handshake is complete before the
    server has checked the client's certificate, so a server that refuses it shows only at our first
    read — and asyncio's and uvloop's servers send no alert then, they just close. What tells a refusal
    from a loss is the session ticket: a TLS 1.3 server sends its tickets right after it accepted the
    client's certificate and Finished, so a connection that ends before any ticket arrived was refused
    by the handshake, while one that ends after was accepted and then lost (or closed at the protocol
    level, which comes with a GOODBYE and its code). An alert, if the server sends one, says so outright.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=server_hostname or host, limit=READ_CHUNK),
            timeout,
        )
    except ssl.SSLCertVerificationError as exc:
        raise Refused(
            f"the server at {host}:{port} is not this deployment's process server: its certificate failed "
            f"verification ({exc.verify_message}); check the address, and that this identity belongs to that "
            "deployment"
        ) from None
    except ssl.SSLError as exc:
        raise Refused(f"TLS handshake with {host}:{port} failed: {exc.reason or exc}") from None
    except (OSError, TimeoutError) as exc:
        raise Unreachable(f"cannot reach the process server at {host}:{port}: {exc or 'timed out'}") from None
    link = Link(reader, writer, Connection(Role.CLIENT), f"{host}:{port}")
    link.role = role
    try:
        await link.send(Hello(role=role))
        msg = await asyncio.wait_for(link.recv(), timeout)
    except LinkClosed as exc:
        refusal = _tls_refusal(writer, exc)
        await link.close()
        if exc.code in (GoodbyeCode.FORBIDDEN, GoodbyeCode.NOT_ENROLLED):
            raise Refused(str(exc)) from None
        if refusal is not None:
            raise Refused(
                f"the process server at {host}:{port} refused this machine's certificate ({refusal}): it was not "
                "issued by this deployment's CA, or it has expired; enroll this machine with this deployment "
                "(or use the right identity directory); the process server's log says which"
            ) from None
        raise Unreachable(f"the process server at {host}:{port} closed the connection: {exc}") from None
    except (RemoteProtocolError, TimeoutError) as exc:
        await link.close()
        raise Unreachable(f"the process server at {host}:{port} did not complete the handshake: {exc}") from None
    if not isinstance(msg, Welcome):
        await link.close(GoodbyeCode.UNEXPECTED_MESSAGE, "expected WELCOME")
        raise Unreachable(f"unexpected answer from {host}:{port}: {type(msg).__name__}")
    return link


# TLS alerts by which a server says it will not take our certificate (OpenSSL reason names).
_CERT_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
    "DECRYPT_ERROR",
)


def _tls_refusal(writer: asyncio.StreamWriter, closed: LinkClosed) -> str | None:
    """How the server refused our TLS handshake, or None if it did not (see `dial`).

    `closed` ended the first exchange after the handshake; `Link` raises it from the read or write error,
    which stays reachable as its `__context__`. A GOODBYE is the protocol speaking, never a TLS refusal.
    """
    if closed.code != NO_GOODBYE:
        return None
    cause = closed.__context__
    if isinstance(cause, ssl.SSLError):
        reason = (cause.reason or "").upper()
        alert = next((a for a in _CERT_ALERTS if reason.endswith("ALERT_" + a)), None)
        if alert is not None:
            return "TLS alert: " + alert.replace("_", " ").lower()
    sslobj = writer.get_extra_info("ssl_object")
    session = getattr(sslobj, "session", None) if sslobj is not None else None
    if session is not None and sslobj.version() == "TLSv1.3" and not session.has_ticket:
        return "it ended the connection during the TLS handshake"
    return None


async def sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    await wait_event(stop, delay)


async def stay_connected(
    stop: asyncio.Event,
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    role: str,
    session: Callable[[Link], Awaitable[None]],
    after: Callable[[], Awaitable[None]] | None = None,
    on_state: Callable[[str], None] | None = None,
) -> None:
    """Dial the process server and run `session(link)` until `stop`; reconnect with backoff (1 s to 10 s)
    whenever the connection fails or ends. `after` runs once each session is over (clean-up).
    `on_state(text)` hears, in words, each time the connection is made or a dial fails ("connected to
    H:P" / "retrying in 2 s: cannot reach the process server at H:P: …"): the daemon's status line."""
    delay = 1.0
    while not stop.is_set():
        try:
            link = await dial(host, port, ctx, role)
        except StandbyError as exc:
            log.warning("%s; retrying in %.0f s", exc, delay)
            if on_state is not None:
                on_state(f"retrying in {delay:.0f} s: {exc}")
            await sleep_or_stop(stop, delay)
            delay = min(delay * 2, 10.0)
            continue
        delay = 1.0
        log.info("connected to the process server %s:%d", host, port)
        if on_state is not None:
            on_state(f"connected to {host}:{port}")
        task = asyncio.create_task(session(link))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not task.done():
            task.cancel()
        code: GoodbyeCode | None = None
        reason = ""
        try:
            await task
        except RemoteProtocolError as exc:  # the process server broke the protocol: say why before closing
            code, reason = exc.goodbye_code, str(exc)
            log.warning("session ended: the process server sent something invalid (%s): %s", exc.code, exc)
        except (asyncio.CancelledError, LinkClosed, ProtocolError, ConnectionError, OSError, StandbyError,
                TimeoutError) as exc:
            if not stop.is_set():
                log.warning("session ended: %s", exc or type(exc).__name__)
        except Exception:  # a bug must not take the daemon down: log it and reconnect
            log.exception("session ended by an unexpected error (a bug: please report it)")
        await link.close(code, reason)
        if on_state is not None and not stop.is_set():
            on_state(f"reconnecting to {host}:{port}: the session ended")
        if after is not None:
            await after()
        if not stop.is_set():
            await sleep_or_stop(stop, 1.0)
