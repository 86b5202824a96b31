"""The mobility agent: registers its disks with the process server, waits until they are protected,
hands each disk's data key to its master target (wrapped, so the process server cannot read it), and
runs initial replication (agent.initial) and then delta replication for ever (agent.delta), with resyncs
when tracking cannot be trusted (agent.resync).

Each disk is a ReplicatedDisk (agent.replicated): its state lives across connections and its workers get
it, never the Agent. The Agent owns what spans the disks: the connection and its read loop, the status
reports, the app-consistent points (agent.appoint) and the supervision of each disk's work.

Change tracking starts when the agent starts, before initial replication reads anything, and lives
across connections. An interrupted initial replication resumes from the last acknowledged cursor the
process server reports when the disk is opened again, not from zero.

Agent restarts (promise 3): on a clean stop the agent writes, per disk, its dirty map with the device's
kernel write counters and the boot id. At start that record is trusted only if the machine did not
reboot and the counters did not move — i.e. nothing was written while no tracker ran. Otherwise the
disk gets a checksum resync, with the reason.

App-consistent points (agent.appoint) are made on the policy's schedule and when the process server
asks: Request(id, "app_point", {"tag": T}) is answered, from its own task so the read loop goes on, with
Reply(id, True, {"disks": [...], "warnings": [...]}) once every disk's MARKER is sent, or with an error
reply ("busy": one is being made; "bad-input": bad tag; "failed": nothing could be done).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import Counter
from typing import Any

from cryptography import x509

from standby.plumbing import identity as ident
from standby.plumbing.about import AboutReporter
from standby.plumbing.aio import wait_event
from standby.plumbing.durable import make_private_dir
from standby.plumbing.errors import NotStarted, RequestFailed, StandbyError
from standby.plumbing.link import Link, LinkClosed, stay_connected
from standby.plumbing.metrics import start_metrics
from standby.plumbing.notify import Notifier
from standby.plumbing.serve import send_reply, serve_request
from standby.plumbing.supervise import describe, spawn, supervise
from standby.plumbing.tls import client_context
from standby.proto.enums import GoodbyeCode
from standby.proto.errors import ProtocolError, RemoteProtocolError
from standby.proto.keywrap import wrap_key
from standby.proto.messages import Ack, Busy, Reply, Request

from .appoint import MARKER, AppPoints
from .config import AgentConfig
from .delta import DiskResized, Shipper
from .disk import LocalDisk
from .freeze import thaw_leftover
from .initial import initial_replication
from .metrics import AgentCollector
from .reader import disk_size
from .replicated import ReplicatedDisk
from .resync import resync
from .shutdown import ShutdownStep
from .tracking import Tracking

log = logging.getLogger("standby.agent")
# What ends a session (the connection), not a disk: these propagate out of a disk's supervision.
# A request the process server leaves unanswered in its time (TimeoutError) ends the session the same way.
CONNECTION_ENDS = (LinkClosed, ProtocolError, ConnectionError, TimeoutError)
POLL_INTERVAL = 2.0
REPORT_INTERVAL = 2.0
RESYNC_RETRY = 10.0


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        try:
            self.identity = ident.Identity.load(cfg.identity_dir, command="standby-agent enroll")
        except ident.IdentityError as exc:
            raise NotStarted(str(exc)) from None
        self.ssl = client_context(self.identity)
        make_private_dir(cfg.disks_dir)
        self.wakeup = asyncio.Event()
        self.disks = [ReplicatedDisk(LocalDisk.load_or_create(cfg.disks_dir, d), cfg, self.wakeup) for d in cfg.disks]
        self.tasks: list[asyncio.Task[None]] = []
        self.app_points = AppPoints(cfg, self.disks)
        self.shutdown_step = ShutdownStep(cfg, self.app_points)
        self.requests: set[asyncio.Task[None]] = set()  # requests from the process server being answered
        self.protected: set[str] = set()  # disks the process server said were protected, in this run
        self.connection = f"connecting to {cfg.host}:{cfg.port}"  # in words, for the status line
        self.about = AboutReporter(cfg.system_uuid)

    async def run(self, stop: asyncio.Event, notifier: Notifier | None = None) -> None:
        def connection(text: str) -> None:
            self.connection = text
            if notifier is not None:
                notifier.ready(self.status_line)  # READY=1 once the first dial is decided (connected or why not)

        # An agent killed while it held a freeze must not leave the machine frozen until someone notices.
        await asyncio.to_thread(thaw_leftover, self.cfg.state_dir / MARKER)
        metrics = await start_metrics(self.cfg.metrics, [AgentCollector(self)])
        tasks = [asyncio.create_task(supervise("app-consistent schedule", self.app_points.schedule))]
        try:
            for rd in self.disks:
                tr = rd.start_tracking()
                if tr is not None:
                    tasks.append(asyncio.create_task(self.supervise_tracking(tr, stop)))
            await stay_connected(stop, self.cfg.host, self.cfg.port, self.ssl, "agent", self.session,
                                 on_state=connection)
        finally:
            tasks += self.tasks
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for rd in self.disks:
                rd.stop_tracking()  # clean stop: the dirty map is recorded
            if metrics is not None:
                await metrics.close()

    def status_line(self) -> str:
        """The agent in words (systemd's STATUS=): the connection, then what its disks do."""
        counts = Counter(self.activity(rd) for rd in self.disks)
        disks = ", ".join(f"{n} {what}" for what, n in counts.items()) or "none"
        return f"{self.connection}; disks: {disks}"

    def activity(self, rd: ReplicatedDisk) -> str:
        prog = rd.resync_progress
        if rd.error:
            return "failed"
        if rd.name not in self.protected:
            return "not protected (yet)"
        if prog is not None and prog.finished is None:
            return "resyncing"
        if rd.shipper is not None:
            return "replicating"
        return "in initial replication" if rd.copying else "starting"

    async def supervise_tracking(self, tr: Tracking, stop: asyncio.Event) -> None:
        def failed(exc: BaseException) -> None:
            # What the poll missed cannot be vouched for (promise 3).
            tr.lost = tr.lost or f"the tracker's poll task failed: {describe(exc)}"

        await supervise(f"disk {tr.disk.cfg.name} tracking", lambda: tr.run(stop), on_failure=failed)

    async def session(self, link: Link) -> None:
        reader = asyncio.create_task(self.read_loop(link))
        about = asyncio.create_task(self.about.tell(link))  # never ends the session, whatever it meets
        workers = [asyncio.create_task(self.supervise_disk(link, rd)) for rd in self.disks]
        workers.append(asyncio.create_task(supervise("status report", lambda: self.report(link),
                                                     passthrough=CONNECTION_ENDS)))
        try:
            done, _ = await asyncio.wait([reader, *workers], return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # re-raise the first failure
            await reader
        finally:
            requests, self.requests = list(self.requests), set()
            for t in (reader, about, *workers, *requests):
                t.cancel()
            await asyncio.gather(reader, about, *workers, *requests, return_exceptions=True)
            for rd in self.disks:
                for fut in rd.disk.acks.values():
                    fut.cancel()
                rd.disk.acks.clear()

    async def supervise_disk(self, link: Link, rd: ReplicatedDisk) -> None:
        """One disk's replication under supervision: a bug fails this disk (its reason goes to the process
        server with the next report; what it held is back in the dirty map), and it starts again after a
        backoff; the other disks and the connection go on."""

        def failed(exc: BaseException) -> None:
            rd.error = f"replication failed unexpectedly: {describe(exc)} (retrying)"
            self.wakeup.set()  # report it now

        def recovered() -> None:
            rd.error = None

        await supervise(f"disk {rd.name} replication", lambda: self.protect_disk(link, rd), on_failure=failed,
                        on_recovery=recovered, passthrough=CONNECTION_ENDS, healthy_after=10.0)

    async def read_loop(self, link: Link) -> None:
        by_id: dict[int, LocalDisk] = {}
        while True:
            msg = await link.recv()
            if isinstance(msg, Reply):
                link.deliver(msg)
            elif isinstance(msg, Request) and msg.op == "wake":
                self.wakeup.set()
                # A read loop never waits on a write (plumbing.serve): the answer goes from its own task.
                spawn(send_reply(link, msg.op, Reply(msg.id, True, {})), "reply to wake", self.requests)
            elif isinstance(msg, Request):
                # app_point and the failback's steps take up to the freeze and script timeouts: answered from
                # their own task; any other op gets its `unknown-request` answer the same way.
                ops = {"app_point": self.app_points.answer, "shutdown": self.shutdown_step.shutdown,
                       "start_workload": self.shutdown_step.start}
                spawn(serve_request(link, msg, "ps", "agent", ops.get(msg.op)), f"request {msg.op}", self.requests)
            elif isinstance(msg, Ack | Busy):
                if not by_id or msg.disk not in by_id:
                    by_id = {rd.disk.id: rd.disk for rd in self.disks}
                d = by_id.get(msg.disk)
                fut = d.acks.get(msg.sequence) if d else None
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                raise RemoteProtocolError(GoodbyeCode.UNEXPECTED_MESSAGE, f"process server sent {type(msg).__name__}")

    async def protect_disk(self, link: Link, rd: ReplicatedDisk) -> None:
        """Open the disk at the process server until it is protected, then replicate it."""
        d, name = rd.disk, rd.name
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
                if name in self.protected:
                    self.unprotected(rd)
                await self.wait_for_wake(POLL_INTERVAL)
                continue
            self.protected.add(name)
            if info["key_needed"]:
                await self.send_key(link, d, info.get("mt_cert"))
                continue
            tr = rd.tracking
            if tr is not None and tr.size != d.size:
                # Resized: track at the new size from now on; the process server asked for a resync.
                log.warning("disk %s: size changed from %d to %d bytes", name, tr.size, d.size)
                rd.retire_tracking()
                tr = None
            if tr is None:
                tr = rd.start_tracking()
                if tr is None:
                    await asyncio.sleep(POLL_INTERVAL * 15)
                    continue
                self.tasks.append(asyncio.create_task(self.supervise_tracking(tr, asyncio.Event())))
            if info.get("resync"):
                rd.want_resync(info["resync"]["mode"], info["resync"]["reason"])
            why, rd.unproven = rd.unproven, None
            if not info["initial_complete"]:
                if info.get("seed"):
                    rd.resync_wanted = ("checksum", "offline seeding: the replica existed before protection")
                else:
                    if why and info["cursor"]:
                        # What was copied before this run may have changed unseen.
                        rd.resync_wanted = ("checksum", f"restart during initial replication: {why}")
                    rd.copying = True
                    try:
                        await initial_replication(rd, link, info)
                    finally:
                        rd.copying = False
                    continue  # open again: the process server says where the stream stands now
            elif why:
                rd.want_resync("checksum", why)
            try:
                await self.replicate(link, rd, info)
            except DiskResized:
                continue

    def unprotected(self, rd: ReplicatedDisk) -> None:
        """The operator unprotected this disk (standby unprotect): stop tracking it; nothing is sent until
        it is protected again, which starts over with an initial replication."""
        self.protected.discard(rd.name)
        rd.retire_tracking()
        rd.resync_wanted, rd.unproven, rd.announced = None, None, False
        log.warning("disk %s: no longer protected: change tracking stopped, nothing is sent", rd.name)

    async def replicate(self, link: Link, rd: ReplicatedDisk, info: dict[str, Any]) -> None:
        """Delta replication over this connection, with resyncs when wanted."""
        gen, seq = int(info["generation"]), int(info["next_sequence"])
        sh = Shipper(rd, link, rd.builder())
        if not rd.announced:
            log.info("disk %s: delta replication (cut every %.2f s)", rd.name, self.cfg.cut_interval)
            rd.announced = True
        try:
            while True:
                want = rd.resync_wanted
                if want:
                    try:
                        gen, seq = await resync(sh, gen, seq, *want)
                    except RequestFailed as exc:
                        # Master target away, applying paused...: keep tracking, try again shortly.
                        log.warning("disk %s: resync cannot go on now: %s; retrying in %.0f s", rd.name, exc,
                                    RESYNC_RETRY)
                        await asyncio.sleep(RESYNC_RETRY)
                        restart = await sh.settle(1)
                        seq = restart if restart is not None else max(seq, sh.window.next_seq)
                        continue
                    if rd.resync_wanted == want:
                        rd.resync_wanted = None
                gen, seq = await sh.run(gen, seq)
        finally:
            sh.window.put_back()  # promise 3: nothing unacknowledged is forgotten, however this ends

    async def report(self, link: Link) -> None:
        """Tell the process server, every few seconds (or when woken), what only the agent knows (each
        disk's ReplicatedDisk.report). Its answer may ask for a resync."""
        while True:
            for rd in self.disks:
                if not rd.disk.id:
                    continue
                rep = rd.report()
                if rd.tracking is None and rd.name not in self.protected:
                    rep["tracking_lost"] = None  # not tracked on purpose: it is not protected (any more)
                try:
                    res = await link.request("disk_report", disk=rd.disk.id, report=rep)
                except RequestFailed as exc:  # refused (a value out of range?): say so, keep replicating
                    log.warning("disk %s: status report refused: %s", rd.name, exc)
                    continue
                want = res.get("resync")
                if want:
                    rd.want_resync(want["mode"], want["reason"])
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
