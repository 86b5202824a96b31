"""The master target daemon: dials the process server, learns which disks are assigned to it, opens
each (replica, retention journal, a `worker.DiskWorker` that applies its records in order), pulls their
records and routes them to the workers, answers the process server's requests, and keeps the retention
journals within their policy (`upkeep`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from standby.plumbing import failpoints
from standby.plumbing.about import AboutReporter
from standby.plumbing.aio import wait_event
from standby.plumbing.errors import NotStarted, RequestFailed
from standby.plumbing.identity import Identity, IdentityError
from standby.plumbing.link import Link, LinkClosed, stay_connected
from standby.plumbing.metrics import start_metrics
from standby.plumbing.notify import Notifier
from standby.plumbing.serve import send_reply, serve_request
from standby.plumbing.service import host_id
from standby.plumbing.supervise import describe, spawn, supervise
from standby.plumbing.tls import client_context
from standby.proto.enums import ErrorCode, GoodbyeCode, RejectCode
from standby.proto.errors import ProtocolError, RemoteProtocolError
from standby.proto.keywrap import KeyWrapError, unwrap_key
from standby.proto.messages import Batch, Marker, Reject, Reply, Request
from standby.proto.mt_requests import DiskHistory, PointList
from standby.proto.point import Point
from standby.proto.requests import BadRequest, parse_subscribe
from standby.proto.states import DiskState

from .apply import Applier
from .config import MTConfig
from .disk import ApplyStats, NotOpen
from .diskstate import ReplicaState
from .guestdisk import find_device
from .journal import DiskJournal
from .journal_codec import JournalError
from .metrics import MTCollector
from .operations import HANDLERS
from .placement import check_replica
from .recovery import FailoverState, move, replica_writer
from .release import release
from .replicas import ReplicaError, create_replica, open_replica
from .resync import answer_hashes
from .retention import Policy
from .upkeep import make_room, point_list, prune, volume_pressure
from .volume import (
    VolumeError,
    check_retention_dir,
    free_bytes,
    on_root_file_system,
    overlaps,
    shared_volume_warning,
)
from .worker import RETRY_DELAY, DiskWorker

log = logging.getLogger("standby.mt")
SESSION_ENDS = (LinkClosed, ProtocolError, ConnectionError, TimeoutError)
POLL_INTERVAL = 1.0
UPKEEP_INTERVAL = 5.0


def segment_size_for(configured: int, volume_bytes: int) -> int:
    """Journal segment size on a volume of `volume_bytes`: pruning frees whole segments and never the
    newest, so a segment must be a small part of the volume (a 64 MiB volume with 64 MiB segments could
    never prune anything: finding 7 of issue 9). At most 1/16 of the volume, at least 1 MiB."""
    return max(min(configured, volume_bytes // 16), min(configured, 1 << 20))


class MasterTarget:
    """The daemon: one session with the process server at a time, the open disks' workers, and what the
    workers (`worker.WorkerHost`) and the operations (`disk.Disks`) need of it."""

    def __init__(self, cfg: MTConfig) -> None:
        self.cfg = cfg
        try:
            self.identity = Identity.load(cfg.identity_dir, command="standby-mt enroll")
        except IdentityError as exc:
            raise NotStarted(str(exc)) from None
        self.ssl = client_context(self.identity)
        cfg.disks_dir.mkdir(parents=True, exist_ok=True)
        try:
            has_history = cfg.retention_dir.is_dir() and any(cfg.retention_dir.glob("*/seg-*.jrn"))
            check_retention_dir(cfg.retention_dir, [Path(s.path) for s in ReplicaState.all(cfg.disks_dir)],
                                allow_full=has_history)
        except VolumeError as exc:
            raise NotStarted(str(exc)) from None
        if on_root_file_system(cfg.retention_dir):
            log.log(logging.INFO if cfg.shared_volume else logging.WARNING, "%s%s", shared_volume_warning(
                cfg.retention_dir), " (accepted at enroll: --shared-volume)" if cfg.shared_volume else "")
        volume = free_bytes(cfg.retention_dir)[1]
        self.segment_size = segment_size_for(cfg.segment_size, volume)
        # Old contents of one apply group at most: a sixteenth of the volume, at most 32 MiB (a group may
        # still be one batch larger than that: a batch is never split).
        self.group_bytes = max(min(32 << 20, volume // 16), 1 << 20)
        if self.segment_size < cfg.segment_size:
            log.info("retention journal segments of %d KiB (the retention volume is small: pruning frees whole "
                     "segments)", self.segment_size >> 10)
        self.workers: dict[int, DiskWorker] = {}
        self.failed: dict[int, str] = {}
        self.failover_problems: dict[int, str] = {}  # disk -> why the move resumed at start-up broke off
        self.retry_at: dict[int, float] = {}  # disk -> when opening it may be tried again (loop clock)
        # Disks released (unprotected) in this run: an assignment list the process server made just before
        # must not open them again (disk ids are never reused).
        self.released: set[int] = set()
        self.wakeup = asyncio.Event()
        self.background: set[asyncio.Task[Any]] = set()
        self.connection = f"connecting to {cfg.host}:{cfg.port}"  # in words, for the status line
        self.apply_stats: dict[int, ApplyStats] = {}  # disk -> what applying it did in this run (metrics)
        self.history: dict[str, dict[str, Any]] = {}  # the last upkeep report per disk (DiskHistory, wire form)
        self.about = AboutReporter(cfg.system_uuid)

    async def run(self, stop: asyncio.Event, notifier: Notifier | None = None) -> None:
        def connection(text: str) -> None:
            self.connection = text
            if notifier is not None:
                notifier.ready(self.status_line)  # READY=1 once the first dial is decided (connected or why not)

        metrics = await start_metrics(self.cfg.metrics, [MTCollector(self)])
        try:
            await stay_connected(stop, self.cfg.host, self.cfg.port, self.ssl, "mt", self.session,
                                 self.stop_workers, connection)
        finally:
            if metrics is not None:
                await metrics.close()
        self.close_disks()

    def status_line(self) -> str:
        """The master target in words (systemd's STATUS=): the connection, then the disks it applies."""
        failed = len(self.failed)
        applying = len(self.workers) - sum(1 for d in self.failed if d in self.workers)
        disks = f"applying {applying} disk{'' if applying == 1 else 's'}" + (f", {failed} failed" if failed else "")
        return f"{self.connection}; {disks}"

    async def stop_workers(self) -> None:
        for w in self.workers.values():
            if w.task is not None:
                w.task.cancel()
        await asyncio.gather(*(w.task for w in self.workers.values() if w.task), return_exceptions=True)
        await asyncio.gather(*(w.inflight for w in self.workers.values() if w.inflight), return_exceptions=True)
        self.close_disks()
        self.workers.clear()

    def close_disks(self) -> None:
        """Close every disk's replica and retention journal. A session that ends drops its workers: a
        journal left open would keep the segments pruning deletes allocated (the campaign's wedge of a
        retention volume full of deleted files after some reconnects)."""
        for w in self.workers.values():
            for what, close in ((w.state.path, w.applier.replica.close), (w.journal.dir, w.journal.close)):
                try:
                    close()
                except OSError as exc:
                    log.warning("closing %s: %s", what, exc)

    async def session(self, link: Link) -> None:
        # A request to the process server unanswered in its time (TimeoutError) means this session is broken
        # as surely as a reset: these end the session, which reconnects; they are not bugs of a task.
        passthrough = SESSION_ENDS
        helpers = [
            asyncio.create_task(supervise("assignment poll", lambda: self.poll(link), passthrough=passthrough)),
            asyncio.create_task(supervise("retention upkeep", lambda: self.upkeep(link), passthrough=passthrough)),
            asyncio.create_task(self.read_loop(link)),
        ]
        about = asyncio.create_task(self.about.tell(link))  # not a helper: its end never ends the session
        try:
            # The session ends when the connection does, or when a helper ends it (its exception re-raised).
            done, _ = await asyncio.wait(helpers, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            for t in (*helpers, about):
                t.cancel()
            await asyncio.gather(*helpers, about, return_exceptions=True)

    async def read_loop(self, link: Link) -> None:
        while True:
            msg = await link.recv()
            if isinstance(msg, Batch | Marker):
                log.debug("disk %d: received sequence %d", msg.disk, msg.sequence)
                w = self.workers.get(msg.disk)
                if w is None and msg.disk in self.released:
                    continue  # sent before the process server stopped its sender for this disk
                if w is None:
                    raise RemoteProtocolError(GoodbyeCode.UNEXPECTED_MESSAGE, f"record for disk {msg.disk}, not pulled")
                w.queue.put_nowait(msg)  # bounded by the process server's window
            elif isinstance(msg, Reply):
                link.deliver(msg)
            elif isinstance(msg, Request) and msg.op == "wake":
                self.wakeup.set()
                self.spawn(send_reply(link, msg.op, Reply(msg.id, True, {})), "reply to wake")  # never wait to write
            elif isinstance(msg, Request):
                self.spawn(self.answer(link, msg), f"request {msg.op}")  # answered in its own task, always
            else:
                raise RemoteProtocolError(GoodbyeCode.UNEXPECTED_MESSAGE, f"unexpected {type(msg).__name__}")

    async def answer(self, link: Link, req: Request) -> None:
        """Run a request from the process server and always answer it (plumbing.serve): validated at the
        boundary; a failure is an error reply, never silence."""
        handlers: dict[str, Any] = {
            "check_replica": self.check_replica,
            "find_device": self.find_device,
            "resync_hashes": functools.partial(self.resync_hashes, link),
            "release": functools.partial(release, self),
            **{op: functools.partial(fn, self) for op, fn in HANDLERS.items()},  # the operator's requests
        }
        await serve_request(link, req, "ps", "mt", handlers.get(req.op))

    async def upkeep(self, link: Link) -> None:
        """Every few seconds: prune history as the retention policy says, then tell the process server
        what each disk's history holds (status shows it)."""
        while True:
            await asyncio.sleep(UPKEEP_INTERVAL)
            try:
                await asyncio.to_thread(volume_pressure, list(self.workers.values()), self.cfg.retention_dir,
                                        self.cfg.reserve)
            except OSError as exc:
                log.warning("retention volume %s: %s", self.cfg.retention_dir, exc)
            report = {}
            for w in list(self.workers.values()):
                try:
                    async with w.lock:
                        if not w.halted and not w.pins:
                            await asyncio.to_thread(prune, w, self.cfg.policy)
                        pts = await asyncio.to_thread(point_list, w, self.cfg.policy)
                    report[str(w.state.disk)] = DiskHistory.of(PointList.from_wire(pts), w.error).to_wire()
                except (OSError, JournalError, BadRequest) as exc:  # BadRequest: a bug making the list
                    log.error("disk %d: retention upkeep: %s", w.state.disk, exc)
                    continue
            for disk, why in self.failed.items():  # disks that could not be opened: still said every time
                report.setdefault(str(disk), {"error": why})
            self.history = report
            if report:
                await link.send(Request(0, "mt_report", {"disks": report}))

    async def poll(self, link: Link) -> None:
        """Learn new assignments; re-pull disks whose last record was rejected, after a delay."""
        loop = asyncio.get_running_loop()
        while True:
            self.wakeup.clear()  # before asking, so a wake that arrives meanwhile is not lost
            try:
                got, invalid = parse_subscribe(await link.request("subscribe"))
            except BadRequest as exc:  # not a subscribe reply: end this session
                raise RemoteProtocolError(GoodbyeCode.BAD_REPLY, str(exc)) from None
            for disk, why in invalid:  # one poisoned assignment fails that disk alone
                if disk is not None:
                    await self.disk_failed(link, disk, why)
                else:
                    log.error("%s", why)
            res = got.to_wire()
            problem = self.volume_problem(res)
            if problem:
                for d in res["disks"]:
                    w = self.workers.get(d["disk"])
                    if w is None:
                        await self.disk_failed(link, d["disk"], problem)
                    else:
                        w.error = problem  # in status with the next report; applying goes on as it was
                res["disks"] = []
            failpoints.hit("mt.poll")
            for d in res["disks"]:
                # One disk's trouble (even a bug) must not keep the others from starting (promise 9).
                try:
                    if d["disk"] in self.released:
                        continue
                    if d["disk"] not in self.workers:
                        await self.start_disk(link, d)
                    elif int(d["size"]) != self.workers[d["disk"]].state.size:
                        await self.workers[d["disk"]].resize(link, int(d["size"]))
                except SESSION_ENDS:
                    raise
                except Exception as exc:
                    disk = d.get("disk") if isinstance(d, dict) else None
                    log.exception("disk %s: cannot start it (a bug: please report it with this trace)", disk)
                    if isinstance(disk, int) and not isinstance(disk, bool):
                        self.retry_at[disk] = asyncio.get_running_loop().time() + RETRY_DELAY * 6
                        await self.disk_failed(link, disk, f"cannot open the disk: {exc!r}")
            for w in list(self.workers.values()):
                if w.blocked_until and loop.time() >= w.blocked_until:
                    w.blocked_until = 0.0
                    await self.pull(link, w)
            await wait_event(self.wakeup, POLL_INTERVAL)  # a wake: a disk is ready now

    def volume_problem(self, res: dict[str, Any]) -> str:
        """The retention volume must not be the process server's cache (when both are on this host)."""
        cache = res.get("cache_dir")
        if cache and res.get("host") == host_id() and overlaps(self.cfg.retention_dir, cache):
            # Only this rule here: a full volume is not a reason to stop (pruning frees it, upkeep alerts).
            return (f"retention volume {self.cfg.retention_dir} is the process server's cache volume ({cache}): "
                    "give the retention journal a volume of its own")
        return ""

    async def start_disk(self, link: Link, d: dict[str, Any]) -> None:
        disk = int(d["disk"])
        loop = asyncio.get_running_loop()
        if self.retry_at.get(disk, 0.0) > loop.time():
            return  # failed lately: not every poll (opening a journal can take a while)
        replica = None
        try:
            st = ReplicaState.load(self.cfg.disks_dir, disk)
            if st is None:
                st = ReplicaState(
                    disk, d["machine"], d["name"], d["uid"], int(d["size"]), d["replica_format"], d["replica_path"]
                )
                if d.get("seed"):
                    replica = await asyncio.to_thread(open_replica, st.format, Path(st.path), st.size)
                    log.info("disk %s/%s: seeding from existing replica %s", st.machine, st.name, st.path)
                else:
                    replica = await asyncio.to_thread(create_replica, st.format, Path(st.path), st.size)
                    log.info("disk %s/%s: created %s replica %s", st.machine, st.name, st.format, st.path)
                st.save(self.cfg.disks_dir)
            else:
                if st.uid != d["uid"] or st.path != d["replica_path"]:
                    raise ReplicaError(f"state for disk {disk} does not match the assignment (uid or path changed)")
                replica = await asyncio.to_thread(open_replica, st.format, Path(st.path), st.size)
            key = unwrap_key(
                base64.b64decode(d["wrapped_key"]), self.identity.key_pem, b"disk:" + uuid.UUID(st.uid).bytes
            )
            applier = Applier(key, uuid.UUID(st.uid).bytes, replica)
            journal = await asyncio.to_thread(self.open_journal, st, applier)
        except BaseException as exc:
            if replica is not None:
                replica.close()
            self.retry_at[disk] = loop.time() + RETRY_DELAY * 6
            if isinstance(exc, JournalError):
                msg = f"retention journal of disk {disk}: {exc}"
            elif isinstance(exc, KeyWrapError):
                msg = f"cannot unwrap the disk's data key: {exc}"
            elif isinstance(exc, ReplicaError | OSError):
                msg = str(exc)
            else:
                raise  # a bug: the caller logs its traceback and fails the disk
            await self.disk_failed(link, disk, msg)
            return
        self.failed.pop(disk, None)
        self.retry_at.pop(disk, None)
        w = DiskWorker(self, st, applier, journal)
        w.key = key
        w.failover_problem = self.failover_problems.pop(disk, None)
        w.stats = self.apply_stats.setdefault(disk, w.stats)
        self.workers[disk] = w
        w.task = asyncio.create_task(self.run_worker(link, w))
        if w.halted:
            log.info("disk %s/%s: failed over; not applying", st.machine, st.name)
            return
        await self.pull(link, w)

    async def run_worker(self, link: Link, w: DiskWorker) -> None:
        """A disk's apply task under supervision: a bug fails this disk (status shows why, the records it
        held are pulled again) and the task starts again after a backoff; other disks go on."""
        st = w.state

        def failed(exc: BaseException) -> None:
            w.error = f"applying failed unexpectedly: {describe(exc)}"
            w.blocked_until = asyncio.get_running_loop().time() + RETRY_DELAY  # pull what it held again

        await supervise(f"disk {st.machine}/{st.name} apply", lambda: w.run(link), on_failure=failed,
                        passthrough=SESSION_ENDS)

    async def disk_failed(self, link: Link, disk: int, msg: str) -> None:
        if self.failed.get(disk) != msg:
            log.error("disk %d: %s", disk, msg)
            self.failed[disk] = msg
            await link.send(Reject(disk, 0, RejectCode.REPLICA_ERROR, msg))

    def open_journal(self, st: ReplicaState, applier: Applier) -> DiskJournal:
        """Open the disk's retention journal; roll back a group the last run left open (promise 5)."""
        journal = DiskJournal(
            self.cfg.retention_dir / st.uid, st.disk, applier.opener_key, uuid.UUID(st.uid).bytes, self.segment_size
        )
        pending = journal.open()
        if pending is not None:
            journal.rollback_pending(pending, replica_writer(applier.replica), applier.replica.sync)
            if st.applied_seq >= pending.record.sequence:
                st.applied_seq = pending.record.sequence - 1
        if journal.last_seq > st.applied_seq:
            st.applied_seq = journal.last_seq  # committed after the replica sync; the state file lags
        fo = FailoverState.load(journal.dir)
        if fo is not None and (fo.at != fo.target or fo.step is not None):
            log.warning("disk %d: finishing an interrupted failover move from %d to %d", st.disk, fo.at, fo.target)
            try:
                move(journal, applier.replica, fo, fo.target)
            except Exception as exc:
                # The disk still opens (halted, failed over) so that the operator can see why and move
                # again; status names no point while the replica is between two states.
                log.exception("disk %d: the interrupted failover move cannot be finished", st.disk)
                self.failover_problems[st.disk] = f"{type(exc).__name__}: {exc}"
        newest = journal.points()
        if newest:
            st.last_point = Point.from_group(newest[-1]).to_wire()
        st.save(self.cfg.disks_dir)
        return journal

    async def pull(self, link: Link, w: DiskWorker) -> None:
        try:
            res = await link.request("pull", disk=w.state.disk, applied_seq=w.state.applied_seq)
            skip = int(res.get("skip_to") or 0)
            if skip > w.state.applied_seq:
                # What lay between is gone from the process server: a resync (already requested) repairs it.
                log.error("disk %d: records %d..%d are lost; a resync will repair the replica", w.state.disk,
                          w.state.applied_seq + 1, skip)
                w.state.applied_seq = skip
                w.state.move(DiskState.INCONSISTENT, f"records up to {skip} are lost: a resync repairs it")
                await asyncio.to_thread(w.state.save, self.cfg.disks_dir)
        except RequestFailed as exc:
            log.error("disk %d: pull refused: %s", w.state.disk, exc)
            w.blocked_until = asyncio.get_running_loop().time() + RETRY_DELAY * 6

    def spawn(self, coro: Any, name: str = "task") -> None:
        spawn(coro, name, self.background)

    async def make_room(self, w: DiskWorker, need: int) -> None:
        """Room on the retention volume for a group of `w` (upkeep.make_room, over every open disk)."""
        await make_room(list(self.workers.values()), w, need, self.cfg.retention_dir, self.cfg.reserve)

    @property
    def disks_dir(self) -> Path:
        return self.cfg.disks_dir

    @property
    def retention_dir(self) -> Path:
        return self.cfg.retention_dir

    @property
    def policy(self) -> Policy:
        return self.cfg.policy

    def disk(self, disk: int) -> DiskWorker:
        w = self.workers.get(disk)
        if w is None:
            why = self.failed.get(disk)
            raise NotOpen(f"disk {disk} is not open on this master target" + (f": {why}" if why else ""))
        return w

    async def check_replica(self, path: str, format: str, size: int, existing: bool = False) -> dict[str, Any]:
        await check_replica(self.cfg.retention_dir, self.used_paths(), path, format, size, existing)
        return {}

    async def find_device(self, name: str, size: int, wait: float) -> dict[str, Any]:
        path = await find_device(self.cfg.disk_by_id_dir, name, size, wait, self.used_paths())
        log.info("found the attached disk %s (%d bytes): %s", name, size, os.path.realpath(path))
        return {"path": path}

    async def resync_hashes(self, link: Link, disk: int, generation: int, query: dict[str, Any],
                            size: int | None = None) -> dict[str, Any]:
        w = self.workers.get(disk)
        if w is None:
            raise RequestFailed(ErrorCode.FAILED, f"disk {disk} is not open on this master target")
        return await answer_hashes(w, link, generation, query, size)

    def used_paths(self) -> set[str]:
        return {s.path for s in ReplicaState.all(self.cfg.disks_dir)}
