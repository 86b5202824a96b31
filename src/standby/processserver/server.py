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
import json
import logging
import ssl
import time
from typing import Any

from standby.plumbing import identity as ident
from standby.plumbing.errors import NotStarted, StandbyError
from standby.plumbing.link import Link, LinkClosed, RequestFailed
from standby.plumbing.service import host_id
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

from .cache import DiskCache, record_info
from .deployment import PSConfig
from .enroll import Enrollment
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
RPO_CHECK_INTERVAL = 5.0


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
        self.server: asyncio.base_events.Server | None = None
        self.port = cfg.port
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- start-up -----------------------------------------------------------------------------------
    def recover(self) -> None:
        for row in self.registry.disks():
            self.open_stream(row)

    def open_stream(self, row: DiskRow) -> DiskStream:
        st = self.streams.get(row.id)
        if st is not None:
            return st
        cache = DiskCache(self.cfg.cache_dir / f"disk-{row.id}")
        rec = cache.recover()
        st = DiskStream(row.id, row.machine, cache)
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
        return st

    @property
    def cache_bytes(self) -> int:
        return sum(s.cache.bytes for s in self.streams.values())

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        self.recover()
        self.server = await asyncio.start_server(
            self.handle,
            self.cfg.listen,
            self.cfg.port,
            ssl=self.ssl,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            limit=1 << 20,
        )
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
        self.spawn(self.watch_rpo())
        try:
            await stop.wait()
        finally:
            log.info("stopping: no new connections; closing sessions")
            self.server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
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

    async def watch_rpo(self) -> None:
        """Log an alert once when a disk's RPO passes the policy threshold, and once when it recovers."""
        while True:
            await asyncio.sleep(RPO_CHECK_INTERVAL)
            now = time.time()
            for row in self.registry.disks():
                st = self.streams.get(row.id)
                if st is None or row.mt is None or row.last_point_at is None or row.state in FAILED_OVER:
                    continue
                rpo = now - row.last_point_at
                late = rpo > self.cfg.rpo_threshold
                if late and not st.rpo_alert:
                    log.warning(
                        "ALERT disk %s/%s: RPO %.0f s exceeds the threshold of %.0f s (newest point at %s)",
                        row.machine,
                        row.name,
                        rpo,
                        self.cfg.rpo_threshold,
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.last_point_at)),
                    )
                elif not late and st.rpo_alert:
                    log.info("disk %s/%s: RPO back to %.0f s", row.machine, row.name, rpo)
                st.rpo_alert = late

    def request_resync(self, row: DiskRow, mode: str, reason: str) -> None:
        """Ask the disk's agent for a resync (it learns at its next report, or now if connected)."""
        if row.resync_request:
            return
        log.warning("disk %s/%s: resync requested (%s): %s", row.machine, row.name, mode, reason)
        self.registry.update_disk(row.id, resync_request=json.dumps({"mode": mode, "reason": reason}))
        agent = self.agent_sessions.get(row.machine)
        if agent is not None:
            self.spawn(self.wake(agent.link))

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t


async def reply_to(link: Link, req: Request, fn: Any) -> None:
    """Run a request handler and send its REPLY: ok with the result, or the failure's code and message."""
    try:
        result = await fn(**req.args)
        await link.send(Reply(req.id, True, result or {}))
    except Failure as exc:
        await link.send(Reply(req.id, False, {}, exc.code, str(exc)))
    except StandbyError as exc:
        await link.send(Reply(req.id, False, {}, "failed", str(exc)))
    except TypeError as exc:
        await link.send(Reply(req.id, False, {}, "bad-input", f"bad arguments for {req.op}: {exc}"))


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
                    if handler is None:
                        await self.link.send(Reply(msg.id, False, {}, "bad-input", f"unknown request {msg.op!r}"))
                    elif msg.op == "resync_hashes":
                        # Slow (the master target hashes its whole replica): answered in its own task so this
                        # session keeps receiving batches and requests meanwhile.
                        self.spawned.add(self.ps.spawn(reply_to(self.link, msg, handler)))
                    else:
                        await reply_to(self.link, msg, handler)
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
            if row.error != msg:
                log.error("machine %s: %s", self.machine, msg)
                reg.update_disk(row.id, error=msg)
            raise Failure("size-mismatch", msg)
        elif row.size != size:
            # Promise 3: the replica no longer matches; its master target resizes it and a checksum resync
            # repairs the contents (the old part mostly compares equal).
            log.warning("machine %s: disk %s changed size from %d to %d bytes", self.machine, name, row.size, size)
            reg.update_disk(row.id, size=size, error=None)
            if row.mt is not None:
                self.ps.request_resync(row, "checksum", f"disk size changed from {row.size} to {size} bytes")
                mt = self.ps.mt_sessions.get(row.mt)
                await self.ps.wake(mt.link if mt else None)
            row = reg.disk(row.id) or row
        st = self.ps.open_stream(row)
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
        while st.applied_seq < st.received_seq:
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
            self.writers.append(asyncio.get_running_loop().create_task(self.writer(self.ps.streams[msg.disk], q)))
        await q.put((msg, frame))

    async def writer(self, st: DiskStream, q: asyncio.Queue[tuple[Batch | Commit, bytes | bytearray]]) -> None:
        """Append one disk's records in order and ack each once fsynced (promise 1). Whatever is queued
        is appended as a group under one fsync (group commit)."""
        ps = self.ps
        refusing = False
        try:
            while True:
                records = [await q.get()]
                while not q.empty() and len(records) < GROUP_MAX:
                    records.append(q.get_nowait())
                # The frames as received (already verified): stored byte for byte, not encoded again.
                group = [m for m, _ in records]
                if st.failed_over:
                    # After a failover nothing more is replicated: the agent keeps its changes in its dirty map.
                    for m in group:
                        await self.link.send(Busy(m.disk, m.sequence, 10.0, "the machine is failed over"))
                    continue
                # Promise 8: records that would take the cache over its quota are neither stored nor acked
                # (BUSY); the agent backs off and sends them again. The leading records that fit are stored.
                room = ps.cfg.cache_quota - ps.cache_bytes
                fit = 0
                for m, r in records:
                    if m.sequence > st.received_seq:
                        room -= len(r)
                        if room < 0:
                            break
                    fit += 1
                refused_now = fit < len(records)
                if refused_now:
                    if not refusing:
                        log.warning(
                            "cache over quota (%d MiB): refusing data for disk %d", ps.cfg.cache_quota >> 20, st.id
                        )
                    refusing = True
                    for m in group[fit:]:
                        await self.link.send(Busy(m.disk, m.sequence, 1.0, "process server cache is over its quota"))
                    records, group = records[:fit], group[:fit]
                    if not records:
                        continue
                # Shielded: once an append has started, the session ending (agent gone) must not cut it off
                # between the fsync and the bookkeeping, or the resent record would be cached twice.
                stored = await asyncio.shield(asyncio.ensure_future(self.store(st, records)))
                for m in group[:stored]:
                    await self.link.send(Ack(m.disk, m.sequence, m.generation))
                if stored < len(group):
                    seq = group[stored].sequence
                    if refusing:  # pipelined behind a record we refused: refuse it too, the agent resends in order
                        for m in group[stored:]:
                            await self.link.send(
                                Busy(m.disk, m.sequence, 1.0, "process server cache is over its quota")
                            )
                        continue
                    log.warning("%s: disk %d sequence gap (%d after %d)", self.link.name, st.id, seq, st.received_seq)
                    await self.link.close("sequence-gap", f"expected sequence {st.received_seq + 1}, got {seq}")
                    return
                refusing = refused_now
        except LinkClosed:
            pass
        except OSError as exc:
            log.error("disk %d: cannot write the cache: %s", st.id, exc)
            st.last_error = f"process server cache write failed: {exc}"
            await self.link.close("cache-error", st.last_error)

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
                    if handler is None:
                        await self.link.send(Reply(msg.id, False, {}, "bad-input", f"unknown request {msg.op!r}"))
                    else:
                        await reply_to(self.link, msg, handler)
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
            for t in self.senders.values():
                t.cancel()
            await asyncio.gather(*self.senders.values(), return_exceptions=True)
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
                self.ps.open_stream(row).mt_report = rep
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
        if applied_seq < st.applied_seq:
            entries = st.cache.after(applied_seq)
            if not entries or entries[0].sequence != applied_seq + 1:
                # The replica is older than anything cached (its state was restored or lost): the records in
                # between are gone. Promise 3: never guess — skip ahead and have the disk resynced.
                log.error(
                    "disk %s/%s: replica at sequence %d, cache holds from %d: sequence gap",
                    row.machine,
                    row.name,
                    applied_seq,
                    st.applied_seq + 1,
                )
                gap = f"sequence gap: the replica was at {applied_seq}, applied {st.applied_seq}"
                self.ps.request_resync(row, "checksum", gap)
                row = self.ps.registry.disk(disk) or row  # skipped records must not count as points
                skip = applied_seq = st.applied_seq
        self.set_applied(st, row, applied_seq, release=False)
        old = self.senders.pop(disk, None)
        if old is not None:
            old.cancel()
        st.last_error = None
        self.ps.registry.update_disk(disk, error=None)
        self.inflight[disk] = applied_seq
        self.senders[disk] = asyncio.get_running_loop().create_task(self.sender(st, applied_seq))
        return {"received_seq": st.received_seq, "skip_to": skip}

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
                    record = await asyncio.to_thread(st.cache.read, e)
                    await self.link.send_frame(record)  # a verified frame, forwarded byte for byte
                    sent = e.sequence
                    info = st.records.get(sent)
                    if st.pause and not st.paused_at and info is not None and info.kind == "point":
                        st.paused_at = sent
                        log.info("disk %d: applying paused after point %d", st.id, sent)
                    log.debug("disk %d: sent sequence %d to %s", st.id, sent, self.name)
        except (ConnectionError, LinkClosed, OSError) as exc:
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
        self.acked.set()

    def on_reject(self, rej: Reject) -> None:
        st = self.ps.streams.get(rej.disk)
        if st is None:
            return
        msg = f"master target {self.name} rejected sequence {rej.sequence}: {rej.reason}"
        log.error("disk %d: %s", rej.disk, msg)
        st.last_error = msg
        self.ps.registry.update_disk(rej.disk, error=msg)
        t = self.senders.pop(rej.disk, None)
        if t is not None:
            t.cancel()

    async def check_replica(self, path: str, fmt: str, size: int, existing: bool = False) -> None:
        await self.link.request("check_replica", path=path, format=fmt, size=size, existing=existing, timeout=30)
