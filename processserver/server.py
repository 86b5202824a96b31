"""The process server: one TLS listener (port 9443) for agents, master targets, admins and enrolling
machines; the durable cache in between; the configuration service's requests.

Every connection: TLS handshake (client certificate optional at the TLS layer, so that an unenrolled
machine can reach enrollment and nothing else) -> HELLO, whose role must match the certificate ->
a session per role. A protocol error closes only that connection, with a logged reason and a GOODBYE
carrying the reason code; the server keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import ssl
import time
from typing import Any

from standby.plumbing import failpoints
from standby.plumbing import identity as ident
from standby.plumbing.errors import NotStarted
from standby.plumbing.link import Link, LinkClosed, RequestFailed
from standby.plumbing.serve import serve_request
from standby.plumbing.service import host_id
from standby.plumbing.supervise import describe, spawn, supervise
from standby.plumbing.tls import server_context
from standby.proto.connection import Connection, Role, choose_version
from standby.proto.errors import RemoteProtocolError
from standby.proto.messages import (
    Ack,
    Batch,
    Busy,
    Commit,
    Hello,
    Reject,
    Reply,
    Request,
    Welcome,
)
from standby.proto.requests import BadRequest, CommitMeta

from .cache import DiskCache, drop_quarantine, record_info
from .deployment import PSConfig
from .enroll import Enrollment
from .gate import Gate, Listener
from .health import ALERT, ERROR
from .recovery import FAILED_OVER
from .registry import DiskRow, Registry
from .streams import DiskStream

log = logging.getLogger("standby.ps")

# How many records the server sends a master target ahead of its acks, per disk: enough to keep the
# master target busy while it fsyncs, bounded so memory stays ~ WINDOW x batch size per disk.
MT_WINDOW = 8
# Records appended to the cache under one fsync at most.
GROUP_MAX = 8
HANDSHAKE_TIMEOUT = 15.0
# How long a resync hash query waits for the master target to apply what is cached before it.
DRAIN_TIMEOUT = 600.0
WATCH_INTERVAL = 5.0
# A disk with a backlog that applies nothing this long is `stalled` (status, alert).
STALL_AFTER = 30.0
# After a failed cache write the agent is asked to wait this long before sending again.
CACHE_RETRY = 5.0


class Failure(Exception):
    """A request failed with a reason code the client maps to an exit code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProcessServer:
    def __init__(self, cfg: PSConfig) -> None:
        self.cfg = cfg
        self.registry = Registry(cfg.registry_path)
        try:
            self.identity = ident.Identity.load(cfg.state_dir / "identity", command="standby-ps init")
        except ident.IdentityError as exc:
            raise NotStarted(str(exc)) from None
        self.ca_key = (cfg.state_dir / "ca" / "ca.key").read_bytes()
        self.ssl = server_context(self.identity)
        self.streams: dict[int, DiskStream] = {}
        self.mt_sessions: dict[str, MTSession] = {}
        self.agent_sessions: dict[str, AgentSession] = {}
        self.enrollment = Enrollment(self.registry, self.identity, self.ca_key)
        self.gate = Gate(self.ssl, handshake_timeout=HANDSHAKE_TIMEOUT)
        self.server: Listener | None = None
        self.port = cfg.port
        self._tasks: set[asyncio.Task[Any]] = set()
        self._storing: set[asyncio.Future[Any]] = set()

    # -- start-up -----------------------------------------------------------------------------------
    def recover(self) -> None:
        for row in self.registry.disks():
            try:
                self.open_stream(row)
            except Exception:  # one disk's cache must not keep the server from serving every other disk
                log.exception("disk %s/%s: cannot open its cache (a bug: please report it with this trace); the "
                              "disk is not served", row.machine, row.name)

    def open_stream(self, row: DiskRow) -> DiskStream:
        st = self.streams.get(row.id)
        if st is not None:
            return st
        cache = DiskCache(self.cfg.cache_dir / f"disk-{row.id}")
        rec = cache.recover(acked=row.received_seq)
        st = DiskStream(row.id, row.machine, cache, row.name)
        st.applied_seq = row.applied_seq
        st.received_seq = max(row.received_seq, rec.last_seq, row.applied_seq)
        st.cursor = max(row.cursor, rec.last_cursor)
        st.generation = max(row.generation, rec.generation)
        st.records = {s: v for s, v in rec.records.items() if s > st.applied_seq}
        st.initial_committed = (
            row.synced_at is not None
            or row.state == "up-to-date"
            or any(v.kind in ("initial-complete", "resync-complete") for v in st.records.values())
        )
        st.pause = bool(row.paused)
        st.failed_over = row.state in FAILED_OVER
        if st.failed_over:
            st.paused_at = max(st.applied_seq, 1)
        cache.release(st.applied_seq)
        if st.received_seq != row.received_seq or st.cursor != row.cursor:
            self.registry.update_disk(row.id, received_seq=st.received_seq, cursor=st.cursor)
        self.streams[row.id] = st
        if rec.damage is not None:
            # Records the agent was told are durable may be gone: the replica cannot catch up by itself
            # (promise 3). The master target skips what is lost (see MTSession.pull) and a checksum resync
            # repairs the replica; the damaged files are kept in quarantine/ for inspection.
            msg = f"{rec.damage}; moved to {cache.dir / 'quarantine'}; a checksum resync was requested"
            st.health.set("cache-damage", msg)
            self.after_loss(st, row)
            self.skip_lost(st, row)
            if row.mt is not None:
                self.request_resync(row, "checksum", f"the process server's cache was damaged: {rec.damage}")
        return st

    @property
    def cache_bytes(self) -> int:
        return sum(s.cache.bytes for s in self.streams.values())

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
        if ready is not None:
            ready.set()
        self.spawn(supervise("disk watchdog", self.watch))
        try:
            await stop.wait()
        finally:
            log.info("stopping: no new connections; closing sessions")
            self.server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # Appends already under way finish (with their bookkeeping) before the registry closes.
            await asyncio.gather(*self._storing, return_exceptions=True)
            for st in self.streams.values():
                st.cache.close()
            self.registry.close()

    # -- connections --------------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        addr = writer.get_extra_info("peername")
        link = Link(reader, writer, Connection(Role.SERVER), f"{addr[0]}:{addr[1]}" if addr else "peer")
        link.role = "ps"
        try:
            await self._session(link, addr[0] if addr else "?")
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error (%s): %s; closing this connection", link.name, exc.code, exc)
            await link.close(exc.code, str(exc))
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
            self._tasks.discard(task)

    async def _session(self, link: Link, ip: str) -> None:
        hello = await asyncio.wait_for(link.recv(), HANDSHAKE_TIMEOUT)
        if not isinstance(hello, Hello):
            raise RemoteProtocolError("unexpected-message", "expected HELLO")
        peer = link.peer
        if peer is None:
            if hello.role != "enroll":
                log.warning("%s: refused: no client certificate (role %s)", link.name, hello.role)
                await link.close("not-enrolled", "no client certificate: enroll this machine first")
                return
        else:
            if hello.role != peer.role or not self._current_cert(peer.name, peer.role, peer.serial):
                log.warning("%s: refused: certificate %s/%s is not current", link.name, peer.role, peer.name)
                await link.close("forbidden", f"certificate for {peer.role} {peer.name!r} is not (or no longer) valid")
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
            from .admin import AdminSession

            await AdminSession(self, link).run()
        else:
            await link.close("forbidden", f"role {hello.role} cannot connect here")

    def _current_cert(self, name: str, role: str, serial: int) -> bool:
        if role == "admin":
            return self.registry.get_meta("admin_serial") == str(serial)
        m = self.registry.machine(name)
        return m is not None and m["role"] == role and m["serial"] == str(serial)

    async def wake(self, link: Link | None) -> None:
        """Tell a connected agent or master target that its disks changed, so it asks now rather than at
        its next poll. Best effort: the peer's periodic poll is the fallback."""
        if link is None:
            return
        try:
            await link.send(Request(0, "wake", {}))
        except LinkClosed:
            pass

    async def watch(self) -> None:
        """Every few seconds, for each disk: the RPO against the policy's threshold (an alert), and the
        progress watchdog — a disk with a backlog that applies nothing for STALL_AFTER seconds is
        `stalled` (an error in status, with what is known of why), cleared when applying moves again."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self.check_disks(time.time(), time.monotonic())

    def check_disks(self, now: float, mono: float) -> None:
        for row in self.registry.disks():
            st = self.streams.get(row.id)
            if st is None:
                continue
            failed_over = row.state in FAILED_OVER
            rpo = now - row.last_point_at if row.last_point_at is not None else None
            if row.mt is not None and rpo is not None and not failed_over and rpo > self.cfg.rpo_threshold:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.last_point_at or 0))
                st.health.set("rpo", f"RPO {rpo:.0f} s exceeds the {self.cfg.rpo_threshold:.0f} s threshold "
                                     f"(newest point at {when})", ALERT, now)
            else:
                st.health.clear("rpo", now)
            waiting = st.received_seq - st.applied_seq
            if waiting <= 0 or failed_over or st.pause or row.mt is None:
                st.progress_at = mono
                st.health.clear("stalled", now)
                continue
            idle = mono - st.progress_at
            if idle < STALL_AFTER:
                continue
            why = self.stall_reason(row, st)
            st.health.set("stalled", f"stalled: {waiting} record(s) waiting in the cache, nothing applied for "
                                     f"{idle:.0f} s ({why})", ERROR, now)

    def stall_reason(self, row: DiskRow, st: DiskStream) -> str:
        mt = self.mt_sessions.get(row.mt or "")
        if mt is None:
            return f"master target {row.mt} is not connected"
        others = [p.text for k, p in st.health.active.items() if k != "stalled" and p.level == ERROR]
        if others:
            return others[0]
        if st.id not in mt.senders or mt.senders[st.id].done():
            return f"master target {row.mt} has not pulled this disk"
        return f"master target {row.mt} is connected but applies nothing; see its log"

    def skip_lost(self, st: DiskStream, row: DiskRow) -> None:
        """Records after what is applied were received but are lost (set aside as damaged): nothing will
        ever apply them, so they count as passed (the resync already asked for repairs the replica). The
        master target skips them the next time it pulls (MTSession.pull)."""
        if st.received_seq > st.applied_seq and not st.cache.after(st.applied_seq):
            log.warning("disk %s/%s: records %d..%d are lost: passed over (a resync repairs the replica)",
                        row.machine, row.name, st.applied_seq + 1, st.received_seq)
            st.lost = (st.applied_seq + 1, st.received_seq)
            st.applied_seq = st.received_seq
            self.registry.update_disk(row.id, applied_seq=st.applied_seq)

    def after_loss(self, st: DiskStream, row: DiskRow) -> None:
        """Cached records were set aside (damaged, or refused by the master target): an initial copy goes
        on from what is still held — the newest cached INITIAL batch, else what was applied — so the agent
        sends the lost part again (the master target skips the lost sequence numbers; see MTSession.pull)."""
        cursor = max([v.cursor for v in st.records.values() if v.cursor] + [row.applied_cursor])
        st.initial_committed = (
            row.synced_at is not None
            or row.state == "up-to-date"
            or any(v.kind in ("initial-complete", "resync-complete") for v in st.records.values())
        )
        if not st.initial_committed and cursor != st.cursor:
            log.warning("disk %s/%s: the initial copy goes on from %d bytes (was %d)", row.machine, row.name, cursor,
                        st.cursor)
            st.cursor = cursor
            self.registry.update_disk(row.id, cursor=cursor)

    def request_resync(self, row: DiskRow, mode: str, reason: str) -> None:
        """Ask the disk's agent for a resync (it learns at its next report, or now if connected)."""
        if row.resync_request:
            return
        log.warning("disk %s/%s: resync requested (%s): %s", row.machine, row.name, mode, reason)
        self.registry.update_disk(row.id, resync_request=json.dumps({"mode": mode, "reason": reason}))
        agent = self.agent_sessions.get(row.machine)
        if agent is not None:
            self.spawn(self.wake(agent.link))

    def track(self, coro: Any) -> asyncio.Future[Any]:
        """A cache append that must run to its end even if its session ends (shielded by the caller); the
        server waits for it before it closes the cache and the registry."""
        fut = asyncio.ensure_future(coro)
        self._storing.add(fut)
        fut.add_done_callback(self._storing.discard)
        return fut

    def spawn(self, coro: Any, name: str = "task") -> asyncio.Task[Any]:
        return spawn(coro, name, self._tasks)


class AgentSession:
    """An agent: registers its disks, receives each disk's batches in order and acks once durable."""

    def __init__(self, ps: ProcessServer, link: Link, machine: str) -> None:
        self.ps = ps
        self.link = link
        self.machine = machine
        self.queues: dict[int, asyncio.Queue[tuple[Batch | Commit, bytes | bytearray]]] = {}
        self.writers: list[asyncio.Task[None]] = []
        self.spawned: set[asyncio.Task[Any]] = set()

    async def run(self) -> None:
        self.ps.agent_sessions[self.machine] = self
        try:
            while True:
                msg = await self.link.recv()
                if isinstance(msg, Reply):
                    self.link.deliver(msg)  # the answer to a wake (ignored) or to a request (app_point)
                    continue
                if isinstance(msg, Request):
                    handler = {
                        "disk_open": self.disk_open,
                        "disk_key": self.disk_key,
                        "disk_report": self.disk_report,
                        "resync_begin": self.resync_begin,
                        "resync_hashes": self.resync_hashes,
                    }.get(msg.op)
                    if msg.op == "resync_hashes":
                        # Slow (the master target hashes its whole replica): answered in its own task so this
                        # session keeps receiving batches and requests meanwhile.
                        self.spawned.add(self.ps.spawn(serve_request(self.link, msg, "agent", "ps", handler),
                                                       "resync_hashes"))
                    else:
                        # In order, but the answer is sent from its own task: a read loop never waits on a
                        # write (plumbing.serve).
                        await serve_request(self.link, msg, "agent", "ps", handler, self.spawned)
                elif isinstance(msg, Batch | Commit):
                    await self.enqueue(msg, self.link.conn.last_frame)
                else:
                    raise RemoteProtocolError("unexpected-message", f"agent sent {type(msg).__name__}")
        finally:
            if self.ps.agent_sessions.get(self.machine) is self:
                del self.ps.agent_sessions[self.machine]
            for t in [*self.writers, *self.spawned]:
                t.cancel()
            await asyncio.gather(*self.writers, *self.spawned, return_exceptions=True)

    def own_row(self, disk_id: int) -> DiskRow:
        row = self.ps.registry.disk(disk_id)
        if row is None or row.machine != self.machine:
            # Promise 7: each identity may touch only its own disks.
            raise Failure("forbidden", f"disk {disk_id} does not belong to machine {self.machine!r}")
        return row

    async def disk_open(self, name: str, path: str, size: int, uid: str) -> dict[str, Any]:
        reg = self.ps.registry
        row = reg.disk_by_name(self.machine, name)
        if row is None:
            row = reg.add_disk(self.machine, name, uid, path, size)
            log.info("machine %s: new disk %s (%s, %d bytes)", self.machine, name, path, size)
        elif row.uid != uid:
            raise Failure("bad-input", f"disk {name}: the agent's identity for it changed (its state was lost)")
        elif size < row.size:
            # Records for the old end may still be queued; shrinking replicas is not built: stop, say so.
            msg = f"disk {name} shrank from {row.size} to {size} bytes: not supported (replication stopped)"
            self.ps.open_stream(row).health.set("shrunk", msg)
            raise Failure("size-mismatch", msg)
        elif row.size != size:
            # Promise 3: the replica no longer matches; its master target resizes it and a checksum resync
            # repairs the contents (the old part mostly compares equal).
            log.warning("machine %s: disk %s changed size from %d to %d bytes", self.machine, name, row.size, size)
            reg.update_disk(row.id, size=size)
            if row.mt is not None:
                self.ps.request_resync(row, "checksum", f"disk size changed from {row.size} to {size} bytes")
                mt = self.ps.mt_sessions.get(row.mt)
                await self.ps.wake(mt.link if mt else None)
            row = reg.disk(row.id) or row
        st = self.ps.open_stream(row)
        st.health.clear("shrunk")
        result: dict[str, Any] = {
            "disk": row.id,
            "state": row.state,
            "protected": row.mt is not None,
            "generation": st.generation,
            "next_sequence": st.received_seq + 1,
            "cursor": st.cursor,
            "initial_committed": st.initial_committed,
            "key_needed": row.mt is not None and row.wrapped_key is None,
            "seed": bool(row.seed),
            "resync": json.loads(row.resync_request) if row.resync_request else None,
        }
        if result["key_needed"]:
            mt = reg.machine(row.mt or "")
            result["mt_cert"] = mt["cert_pem"] if mt else None
        return result

    async def disk_key(self, disk: int, wrapped_key: str) -> dict[str, Any]:
        row = self.own_row(disk)
        if row.wrapped_key is not None:
            raise Failure("bad-input", f"disk {row.name} already has a data key")
        self.ps.registry.update_disk(disk, wrapped_key=base64.b64decode(wrapped_key))
        mt = self.ps.mt_sessions.get(row.mt or "")
        await self.ps.wake(mt.link if mt else None)
        return {}

    async def disk_report(self, disk: int, report: dict[str, Any]) -> dict[str, Any]:
        """What the agent knows (dirty bytes, tracker, resync progress), for status; the answer carries a
        resync the operator (or the system) asked for."""
        row = self.own_row(disk)
        st = self.ps.open_stream(row)
        st.agent_report, st.agent_report_at = report, time.time()
        lost, failed = report.get("tracking_lost"), report.get("error")  # validated: text or None
        st.health.update("tracking", lost and f"change tracking: {lost}", ALERT)
        st.health.update("agent", failed and f"agent: {failed}")
        return {"resync": json.loads(row.resync_request) if row.resync_request else None}

    async def resync_begin(self, disk: int, generation: int, mode: str, reason: str) -> dict[str, Any]:
        row = self.own_row(disk)
        st = self.ps.open_stream(row)
        if mode not in ("checksum", "full"):
            raise Failure("bad-input", f"unknown resync mode {mode!r}")
        if row.state in FAILED_OVER:
            raise Failure("refused", f"disk {row.name} is failed over: no resync")
        # A resync that broke off after some of its records were stored left its generation here: a
        # retry starts the next one.
        generation = max(generation, st.generation + 1)
        log.warning("disk %s/%s: %s resync, generation %d: %s", row.machine, row.name, mode, generation, reason)
        self.ps.registry.update_disk(
            disk,
            state="resyncing" if st.initial_committed else row.state,
            resync_request=None,
            resync_mode=mode,
            resync_reason=reason,
            resync_started_at=time.time(),
            resync_done_at=None,
        )
        return {"generation": generation}

    async def resync_hashes(self, disk: int, generation: int, query: dict[str, Any]) -> dict[str, Any]:
        """Relay a hash query to the disk's master target once it has applied everything cached before
        (it must hash the replica the agent's earlier batches made)."""
        row = self.own_row(disk)
        st = self.ps.open_stream(row)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while st.cache.after(st.applied_seq):  # records lost in between cannot be waited for
            if time.monotonic() > deadline:
                raise Failure("unreachable", "the master target did not apply the backlog in time")
            if st.pause:
                raise Failure("unreachable", f"applying for {row.machine} is paused: resume it to resync")
            await asyncio.sleep(0.05)
        mt = self.ps.mt_sessions.get(row.mt or "")
        if mt is None:
            raise Failure("unreachable", f"master target {row.mt} is not connected")
        try:
            return await mt.link.request(
                "resync_hashes", timeout=None, disk=disk, generation=generation, query=query, size=row.size
            )
        except RequestFailed as exc:
            raise Failure(exc.code, str(exc)) from None
        except LinkClosed as exc:
            raise Failure("unreachable", f"master target {row.mt} went away: {exc}") from None

    async def enqueue(self, msg: Batch | Commit, frame: bytes | bytearray) -> None:
        if isinstance(msg, Commit):
            try:
                CommitMeta.from_commit(msg.meta)  # never stored: a bad time would poison start-up (finding 5)
            except BadRequest as exc:
                st = self.ps.streams.get(msg.disk)
                if st is not None and st.machine == self.machine:
                    st.health.set("agent-record", f"the agent sent an invalid record (sequence {msg.sequence}): "
                                                  f"{exc}; it was refused, nothing stored")
                log.warning("%s: refused commit %d of disk %d: %s", self.link.name, msg.sequence, msg.disk, exc)
                raise RemoteProtocolError("bad-commit", str(exc)) from None
        q = self.queues.get(msg.disk)
        if q is None:
            row = self.ps.registry.disk(msg.disk)
            if row is None or row.machine != self.machine:
                log.warning("%s: refused: sent data for disk %d, not its own", self.link.name, msg.disk)
                await self.link.close("forbidden", f"disk {msg.disk} does not belong to {self.machine!r}")
                raise LinkClosed("forbidden")
            if row.mt is None or row.wrapped_key is None:
                raise RemoteProtocolError("not-protected", f"disk {row.name} is not protected yet")
            q = asyncio.Queue(maxsize=4)
            self.queues[msg.disk] = q
            st = self.ps.open_stream(row)
            self.writers.append(asyncio.get_running_loop().create_task(self.run_writer(st, q)))
        await q.put((msg, frame))

    async def run_writer(self, st: DiskStream, q: asyncio.Queue[tuple[Batch | Commit, bytes | bytearray]]) -> None:
        """The disk's writer; if it fails unexpectedly (a bug), the records it held would never be
        answered: log the traceback, fail the disk in status, and end the session so the agent sends
        again from what is stored (nothing is lost: it keeps what was not acknowledged)."""
        try:
            await self.writer(st, q)
        except (asyncio.CancelledError, LinkClosed):
            raise
        except Exception as exc:
            log.exception("%s: the cache writer of disk %d failed unexpectedly (a bug: please report it with "
                          "this trace)", self.link.name, st.id)
            st.health.set("ps-writer", f"the process server's cache writer failed: {describe(exc)} (the agent "
                          "reconnects and sends again)")
            await self.link.close("internal-error", "the process server failed to store a record; send again")

    async def writer(self, st: DiskStream, q: asyncio.Queue[tuple[Batch | Commit, bytes | bytearray]]) -> None:
        """Append one disk's records in order and ack each once fsynced (promise 1). Whatever is queued
        is appended as a group under one fsync (group commit).

        Refusals keep the order (agent.window relies on it): once a record is refused (BUSY: the cache is
        over its quota, its file system is full or failing, the machine is failed over), every record
        after it is refused too until the refused one arrives again — even if room appeared meanwhile. Only
        a record that skips ahead with nothing refused before it is a real sequence gap."""
        ps = self.ps
        refused_from: int | None = None  # the first sequence refused since the last one stored in order
        try:
            while True:
                records = [await q.get()]
                while not q.empty() and len(records) < GROUP_MAX:
                    records.append(q.get_nowait())
                # The frames as received (already verified): stored byte for byte, not encoded again.
                if st.failed_over:
                    # After a failover nothing more is replicated: the agent keeps its changes in its dirty map.
                    for m, _ in records:
                        await self.link.send(Busy(m.disk, m.sequence, 10.0, "the machine is failed over"))
                    continue
                # Promise 8: records that would take the cache over its quota are neither stored nor acked
                # (BUSY); the agent backs off and sends them again. The leading records that fit are stored.
                room = ps.cfg.cache_quota - ps.cache_bytes
                take: list[tuple[Batch | Commit, bytes | bytearray]] = []
                refuse: list[Batch | Commit] = []
                expect = st.received_seq + 1
                why = f"process server cache over quota ({ps.cfg.cache_quota >> 20} MiB)"
                for m, r in records:
                    if refuse:
                        refuse.append(m)  # behind a refused record: refused too, the agent resends in order
                    elif m.sequence < expect:
                        take.append((m, r))  # a retransmission of a stored record: acknowledged again
                    elif m.sequence == expect:
                        room -= len(r)
                        if room < 0:
                            refuse.append(m)
                        else:
                            take.append((m, r))
                            expect += 1
                            refused_from = None
                    elif refused_from is not None and refused_from <= expect:
                        refuse.append(m)  # sent before our BUSY for an earlier record reached the agent
                    else:
                        log.warning("%s: disk %d sequence gap (%d after %d)", self.link.name, st.id, m.sequence,
                                    expect - 1)
                        await self.link.close("sequence-gap", f"expected sequence {expect}, got {m.sequence}")
                        return
                failpoints.hit("ps.writer")
                if take:
                    # Shielded: once an append has started, the session ending (agent gone) must not cut it
                    # off between the fsync and the bookkeeping, or the resent record would be cached twice.
                    try:
                        stored = await asyncio.shield(self.ps.track(self.store(st, take)))
                    except OSError as exc:
                        # A full or failing cache file system: back-pressure, like the quota (promise 8),
                        # with the reason in status; this disk only, and replication goes on once it clears.
                        why = f"process server cannot write its cache: {exc.strerror or exc}"
                        refuse = [m for m, _ in take if m.sequence > st.received_seq] + refuse
                        take = [(m, r) for m, r in take if m.sequence <= st.received_seq]
                        self.cache_failed(st, why)
                        if exc.errno == errno.ENOSPC:
                            # Segments set aside after damage give way first; the refused records come again.
                            await asyncio.to_thread(drop_quarantine, ps.cfg.cache_dir)
                    else:
                        self.cache_ok(st)
                        if stored < len(take):  # another session of this machine stored in between
                            m = take[stored][0]
                            await self.link.close("sequence-gap", f"sequence {m.sequence} is out of order")
                            return
                    for m, _ in take:
                        await self.link.send(Ack(m.disk, m.sequence, m.generation))
                if refuse:
                    if refused_from is None:
                        refused_from = refuse[0].sequence
                        log.log(logging.INFO if st.refusing else logging.WARNING, "disk %d: %s: refusing data",
                                st.id, why)
                        st.refusing = True
                    st.refused_records += len(refuse)
                    for m in refuse:
                        await self.link.send(Busy(m.disk, m.sequence, CACHE_RETRY if "cannot write" in why else 1.0,
                                                  why))
                elif take and st.refusing:
                    st.refusing = False
                    log.info("disk %d: the cache accepts data again", st.id)
        except LinkClosed:
            pass

    def cache_failed(self, st: DiskStream, why: str) -> None:
        st.health.set("cache-write", f"{why}; refusing this disk's data until it can be written (the agent keeps "
                                     "its changes and sends them again)")

    def cache_ok(self, st: DiskStream) -> None:
        st.health.clear("cache-write")
        st.health.clear("ps-writer")
        st.health.clear("agent-record")

    async def store(self, st: DiskStream, records: list[tuple[Batch | Commit, bytes | bytearray]]) -> int:
        """Append the records that follow what is cached, as one step with their accounting. Returns how
        many leading records are durable now (stored, or already cached before); the rest broke the order."""
        reg = self.ps.registry
        async with st.append_lock:
            durable = 0
            fresh: list[tuple[Batch | Commit, bytes | bytearray]] = []
            expect = st.received_seq + 1
            for m, r in records:
                if m.sequence < expect and not fresh:
                    durable += 1  # a retransmission: already durable here
                elif m.sequence == expect:
                    fresh.append((m, r))
                    expect += 1
                else:
                    break
            if not fresh:
                return durable
            await asyncio.to_thread(st.cache.append_group, [(m.sequence, r) for m, r in fresh])
            for m, r in fresh:
                info = record_info(m)
                st.records[m.sequence] = info
                if info.cursor:
                    st.cursor = info.cursor
                if info.kind in ("initial-complete", "resync-complete"):
                    st.initial_committed = True
                st.generation = max(st.generation, m.generation)
                if isinstance(m, Batch):
                    reg.add_counters(st.id, bytes_logical=m.logical_bytes, bytes_data=m.data_bytes, bytes_wire=len(r))
                    st.receive_rate.add(m.logical_bytes)
            st.received_seq = fresh[-1][0].sequence
            reg.update_disk(st.id, received_seq=st.received_seq, cursor=st.cursor, generation=st.generation)
        st.new_data.set()
        return durable + len(fresh)


class MTSession:
    """A master target: learns its assigned disks, pulls their records in order, acks once applied."""

    def __init__(self, ps: ProcessServer, link: Link, name: str) -> None:
        self.ps = ps
        self.link = link
        self.name = name
        self.senders: dict[int, asyncio.Task[None]] = {}
        self.replies: set[asyncio.Task[Any]] = set()  # answers being sent (plumbing.serve)
        self.inflight: dict[int, int] = {}
        self.acked = asyncio.Event()

    async def run(self) -> None:
        old = self.ps.mt_sessions.get(self.name)
        if old is not None:
            await old.link.close("replaced", "a newer connection from this master target replaced this one")
        self.ps.mt_sessions[self.name] = self
        try:
            while True:
                msg = await self.link.recv()
                if isinstance(msg, Reply):
                    self.link.deliver(msg)
                elif isinstance(msg, Request):
                    handler = {"subscribe": self.subscribe, "pull": self.pull, "mt_report": self.mt_report}.get(msg.op)
                    await serve_request(self.link, msg, "mt", "ps", handler, self.replies)  # sent from a task
                elif isinstance(msg, Ack):
                    log.debug("disk %d: %s acked sequence %d", msg.disk, self.name, msg.sequence)
                    self.on_ack(msg)
                elif isinstance(msg, Reject):
                    self.on_reject(msg)
                else:
                    raise RemoteProtocolError("unexpected-message", f"master target sent {type(msg).__name__}")
        finally:
            if self.ps.mt_sessions.get(self.name) is self:
                del self.ps.mt_sessions[self.name]
            for t in [*self.senders.values(), *self.replies]:
                t.cancel()
            await asyncio.gather(*self.senders.values(), *self.replies, return_exceptions=True)
            self.link.fail_pending(LinkClosed("master target disconnected"))

    def assigned(self, disk_id: int) -> DiskRow:
        row = self.ps.registry.disk(disk_id)
        if row is None or row.mt != self.name:
            raise Failure("forbidden", f"disk {disk_id} is not assigned to master target {self.name!r}")
        return row

    async def subscribe(self) -> dict[str, Any]:
        disks = []
        for row in self.ps.registry.disks(mt=self.name):
            if row.wrapped_key is None:
                continue  # the agent has not delivered the wrapped data key yet
            disks.append(
                {
                    "disk": row.id,
                    "machine": row.machine,
                    "name": row.name,
                    "uid": row.uid,
                    "size": row.size,
                    "replica_path": row.replica_path,
                    "replica_format": row.replica_format,
                    "wrapped_key": base64.b64encode(row.wrapped_key).decode(),
                    "seed": bool(row.seed),
                }
            )
        # The master target refuses a retention volume that is this cache (same host, overlapping paths).
        return {"disks": disks, "cache_dir": str(self.ps.cfg.cache_dir.absolute()), "host": host_id()}

    async def mt_report(self, disks: dict[str, Any]) -> dict[str, Any]:
        """The master target's periodic word on each disk's history, for status."""
        for disk, rep in disks.items():
            row = self.ps.registry.disk(int(disk))
            if row is not None and row.mt == self.name and isinstance(rep, dict):
                st = self.ps.open_stream(row)
                st.mt_report = rep
                alert, failed = rep.get("alert"), rep.get("error")  # validated: text or None
                st.health.update("retention", alert, ALERT)
                st.health.update("mt-replica", failed and f"master target {self.name}: {failed}")
        return {}

    def stop_sender(self, disk: int) -> None:
        t = self.senders.pop(disk, None)
        if t is not None:
            t.cancel()

    async def pull(self, disk: int, applied_seq: int) -> dict[str, Any]:
        row = self.assigned(disk)
        if row.state in FAILED_OVER:
            raise Failure("refused", f"disk {row.machine}/{row.name} is failed over: nothing is applied")
        st = self.ps.open_stream(row)
        skip = 0
        entries = st.cache.after(applied_seq)
        nxt = entries[0].sequence if entries else st.received_seq + 1
        if applied_seq < st.received_seq and nxt != applied_seq + 1:
            # The records the replica needs next are gone: its state is older than the cache (restored or
            # lost), or cached records were damaged and set aside. Promise 3: never guess — skip ahead to
            # what the cache holds and have the disk resynced.
            skip_to = max(nxt - 1, st.applied_seq)
            log.error("disk %s/%s: the replica is at sequence %d but the cache holds from %d: records %d..%d "
                      "are lost", row.machine, row.name, applied_seq, nxt, applied_seq + 1, skip_to)
            known = st.lost is not None and st.lost[0] <= applied_seq + 1 and skip_to <= st.lost[1]
            if not known:  # lost records already passed over had their resync asked for (skip_lost)
                gap = f"sequence gap: the replica was at {applied_seq}, records up to {skip_to} are lost"
                self.ps.request_resync(row, "checksum", gap)
            row = self.ps.registry.disk(disk) or row  # skipped records must not count as points
            skip = applied_seq = skip_to
            for s in [s for s in st.records if s <= skip_to]:
                st.records.pop(s)
        if st.quarantined_from is not None:
            raise Failure("refused", st.health.active["quarantine"].text if st.health.has("quarantine")
                          else f"disk {row.name} is quarantined")
        self.set_applied(st, row, applied_seq, release=False)
        old = self.senders.pop(disk, None)
        if old is not None:
            old.cancel()
        st.health.clear("mt-replica")  # the master target has the replica open again
        self.inflight[disk] = applied_seq
        self.senders[disk] = asyncio.get_running_loop().create_task(self.run_sender(st, applied_seq))
        return {"received_seq": st.received_seq, "skip_to": skip}

    async def run_sender(self, st: DiskStream, after: int) -> None:
        """The disk's sender under supervision: after a failure (a bug, or the cache unreadable) the
        reason is in status and it starts again from what the master target acknowledged."""
        start = [after]

        def failed(exc: BaseException) -> None:
            st.health.set("ps-sender", f"sending to master target {self.name} failed: {describe(exc)} (retrying)")
            start[0] = st.applied_seq

        def recovered() -> None:
            st.health.clear("ps-sender")

        await supervise(f"sender of disk {st.id}", lambda: self.sender(st, start[0]), on_failure=failed,
                        on_recovery=recovered, passthrough=(LinkClosed, ConnectionError))

    async def sender(self, st: DiskStream, after: int) -> None:
        """Send records after `after` in order, at most MT_WINDOW ahead of the acks."""
        sent = after
        try:
            while True:
                entries = st.cache.after(sent)
                if not entries:
                    st.new_data.clear()
                    if not st.cache.after(sent):
                        await st.new_data.wait()
                    continue
                for e in entries:
                    while e.sequence - st.applied_seq > MT_WINDOW:
                        self.acked.clear()
                        await self.acked.wait()
                    while st.pause and st.paused_at and st.paused_at < e.sequence:
                        st.resumed.clear()
                        await st.resumed.wait()  # paused after a point: hold everything newer
                    failpoints.hit("ps.sender")
                    record = await asyncio.to_thread(st.cache.read, e)
                    await self.link.send_frame(record)  # a verified frame, forwarded byte for byte
                    st.health.clear("ps-sender")
                    sent = e.sequence
                    info = st.records.get(sent)
                    if st.pause and not st.paused_at and info is not None and info.kind == "point":
                        st.paused_at = sent
                        log.info("disk %d: applying paused after point %d", st.id, sent)
                    log.debug("disk %d: sent sequence %d to %s", st.id, sent, self.name)
        except (ConnectionError, LinkClosed) as exc:
            log.info("%s: sender for disk %d stopped: %s", self.link.name, st.id, exc)

    def set_applied(self, st: DiskStream, row: DiskRow, seq: int, release: bool = True) -> None:
        st.applied_seq = seq
        fields: dict[str, Any] = {"applied_seq": seq}
        # Promise 4: a point counts only while the replica is a faithful copy — not while a resync is asked
        # for (records skipped, disk grown) or running.
        faithful = row.resync_request is None and row.state == "up-to-date"
        for s in [s for s in st.records if s <= seq]:
            kind, cursor, nbytes, t = st.records.pop(s)
            if cursor:
                fields["applied_cursor"] = cursor
            if nbytes:
                self.ps.registry.add_counters(st.id, bytes_applied=nbytes)
                st.apply_rate.add(nbytes)
            if kind == "point" and faithful:
                st.point_times.append(t)
                fields["last_point_at"], fields["last_point_seq"] = t, s
            if kind == "initial-complete":
                fields["state"] = "up-to-date"
                faithful = row.resync_request is None
                fields["synced_at"] = time.time()
                log.info("disk %s/%s: initial replication complete; replica is up to date", row.machine, row.name)
            if kind == "resync-complete":
                fields["state"] = "up-to-date"
                st.health.clear("cache-damage")  # what was lost is repaired
                faithful = row.resync_request is None
                fields["resync_done_at"] = time.time()
                if row.synced_at is None:
                    fields["synced_at"] = time.time()
                log.info("disk %s/%s: resync complete; replica is up to date", row.machine, row.name)
        self.ps.registry.update_disk(st.id, **fields)
        if release:
            st.cache.release(seq)

    def on_ack(self, ack: Ack) -> None:
        st = self.ps.streams.get(ack.disk)
        row = self.ps.registry.disk(ack.disk)
        if st is None or row is None or row.mt != self.name:
            raise RemoteProtocolError("forbidden", f"ack for disk {ack.disk}, which is not assigned here")
        if ack.sequence <= st.applied_seq:
            return  # a repeated ack (a record sent twice around a reject or a restart): already counted
        if ack.sequence != st.applied_seq + 1:
            raise RemoteProtocolError("bad-ack", f"ack for sequence {ack.sequence}, expected {st.applied_seq + 1}")
        self.set_applied(st, row, ack.sequence)
        self.ps.skip_lost(st, row)
        st.progress_at = time.monotonic()
        st.health.clear("mt-reject")
        st.health.clear("stalled")
        self.acked.set()

    def on_reject(self, rej: Reject) -> None:
        row = self.ps.registry.disk(rej.disk)
        st = self.ps.streams.get(rej.disk)
        if st is None or row is None or row.mt != self.name:
            return
        t = self.senders.pop(rej.disk, None)
        if t is not None:
            t.cancel()
        if rej.sequence == 0:  # about the disk, not a record: the replica cannot be opened or used
            st.health.set("mt-replica", f"master target {self.name}: {rej.reason}")
        elif rej.code in ("authentication-failed", "bad-commit"):
            # Promise 6: nothing of it was written. Retrying the same cached record cannot help: quarantine
            # the disk until the operator has it resynced (which sets the cached records aside).
            st.quarantined_from = rej.sequence
            st.health.set("quarantine", f"quarantined: master target {self.name} rejected sequence {rej.sequence}: "
                          f"{rej.reason}. The process server's cached copy was altered or damaged; nothing of it "
                          f"was written. Run: standby resync {row.machine} (sets the cached records aside and "
                          "repairs the replica)")
        else:
            st.health.set("mt-reject", f"master target {self.name} rejected sequence {rej.sequence}: {rej.reason} "
                          "(retried; see the master target's log)")

    async def check_replica(self, path: str, fmt: str, size: int, existing: bool = False) -> None:
        await self.link.request("check_replica", path=path, format=fmt, size=size, existing=existing, timeout=30)
