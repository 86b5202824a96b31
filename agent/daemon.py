"""The mobility agent: registers its disks with the process server, waits until they are protected,
hands each disk's data key to its master target (wrapped, so the process server cannot read it), and
runs initial replication — reading the disk in large sequential batches, a few in flight, each kept
until the process server acknowledges it as durable (promise 1) — and then delta replication for ever
(agent.delta), with resyncs when tracking cannot be trusted (agent.resync).

Change tracking starts when the agent starts, before initial replication reads anything, and lives
across connections. An interrupted initial replication resumes from the last acknowledged cursor the
process server reports when the disk is opened again, not from zero.

Agent restarts (promise 3): on a clean stop the agent writes, per disk, its dirty map with the device's
kernel write counters and the boot id. At start that record is trusted only if the machine did not
reboot and the counters did not move — i.e. nothing was written while no tracker ran. Otherwise the
disk gets a checksum resync, with the reason.

App-consistent points (agent.appoint) are made on the policy's schedule and when the process server
asks: Request(id, "app_point", {"tag": T}) is answered, from its own task so the read loop goes on, with
Reply(id, True, {"disks": [...], "warnings": [...]}) once every disk's COMMIT is sent, or with an error
reply ("busy": one is being made; "bad-input": bad tag; "failed": nothing could be done).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from standby.plumbing import identity as ident
from standby.plumbing.aio import wait_event
from standby.plumbing.durable import load_json, make_private_dir, save_json
from standby.plumbing.errors import NotStarted, StandbyError
from standby.plumbing.link import Link, LinkClosed, RequestFailed, stay_connected
from standby.plumbing.serve import send_reply, serve_request
from standby.plumbing.supervise import describe, spawn, supervise
from standby.plumbing.tls import client_context
from standby.proto.envelope import Sealer
from standby.proto.errors import ProtocolError, RemoteProtocolError
from standby.proto.keywrap import new_data_key, wrap_key
from standby.proto.messages import Ack, Busy, Commit, Reply, Request, meta_bytes

from . import cleanstop
from .appoint import MARKER, MAX_TAG, AppPointFailed, AppPoints
from .config import AgentConfig, DiskConfig
from .delta import DeltaStats, DiskResized, Shipper, Tracking
from .freeze import thaw_leftover
from .reader import BatchBuilder, disk_size
from .resync import Progress, resync
from .tracker import TrackingLost, make_tracker
from .window import WINDOW, SendWindow

log = logging.getLogger("standby.agent")
# What ends a session (the connection), not a disk: these propagate out of a disk's supervision.
# A request the process server leaves unanswered in its time (TimeoutError) ends the session the same way.
CONNECTION_ENDS = (LinkClosed, ProtocolError, ConnectionError, TimeoutError)
# Initial-replication batches read and sealed ahead of the one being sent (threads: reads and zstd/AES
# release the GIL).
READ_AHEAD = 4
POLL_INTERVAL = 2.0
REPORT_INTERVAL = 2.0
RESYNC_RETRY = 10.0
PROGRESS_LOG_INTERVAL = 10.0


def trace_instance(uid: uuid.UUID) -> str:
    return f"standby-{uid.hex[:16]}"


@dataclass
class LocalDisk:
    """What the agent keeps about a disk: its uid and data key (never sent in clear)."""

    cfg: DiskConfig
    uid: uuid.UUID
    key: bytes
    size: int = 0
    id: int = 0
    acks: dict[int, asyncio.Future[Ack | Busy]] = field(default_factory=dict)

    @property
    def instance(self) -> str:
        """The name of the disk's private tracefs instance."""
        return trace_instance(self.uid)

    @classmethod
    def load_or_create(cls, directory: Any, cfg: DiskConfig) -> LocalDisk:
        path = directory / f"{cfg.name}.json"
        if path.exists():
            raw = load_json(path)
            return cls(cfg, uuid.UUID(raw["uid"]), base64.b64decode(raw["key"]))
        disk = cls(cfg, uuid.uuid4(), new_data_key())
        # Threat: another local user reading the data key. The file is created 0600 in a 0700 directory.
        save_json(path, {"uid": str(disk.uid), "key": base64.b64encode(disk.key).decode()}, 0o600)
        return disk


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        try:
            self.identity = ident.Identity.load(cfg.identity_dir, command="standby-agent enroll")
        except ident.IdentityError as exc:
            raise NotStarted(str(exc)) from None
        self.ssl = client_context(self.identity)
        make_private_dir(cfg.disks_dir)
        self.disks = [LocalDisk.load_or_create(cfg.disks_dir, d) for d in cfg.disks]
        self.wakeup = asyncio.Event()
        self.trackings: dict[str, Tracking] = {}
        self.unproven: dict[str, str] = {}  # disk -> why this agent run cannot vouch for earlier writes
        self.resync_wanted: dict[str, tuple[str, str]] = {}  # disk -> (mode, reason)
        self.resync_progress: dict[str, Progress] = {}
        self.delta_stats: dict[str, DeltaStats] = {d.cfg.name: DeltaStats() for d in self.disks}
        self.done: set[str] = set()  # disks whose delta replication was announced in the log
        self.tasks: list[asyncio.Task[None]] = []
        self.shippers: dict[str, Shipper] = {}  # disks in delta replication now (Shipper.run registers)
        self.app_points = AppPoints(self)
        self.requests: set[asyncio.Task[None]] = set()  # requests from the process server being answered
        self.disk_errors: dict[str, str] = {}  # disk -> why its replication failed (until it works again)

    async def run(self, stop: asyncio.Event) -> None:
        # An agent killed while it held a freeze must not leave the machine frozen until someone notices.
        await asyncio.to_thread(thaw_leftover, self.cfg.state_dir / MARKER)
        tasks = [asyncio.create_task(supervise("app-consistent schedule", self.app_points.schedule))]
        try:
            for d in self.disks:
                tr = self.start_tracking(d)
                if tr is not None:
                    tasks.append(asyncio.create_task(self.supervise_tracking(tr, stop)))
            await stay_connected(stop, self.cfg.host, self.cfg.port, self.ssl, "agent", self.session)
        finally:
            tasks += self.tasks
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.stop_tracking()

    async def supervise_tracking(self, tr: Tracking, stop: asyncio.Event) -> None:
        def failed(exc: BaseException) -> None:
            # What the poll missed cannot be vouched for (promise 3).
            tr.lost = tr.lost or f"the tracker's poll task failed: {describe(exc)}"

        await supervise(f"disk {tr.disk.cfg.name} tracking", lambda: tr.run(stop), on_failure=failed)

    def start_tracking(self, d: LocalDisk) -> Tracking | None:
        """Start the disk's tracker (before anything reads the disk) and decide whether the writes made
        before this agent run are accounted for."""
        name = d.cfg.name
        try:
            size = disk_size(d.cfg.path)
            tracker = make_tracker(
                self.cfg.tracker, str(d.cfg.path), size, d.instance, self.cfg.trace_buffer >> 10
            )
            tracker.start()
        except (OSError, TrackingLost) as exc:
            log.error("disk %s: cannot track changes of %s: %s", name, d.cfg.path, exc)
            return None
        tr = Tracking(d, tracker, size)
        self.trackings[name] = tr
        extents, why = cleanstop.load(self.cfg.disks_dir, name, str(d.cfg.path), size)
        if why:
            self.unproven[name] = why
        else:
            tr.map.mark_extents(extents)
            log.info("disk %s: clean-stop record accepted (%d bytes dirty carried over)", name, tr.map.dirty_bytes)
        log.info("disk %s: tracking changes with the %s tracker", name, type(tracker).__name__)
        return tr

    def stop_tracking(self) -> None:
        """Clean stop: record each disk's dirty map with the device's write counters, then stop tracking."""
        for name, tr in self.trackings.items():
            d = tr.disk
            try:
                counters = cleanstop.write_counters(str(d.cfg.path))
                tr.drain()
                if tr.lost is None and counters is not None:
                    extents = tr.map.extents()
                    cleanstop.save(self.cfg.disks_dir, name, str(d.cfg.path), tr.size, counters, extents)
            except OSError as exc:
                log.error("disk %s: cannot write the clean-stop record: %s", name, exc)
            finally:
                tr.tracker.close()
        self.trackings.clear()

    async def session(self, link: Link) -> None:
        reader = asyncio.create_task(self.read_loop(link))
        workers = [asyncio.create_task(self.supervise_disk(link, d)) for d in self.disks]
        workers.append(asyncio.create_task(supervise("status report", lambda: self.report(link),
                                                     passthrough=CONNECTION_ENDS)))
        try:
            done, _ = await asyncio.wait([reader, *workers], return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # re-raise the first failure
            await reader
        finally:
            requests, self.requests = list(self.requests), set()
            for t in (reader, *workers, *requests):
                t.cancel()
            await asyncio.gather(reader, *workers, *requests, return_exceptions=True)
            for d in self.disks:
                for fut in d.acks.values():
                    fut.cancel()
                d.acks.clear()

    async def supervise_disk(self, link: Link, d: LocalDisk) -> None:
        """One disk's replication under supervision: a bug fails this disk (its reason goes to the process
        server with the next report; what it held is back in the dirty map), and it starts again after a
        backoff; the other disks and the connection go on."""
        name = d.cfg.name

        def failed(exc: BaseException) -> None:
            self.disk_errors[name] = f"replication failed unexpectedly: {describe(exc)} (retrying)"
            self.wakeup.set()  # report it now

        def recovered() -> None:
            self.disk_errors.pop(name, None)

        await supervise(f"disk {name} replication", lambda: self.protect_disk(link, d), on_failure=failed,
                        on_recovery=recovered, passthrough=CONNECTION_ENDS, healthy_after=10.0)

    async def read_loop(self, link: Link) -> None:
        by_id = {}
        while True:
            msg = await link.recv()
            if isinstance(msg, Reply):
                link.deliver(msg)
            elif isinstance(msg, Request) and msg.op == "wake":
                self.wakeup.set()
                # A read loop never waits on a write (plumbing.serve): the answer goes from its own task.
                spawn(send_reply(link, msg.op, Reply(msg.id, True, {})), "reply to wake", self.requests)
            elif isinstance(msg, Request):
                # app_point takes up to the freeze and script timeouts: answered from its own task; any other
                # op gets its `unknown-request` answer the same way.
                spawn(serve_request(link, msg, "ps", "agent", {"app_point": self.answer_app_point}.get(msg.op)),
                      f"request {msg.op}", self.requests)
            elif isinstance(msg, Ack | Busy):
                if not by_id or msg.disk not in by_id:
                    by_id = {d.id: d for d in self.disks}
                d = by_id.get(msg.disk)
                fut = d.acks.get(msg.sequence) if d else None
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                raise RemoteProtocolError("unexpected-message", f"process server sent {type(msg).__name__}")

    async def answer_app_point(self, tag: str = "") -> dict[str, Any]:
        """Make an app-consistent point for the process server (the operator's `standby app-point`). The
        tag was validated at the boundary (proto.requests); AppPointBusy/AppPointFailed carry their code."""
        if len(tag) > MAX_TAG or not tag.isprintable():
            raise AppPointFailed(f"a tag is printable text of at most {MAX_TAG} characters", "bad-input")
        return await self.app_points.make(tag)

    async def protect_disk(self, link: Link, d: LocalDisk) -> None:
        """Open the disk at the process server until it is protected, then replicate it."""
        name = d.cfg.name
        while True:
            try:
                d.size = disk_size(d.cfg.path)
            except OSError as exc:
                log.error("disk %s: cannot open %s: %s; retrying", name, d.cfg.path, exc.strerror)
                await asyncio.sleep(POLL_INTERVAL * 5)
                continue
            if d.size % 512:
                log.error("disk %s: size %d of %s is not a multiple of 512 bytes", name, d.size, d.cfg.path)
                await asyncio.sleep(POLL_INTERVAL * 30)
                continue
            self.wakeup.clear()  # before asking, so a wake that arrives meanwhile is not lost
            try:
                info = await link.request("disk_open", name=name, path=str(d.cfg.path), size=d.size, uid=str(d.uid))
            except RequestFailed as exc:
                log.error("disk %s: %s", name, exc)
                await asyncio.sleep(POLL_INTERVAL * 5)
                continue
            d.id = int(info["disk"])
            if not info["protected"]:
                await self.wait_for_wake(POLL_INTERVAL)
                continue
            if info["key_needed"]:
                await self.send_key(link, d, info.get("mt_cert"))
                continue
            tr = self.trackings.get(name)
            if tr is not None and tr.size != d.size:
                # Resized: track at the new size from now on; the process server asked for a resync.
                log.warning("disk %s: size changed from %d to %d bytes", name, tr.size, d.size)
                tr.retired = True
                tr.tracker.close()
                del self.trackings[name]
                tr = None
            if tr is None:
                tr = self.start_tracking(d)
                if tr is None:
                    await asyncio.sleep(POLL_INTERVAL * 15)
                    continue
                self.tasks.append(asyncio.create_task(self.supervise_tracking(tr, asyncio.Event())))
            if info.get("resync"):
                self.resync_wanted.setdefault(name, (info["resync"]["mode"], info["resync"]["reason"]))
            why = self.unproven.pop(name, None)
            if not info["initial_committed"]:
                if info.get("seed"):
                    self.resync_wanted[name] = ("checksum", "offline seeding: the replica existed before protection")
                else:
                    if why and info["cursor"]:
                        # What was copied before this run may have changed unseen.
                        self.resync_wanted[name] = ("checksum", f"restart during initial replication: {why}")
                    await self.initial_replication(link, d, info)
                    continue  # open again: the process server says where the stream stands now
            elif why:
                self.resync_wanted.setdefault(name, ("checksum", why))
            try:
                await self.replicate(link, d, tr, info)
            except DiskResized:
                continue

    async def replicate(self, link: Link, d: LocalDisk, tr: Tracking, info: dict[str, Any]) -> None:
        """Delta replication over this connection, with resyncs when wanted."""
        gen, seq = int(info["generation"]), int(info["next_sequence"])
        builder = BatchBuilder(str(d.cfg.path), d.id, d.key, d.uid.bytes, self.cfg.compression_level, tr.tracker)
        sh = Shipper(self, link, d, tr, builder)
        if d.cfg.name not in self.done:
            log.info("disk %s: delta replication (cut every %.2f s)", d.cfg.name, self.cfg.cut_interval)
            self.done.add(d.cfg.name)
        try:
            while True:
                want = self.resync_wanted.get(d.cfg.name)
                if want:
                    try:
                        gen, seq = await resync(sh, gen, seq, *want)
                    except RequestFailed as exc:
                        # Master target away, applying paused...: keep tracking, try again shortly.
                        log.warning("disk %s: resync cannot go on now: %s; retrying in %.0f s", d.cfg.name, exc,
                                    RESYNC_RETRY)
                        await asyncio.sleep(RESYNC_RETRY)
                        restart = await sh.settle(1)
                        seq = restart if restart is not None else max(seq, sh.window.next_seq)
                        continue
                    if self.resync_wanted.get(d.cfg.name) == want:
                        del self.resync_wanted[d.cfg.name]
                gen, seq = await sh.run(gen, seq)
        finally:
            sh.window.put_back()  # promise 3: nothing unacknowledged is forgotten, however this ends

    def make_commit(self, d: LocalDisk, seq: int, meta: dict[str, Any]) -> Commit:
        sealer = Sealer(d.key, d.uid.bytes)
        return Commit(d.id, seq, meta, sealer.seal_batch(int(meta["generation"]), seq, meta_bytes(meta)))

    async def report(self, link: Link) -> None:
        """Tell the process server, every few seconds (or when woken), what only the agent knows: bytes
        dirty, tracker health and cost, points made, resync progress. Its answer may ask for a resync."""
        while True:
            for d in self.disks:
                if not d.id:
                    continue
                name = d.cfg.name
                tr = self.trackings.get(name)
                st = self.delta_stats[name]
                prog = self.resync_progress.get(name)
                rep: dict[str, Any] = {
                    "tracker": type(tr.tracker).__name__ if tr else None,
                    "tracking_lost": tr.lost if tr else "not tracking",
                    "dirty_bytes": tr.map.dirty_bytes if tr else None,
                    "tracker_cpu_seconds": tr.poll_cpu + float(tr.tracker.stats.get("cpu_seconds", 0)) if tr else 0,
                    "epochs": st.epochs,
                    "points": st.points,
                    "inconsistent_epochs": st.inconsistent,
                    "last_inconsistent_reason": st.last_inconsistent_reason,
                    "bytes_shipped": st.bytes_shipped,
                    "app_points": st.app_points,
                    "last_app_point": st.last_app_point,
                    "resync": prog.report() if prog else None,
                    "resync_pending": self.resync_wanted.get(name),
                    "error": self.disk_errors.get(name),
                }
                try:
                    res = await link.request("disk_report", disk=d.id, report=rep)
                except RequestFailed as exc:  # refused (a value out of range?): say so, keep replicating
                    log.warning("disk %s: status report refused: %s", name, exc)
                    continue
                want = res.get("resync")
                if want and name not in self.resync_wanted:
                    self.resync_wanted[name] = (want["mode"], want["reason"])
            await self.wait_for_wake(REPORT_INTERVAL)

    async def wait_for_wake(self, timeout: float) -> None:
        """Sleep until the process server says something changed (protect), or `timeout` passes."""
        await wait_event(self.wakeup, timeout)

    async def send_key(self, link: Link, d: LocalDisk, mt_cert_pem: str | None) -> None:
        if not mt_cert_pem:
            raise StandbyError(f"disk {d.cfg.name}: the process server sent no master-target certificate")
        cert = x509.load_pem_x509_certificate(mt_cert_pem.encode())
        ca = x509.load_pem_x509_certificate(self.identity.ca_pem)
        # Wrap only to a master target our own CA certified: the key must reach nobody else.
        cert.verify_directly_issued_by(ca)
        _, role = ident.subject_name_role(cert)
        if role != "mt":
            raise StandbyError(f"disk {d.cfg.name}: the key recipient is not a master target")
        wrapped = wrap_key(d.key, ident.cert_public_key_pem(mt_cert_pem.encode()), b"disk:" + d.uid.bytes)
        await link.request("disk_key", disk=d.id, wrapped_key=base64.b64encode(wrapped).decode())
        log.info("disk %s: data key handed to its master target (wrapped)", d.cfg.name)

    async def initial_replication(self, link: Link, d: LocalDisk, info: dict[str, Any]) -> None:
        """Copy the disk in large sequential batches through the disk's send window, a few read and sealed
        ahead in threads. A BUSY makes the copy go on from the refused batch after the delay asked for; a
        lost connection ends the session and the next one resumes from the acknowledged cursor the process
        server reports (blocks written meanwhile are in the dirty map: tracking started first)."""
        gen, seq, cursor = int(info["generation"]), int(info["next_sequence"]), int(info["cursor"])
        size, step = d.size, self.cfg.batch_size
        tr = self.trackings.get(d.cfg.name)
        tracker = tr.tracker if tr else None
        builder = BatchBuilder(str(d.cfg.path), d.id, d.key, d.uid.bytes, self.cfg.compression_level, tracker)
        if cursor:
            log.info("disk %s: resuming initial replication at %d of %d bytes", d.cfg.name, cursor, size)
        else:
            log.info("disk %s: starting initial replication of %d bytes", d.cfg.name, size)
        t0 = last_log = time.monotonic()
        win = SendWindow(d, link)
        busy_since, acked_then = 0.0, 0
        ahead: deque[tuple[int, int, asyncio.Future[Any]]] = deque()  # (sequence, offset, batch being built)
        offset = cursor

        def drop_ahead() -> None:
            for _, _, fut in ahead:
                fut.cancel()
            ahead.clear()

        try:
            while True:
                # Answers first: room in the window, or a BUSY to go back for.
                refused = await win.settle(WINDOW if (ahead or offset < size) else 1)
                if refused is not None:
                    if not busy_since:  # once per episode: under back-pressure this repeats every second
                        busy_since, acked_then = time.monotonic(), win.acked_records
                        log.info("disk %s: process server busy (%s); going on from %d MiB when it takes data again",
                                 d.cfg.name, refused.reason, refused.tag >> 20)
                    drop_ahead()
                    seq, offset = refused.sequence, refused.tag
                    await asyncio.sleep(max(win.busy_until - time.monotonic(), 0.0))
                    continue
                while offset < size and len(ahead) < READ_AHEAD:
                    n = min(step, size - offset)
                    build = asyncio.ensure_future(asyncio.to_thread(builder.initial_batch, gen, seq, offset, n))
                    ahead.append((seq, offset, build))
                    seq += 1
                    offset += n
                if not ahead:
                    if win.pending:
                        continue  # wait for the last answers (settle with room 1 above)
                    break
                bseq, boff, build = ahead[0]
                batch = await build
                ahead.popleft()
                await win.send(bseq, batch, tag=boff)
                if busy_since and win.acked_records > acked_then:
                    log.info("disk %s: the process server takes data again after %.0f s", d.cfg.name,
                             time.monotonic() - busy_since)
                    busy_since = 0.0
                now = time.monotonic()
                if now - last_log >= PROGRESS_LOG_INTERVAL:
                    rate = (boff - cursor) / (now - t0)
                    eta = f"{(size - boff) / rate:.0f} s" if rate else "unknown"
                    log.info(
                        "disk %s: initial replication %.0f%% (%d of %d MiB), %.0f MB/s, ETA %s",
                        d.cfg.name,
                        100 * boff / size,
                        boff >> 20,
                        size >> 20,
                        rate / 1e6,
                        eta,
                    )
                    last_log = now
            await self.commit(win, d, gen, seq, "initial-complete")
        finally:
            drop_ahead()
            win.put_back()
        el = time.monotonic() - t0
        log.info(
            "disk %s: initial replication sent %d MiB in %.1f s (%.0f MB/s)",
            d.cfg.name,
            (size - cursor) >> 20,
            el,
            (size - cursor) / max(el, 1e-6) / 1e6,
        )

    async def commit(self, win: SendWindow, d: LocalDisk, gen: int, seq: int, kind: str) -> None:
        """Send a commit and wait until it is acknowledged (resent after each BUSY's delay)."""
        while True:
            await win.send(seq, self.make_commit(d, seq, {"generation": gen, "kind": kind, "time": time.time()}))
            if await win.drain() is None:
                break
            await asyncio.sleep(max(win.busy_until - time.monotonic(), 0.0))
        log.info("disk %s: %s committed (sequence %d)", d.cfg.name, kind, seq)
