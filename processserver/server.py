"""The process server: one TLS listener (port 9443) for agents, master targets, admins and enrolling
machines; the durable cache in between; the configuration service's requests.

Every connection: TLS handshake (client certificate optional at the TLS layer, so that an unenrolled
machine can reach enrollment and nothing else) -> HELLO, whose role must match the certificate ->
a session per role. A protocol error closes only that connection, with a logged reason and a GOODBYE
carrying the reason code; the server keeps serving everyone else.

Module map: hub.py (what the sessions share: registry, streams, sessions), agentsession.py with
diskwriter.py and intake.py (an agent's requests and records), mtsession.py (a master target's),
admin.py with recovery.py (the configuration service's requests), enroll.py (enrollment), gate.py with
admission.py and ratelog.py (what a stranger can cost), watchdog.py (RPO and stalls), status.py (what
status shows) and metrics.py (the same for Prometheus). This module is the
top: the listener, the HELLO, and the role -> session dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable

from standby.plumbing import identity as ident
from standby.plumbing.errors import NotStarted
from standby.plumbing.link import Link, LinkClosed
from standby.plumbing.metrics import start_metrics
from standby.plumbing.supervise import supervise
from standby.plumbing.tls import server_context
from standby.proto.connection import Connection, Role, choose_version
from standby.proto.enums import GoodbyeCode
from standby.proto.errors import RemoteProtocolError
from standby.proto.messages import Hello, Welcome

from .admin import AdminSession
from .agentsession import AgentSession
from .deployment import PSConfig
from .enroll import Enrollment
from .gate import HANDSHAKE_TIMEOUT, Gate, Listener
from .hub import Hub
from .metrics import PSCollector
from .mtsession import MTSession
from .watchdog import watch

log = logging.getLogger("standby.ps")


class ProcessServer(Hub):
    def __init__(self, cfg: PSConfig) -> None:
        super().__init__(cfg)
        try:
            self.identity = ident.Identity.load(cfg.state_dir / "identity", command="standby-ps init")
        except ident.IdentityError as exc:
            raise NotStarted(str(exc)) from None
        self.ca_key = (cfg.state_dir / "ca" / "ca.key").read_bytes()
        self.ssl = server_context(self.identity)
        self.enrollment = Enrollment(self.registry, self.identity, self.ca_key)
        self.gate = Gate(self.ssl, handshake_timeout=HANDSHAKE_TIMEOUT)
        self.server: Listener | None = None
        self.port = cfg.port

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        self.recover()
        self.server = await self.gate.start_server(self.handle, self.cfg.listen, self.cfg.port)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info(
            "process server %s listening on %s:%d (cache %s, quota %d MiB)",
            self.cfg.name,
            self.cfg.listen,
            self.port,
            self.cfg.cache_dir,
            self.cfg.cache_quota >> 20,
        )
        try:
            metrics = await start_metrics(self.cfg.metrics, [PSCollector(self)])
        except BaseException:
            self.server.close()
            raise
        if ready is not None:
            ready.set()
        self.spawn(supervise("disk watchdog", lambda: watch(self)))
        try:
            await stop.wait()
        finally:
            log.info("stopping: no new connections; closing sessions")
            self.server.close()
            if metrics is not None:
                await metrics.close()
            await self.close()

    # -- connections --------------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        addr = writer.get_extra_info("peername")
        link = Link(reader, writer, Connection(Role.SERVER), f"{addr[0]}:{addr[1]}" if addr else "peer")
        link.role = "ps"
        try:
            await serve_connection(link, self._session(link, addr[0] if addr else "?"))
        finally:
            self._tasks.discard(task)

    async def _session(self, link: Link, ip: str) -> None:
        hello = await asyncio.wait_for(link.recv(), HANDSHAKE_TIMEOUT)  # as long as the TLS handshake may take
        if not isinstance(hello, Hello):
            raise RemoteProtocolError(GoodbyeCode.UNEXPECTED_MESSAGE, "expected HELLO")
        peer = link.peer
        if peer is None:
            if hello.role != "enroll":
                log.warning("%s: refused: no client certificate (role %s)", link.name, hello.role)
                await link.close(GoodbyeCode.NOT_ENROLLED, "no client certificate: enroll this machine first")
                return
        else:
            if hello.role != peer.role or not self._current_cert(peer.name, peer.role, peer.serial):
                log.warning("%s: refused: certificate %s/%s is not current", link.name, peer.role, peer.name)
                gone = hello.role != "admin" and self.registry.machine(peer.name) is None
                await link.close(GoodbyeCode.FORBIDDEN,
                                 f"certificate for {peer.role} {peer.name!r} is not (or no longer) valid"
                                 + (": this machine is not enrolled (forgotten by the operator?): enroll it again"
                                    if gone else ""))
                return
            retired = self.trips.retired(peer.name) if hello.role == "agent" else None
            if retired is not None:
                log.warning("%s: refused: agent %s is set aside: %s", link.name, peer.name, retired)
                await link.close(GoodbyeCode.FORBIDDEN, f"agent {peer.name!r} is set aside: {retired}")
                return
            self.gate.admit(link.writer)  # an enrolled identity: no longer a stranger (gate.py)
        version = choose_version(hello)
        assert version is not None  # the connection refuses a HELLO without a common version
        name = peer.name if peer else "?"
        await link.send(Welcome(version, name, hello.role))
        link.name = f"{hello.role} {name} ({link.name})"
        # Admin connections are one request each (status polling): keep them out of the log at INFO.
        link.quiet = hello.role in ("admin", "enroll")
        log.log(logging.DEBUG if link.quiet else logging.INFO, "%s: connected", link.name)
        if hello.role == "enroll":
            await self.enrollment.session(link, ip)
        elif hello.role == "agent":
            await AgentSession(self, link, name).run()
        elif hello.role == "mt":
            await MTSession(self, link, name).run()
        elif hello.role == "admin":
            await AdminSession(self, link).run()
        else:
            await link.close(GoodbyeCode.FORBIDDEN, f"role {hello.role} cannot connect here")

    def _current_cert(self, name: str, role: str, serial: int) -> bool:
        if role == "admin":
            return self.registry.get_meta("admin_serial") == str(serial)
        m = self.registry.machine(name)
        return m is not None and m["role"] == role and m["serial"] == str(serial)


async def serve_connection(link: Link, session: Awaitable[None]) -> None:
    """Run one connection's session to its end. Whatever ends it closes this connection only, with a
    logged reason — and a GOODBYE with the reason code when the peer broke the protocol."""
    try:
        await session
    except RemoteProtocolError as exc:
        log.warning("%s: protocol error (%s): %s; closing this connection", link.name, exc.code, exc)
        await link.close(exc.goodbye_code, str(exc))
    except LinkClosed as exc:
        log.log(logging.DEBUG if link.quiet else logging.INFO, "%s", exc)
    except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
        log.info("%s: connection ended: %s", link.name, exc)
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("%s: unexpected error in session (bug); closing this connection", link.name)
    finally:
        await link.close()
