"""Admission control for the process server's listener: what an unauthenticated stranger can cost us.

Theory of operation
-------------------
Every connection to port 9443 is *pending* from the moment it is accepted until the server has seen a
HELLO whose certificate is current for an enrolled role and calls `Gate.admit`. Pending covers the TLS
handshake, the wait for HELLO and a whole enrollment session (enrollment never becomes admitted: an
enrolling machine is a stranger that knows, at best, the passphrase). Threats and counters:

- *Holding sockets open* (finding 6: 1,003 idle enrollment sessions exhausted the 1,024 open files; the
  cache could not open its next segment and the agent was dropped). Pending connections are capped
  (`pending_cap`: a quarter of the open-file soft limit, 16..512). At the cap a new connection is not
  refused: the oldest pending connection of the address holding the most pending connections is closed
  instead. Refusing the newcomer would let whoever fills the cap first lock every agent out; evicting
  the oldest of the busiest address means a flood mostly evicts itself, and an agent's handshake, which
  takes milliseconds, would have to be overtaken by `pending_cap` newer connections to be cut.
- *Slow handshakes*: the TLS handshake must finish within `handshake_timeout`. *Lingering*: a pending
  connection lives at most `pending_lifetime` seconds in all; the enrollment session's own idle timeout
  (enroll.py) usually ends it much sooner.
- *Handshake failures nobody sees*: asyncio's and uvloop's TLS servers both swallow a failed handshake
  (an `ssl.SSLError` is an `OSError`, which their `_fatal_error` logs only in loop debug mode and never
  passes to the exception handler), and neither sends the alert OpenSSL produced: the client just sees
  the connection end. So the gate accepts connections itself and hands each socket to
  `loop.connect_accepted_socket(ssl=...)`, whose failure is raised here with the peer's address, and
  logs it once per address per minute with a count (`RateLimitedLog`; certificate refusals apart from
  connections that merely ended, so that a health check's probe cannot hide a refusal). The client tells a refusal from
  a lost connection by the missing TLS 1.3 session ticket (see `plumbing.link.dial`).

`Admission` (admission.py) and `RateLimitedLog` (ratelog.py) are pure (the caller passes the time); `Gate`,
here, is the asyncio glue.
Wiring (server.py): `gate.start_server(handle, host, port)` instead of `asyncio.start_server(..., ssl=…)`
(its `close()` closes the gate too) and `gate.admit(writer)` once the HELLO's certificate is accepted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .admission import Admission, Ticket, current_pending_cap
from .ratelog import LOG_WINDOW, RateLimitedLog

log = logging.getLogger("standby.ps.gate")

HANDSHAKE_TIMEOUT = 15.0
"""Seconds a TLS handshake may take: a real client needs milliseconds, a slow WAN link a few seconds."""

PENDING_LIFETIME = 120.0
"""Seconds a connection may stay unauthenticated in all (handshake + HELLO + an enrollment session).
An enrollment is two connections of one request each; two minutes is generous."""


def describe_handshake_failure(exc: BaseException, timeout: float) -> tuple[int, str]:
    """(log level, what happened) for a failed server-side TLS handshake, in an operator's words.

    Certificate problems are WARNINGs: somebody holds an identity that is not this deployment's.
    Connections that end or stall before any certificate was judged (port scanners, health checks,
    crashed clients) are INFO; both are rate-limited.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return logging.WARNING, (
            f"the client's certificate was not issued by this deployment's CA ({exc.verify_message}): "
            "refused; the client must enroll with this deployment"
        )
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).upper()
        if "ALERT" in reason:
            alert = reason.split("ALERT_", 1)[-1].replace("_", " ").lower()
            return logging.WARNING, (
                f"the client refused this server's certificate (TLS alert: {alert}): it trusts another CA, "
                "e.g. an identity from another deployment, or it dialled the wrong server"
            )
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL"):
            return logging.INFO, f"not a TLS 1.3 client ({reason.replace('_', ' ').lower()})"
        # Garbage or an unsupported TLS stack: no certificate was judged (scanners do this all day).
        return logging.INFO, f"TLS error: {(exc.reason or str(exc)).replace('_', ' ').lower()}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc)
    ):
        return logging.INFO, f"no TLS handshake within {timeout:.0f} s"
    if isinstance(exc, ConnectionError | EOFError):
        # asyncio's and uvloop's clients send no alert when they refuse our certificate either: a client
        # of another deployment shows exactly like this (and so does a port scanner).
        return logging.INFO, (
            "the client closed the connection during the TLS handshake (as a client that does not trust this "
            "server's certificate does, e.g. one enrolled with another deployment)"
        )
    return logging.WARNING, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------- asyncio glue

ACCEPT_RETRY = 1.0
"""Seconds the listener pauses after accept() failed (out of file descriptors or memory, as asyncio does):
the cap should prevent it, but a descriptor leak elsewhere must not become a busy loop."""


@dataclass(eq=False)
class _Conn:
    ticket: Ticket
    sock: socket.socket
    task: asyncio.Task[None] | None = None
    handed: bool = False  # the socket was given to the loop (connect_accepted_socket): the loop closes it
    transport: asyncio.BaseTransport | None = None  # the TLS transport, once the handshake is done
    writer: asyncio.StreamWriter | None = None
    timer: asyncio.TimerHandle | None = None
    evicted: bool = False

    def drop(self) -> None:
        """Close the connection, whatever phase it is in."""
        self.evicted = True
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
            return
        if not self.handed:
            # A task cancelled before its first step never runs a line of its coroutine: close it here.
            self.sock.close()
        if self.task is not None:
            self.task.cancel()  # in the handshake: the loop closes the socket when its wait is cancelled


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listener:
    """What `Gate.start_server` returns: the listening sockets (`sockets[0].getsockname()` tells the port)
    and `close()`, which stops accepting and closes every connection still pending — as
    `asyncio.Server.close()` would, plus the gate's own clean-up."""

    def __init__(self, gate: Gate, sockets: list[socket.socket], tasks: list[asyncio.Task[None]]) -> None:
        self.gate = gate
        self.sockets = sockets
        self._tasks = tasks

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for s in self.sockets:
            s.close()
        self.gate.close()


class Gate:
    """The listener's admission control. See the module docstring for what and why.

    `counters` (for tests and metrics): accepted, admitted, evicted, expired, handshake_failed.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        pending_cap: int | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        pending_lifetime: float = PENDING_LIFETIME,
        limit: int = 1 << 20,
        log_window: float = LOG_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ssl = ssl_context
        self._fixed_cap = pending_cap
        self.handshake_timeout = handshake_timeout
        self.pending_lifetime = pending_lifetime
        self.limit = limit
        self.clock = clock
        self.admission = Admission()
        # Three rate-limited logs, so that one kind cannot hide another: certificate refusals (WARNING),
        # connections that ended or stalled before any certificate was judged — port probes, health checks,
        # slow or dead clients (INFO) — and the listener's own trouble (the cap, accept failures).
        self.refusals = RateLimitedLog(log_window)
        self.dropouts = RateLimitedLog(log_window)
        self.overflow = RateLimitedLog(log_window)
        self._logs = (self.refusals, self.dropouts, self.overflow)
        self.counters = dict.fromkeys(("accepted", "admitted", "evicted", "expired", "handshake_failed"), 0)
        self._conns: dict[int, _Conn] = {}  # ticket id -> pending connection
        self._by_writer: dict[asyncio.StreamWriter, _Conn] = {}
        # Every connection's task, admitted or not: the loop keeps only weak references to tasks.
        self._tasks: set[asyncio.Task[None]] = set()
        self._handle: Handler | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def pending_cap(self) -> int:
        """The fixed cap if one was given, else derived from the open-file soft limit *now* (it may change
        while the server runs: an operator's `prlimit`)."""
        return self._fixed_cap if self._fixed_cap is not None else current_pending_cap()

    @property
    def pending(self) -> int:
        return len(self.admission)

    async def start_server(self, handle: Handler, host: str, port: int, backlog: int = 128) -> Listener:
        """Listen on `host:port`; each connection gets its TLS handshake here, then `handle(reader, writer)`
        runs exactly as under `asyncio.start_server(handle, host, port, ssl=...)`.

        Why not `asyncio.start_server(ssl=...)`: a failed handshake never reaches us there (see the
        module docstring). Why not a plain server and `start_tls`: uvloop starts reading right after
        `connection_made`, so the ClientHello would be read by the plain protocol and lost. We accept
        ourselves and hand each socket to `loop.connect_accepted_socket(ssl=...)`, which does the
        handshake from the first byte and raises its failure to us, on asyncio's loop and on uvloop alike.
        """
        self._handle = handle
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, addr in dict.fromkeys(infos):  # getaddrinfo may repeat itself
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        tasks = [loop.create_task(self._accept_loop(sock)) for sock in sockets]
        return Listener(self, sockets, tasks)

    def admit(self, writer: asyncio.StreamWriter) -> None:
        """The peer proved an enrolled identity (HELLO matched a current certificate): it no longer counts
        as pending, cannot be evicted and has no lifetime limit. Idempotent."""
        conn = self._by_writer.pop(writer, None)
        if conn is None:
            return
        if self.admission.remove(conn.ticket):
            self.counters["admitted"] += 1
        self._forget(conn)

    def close(self) -> None:
        """Stop admitting: close every connection still pending (handshakes in progress included)."""
        self._closed = True
        for conn in list(self._conns.values()):
            conn.drop()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        for rl in self._logs:
            for level, line in rl.flush(float("inf")):
                log.log(level, "%s", line)

    # -- internals ----------------------------------------------------------------------------------------
    async def _accept_loop(self, listening: socket.socket) -> None:
        """Accept until cancelled. Nothing but cancellation ends it: a listener that dies leaves the
        process server deaf while it looks alive."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listening)
            except (ConnectionAbortedError, InterruptedError):
                continue  # the client gave up while queued: nothing to do
            except OSError as exc:
                line = self.overflow.record(
                    "listener", f"cannot accept a connection: {exc}", self.clock(), logging.ERROR
                )
                if line:
                    log.error("%s (retrying in %.0f s)", line, ACCEPT_RETRY)
                self._schedule_flush()
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            try:
                self._accepted(sock, str(addr[0]) if addr else "?")
            except Exception:
                log.exception("cannot admit a connection from %s (a bug): closing it", addr)
                sock.close()

    def _accepted(self, sock: socket.socket, address: str) -> None:
        if self._closed or self._handle is None:
            sock.close()
            return
        now = self.clock()
        cap = self.pending_cap
        ticket, victims = self.admission.add(address, now, cap)
        self.counters["accepted"] += 1
        for victim in victims:
            self._evict(victim, cap, now)
        loop = asyncio.get_running_loop()
        conn = _Conn(ticket, sock)
        conn.timer = loop.call_later(self.pending_lifetime, self._expire, conn)
        self._conns[ticket.id] = conn
        conn.task = loop.create_task(self._connection(conn))
        self._tasks.add(conn.task)
        conn.task.add_done_callback(self._tasks.discard)

    def _evict(self, victim: Ticket, cap: int, now: float) -> None:
        self.counters["evicted"] += 1
        line = self.overflow.record(
            "listener",
            f"{cap} connections not yet authenticated (TLS handshake, HELLO or enrollment), the cap: "
            f"closed the oldest from {victim.address}, the busiest source",
            now,
        )
        if line:
            log.warning("%s", line)
        self._schedule_flush()
        conn = self._conns.get(victim.id)
        if conn is not None:
            conn.drop()

    def _expire(self, conn: _Conn) -> None:
        if self.admission.remove(conn.ticket):
            self.counters["expired"] += 1
            line = self.dropouts.record(
                conn.ticket.address,
                f"not authenticated after {self.pending_lifetime:.0f} s: closed",
                self.clock(),
                logging.INFO,
            )
            if line:
                log.info("%s", line)
            self._schedule_flush()
            conn.drop()

    def _forget(self, conn: _Conn) -> None:
        self.admission.remove(conn.ticket)
        if conn.timer is not None:
            conn.timer.cancel()
        self._conns.pop(conn.ticket.id, None)
        if conn.writer is not None:
            self._by_writer.pop(conn.writer, None)

    def _handshake_failed(self, conn: _Conn, exc: BaseException) -> None:
        self.counters["handshake_failed"] += 1
        level, what = describe_handshake_failure(exc, self.handshake_timeout)
        rl = self.refusals if level >= logging.WARNING else self.dropouts
        line = rl.record(conn.ticket.address, f"TLS handshake failed: {what}", self.clock(), level)
        if line:
            log.log(level, "%s", line)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_timer is None and not self._closed:
            self._flush_timer = asyncio.get_running_loop().call_later(self.refusals.window, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        now = self.clock()
        for rl in self._logs:
            for level, line in rl.flush(now):
                log.log(level, "%s", line)
        if any(rl.pending() for rl in self._logs):
            self._schedule_flush()

    async def _connection(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limit)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            if conn.evicted:  # dropped before this task first ran: the socket is still ours
                conn.sock.close()
                return
            conn.handed = True  # from here the loop owns the socket: it closes it on failure and cancellation
            try:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, conn.sock, ssl=self.ssl, ssl_handshake_timeout=self.handshake_timeout
                )
            except asyncio.CancelledError:
                if conn.evicted:
                    return  # evicted or expired during the handshake: already counted and logged
                raise
            except Exception as exc:  # whatever ended the handshake is the client's doing: logged, closed
                self._handshake_failed(conn, exc)
                return
            conn.transport = transport
            if conn.evicted or self._closed:
                transport.abort()  # type: ignore[attr-defined]
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
            conn.writer = writer
            self._by_writer[writer] = conn
            assert self._handle is not None
            try:
                await self._handle(reader, writer)
            except Exception:  # the handler's own bug: say so, and close only this connection
                log.exception("%s: unexpected error in the connection handler (a bug)", conn.ticket.address)
                transport.abort()  # type: ignore[attr-defined]
        finally:
            self._forget(conn)
