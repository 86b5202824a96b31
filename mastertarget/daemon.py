"""The master target daemon: dials the process server, learns which disks are assigned to it, pulls
each disk's records in order, verifies and applies them, and acks only after the replica is synced
and its applied sequence recorded (promise 1 and 2 on this side).

Failure handling: a record that fails authentication or cannot be written (file system full, I/O
error) is REJECTed with the reason — which the process server shows in status — and is *not* acked,
so it stays in the cache. The master target retries the disk after RETRY_DELAY.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import stat
import uuid
from pathlib import Path
from typing import Any

from standby.plumbing import failpoints
from standby.plumbing.aio import wait_event
from standby.plumbing.errors import NotStarted
from standby.plumbing.identity import Identity, IdentityError
from standby.plumbing.link import Link, LinkClosed, RequestFailed, stay_connected
from standby.plumbing.serve import send_reply, serve_request
from standby.plumbing.service import host_id
from standby.plumbing.supervise import describe, spawn, supervise
from standby.plumbing.tls import client_context
from standby.proto import hashtree
from standby.proto.envelope import seal_hashes
from standby.proto.errors import EnvelopeError, ProtocolError, RemoteProtocolError
from standby.proto.keywrap import KeyWrapError, unwrap_key
from standby.proto.messages import Ack, Batch, Commit, Reject, Reply, Request
from standby.proto.requests import BadRequest, parse_subscribe

from .apply import Applier, BadCommit
from .config import MTConfig
from .diskstate import Point, ReplicaState
from .history import DiskJournal
from .journal import JournalError
from .operations import (
    HANDLERS,
    OpError,
    drop_history,
    drop_oldest,
    oldest_droppable,
    point_list,
    prune,
    reserve_bytes,
    volume_pressure,
)
from .recovery import FailoverState, move, replica_writer
from .replicas import KINDS, ReplicaError, create_replica, open_replica
from .replicas.resize import resize_replica
from .volume import VolumeError, check_retention_dir, free_bytes, overlaps

log = logging.getLogger("standby.mt")
RETRY_DELAY = 5.0
SESSION_ENDS = (LinkClosed, ProtocolError, ConnectionError, TimeoutError)
POLL_INTERVAL = 1.0
# Records applied under one sync at most (the process server sends at most MT_WINDOW ahead anyway).
GROUP_MAX = 8
UPKEEP_INTERVAL = 5.0


def record_bytes(m: Batch | Commit) -> int:
    """How much old contents applying `m` can save in the journal (its extents' lengths, zeros included)."""
    return m.logical_bytes if isinstance(m, Batch) else 0


class DiskWorker:
    """One replica: a queue of records from the process server and the task that applies them."""

    def __init__(self, mt: MasterTarget, state: ReplicaState, applier: Applier, journal: DiskJournal) -> None:
        self.mt = mt
        self.state = state
        self.applier = applier
        self.journal = journal
        self.queue: asyncio.Queue[Batch | Commit] = asyncio.Queue()
        self.carry: Batch | Commit | None = None  # taken from the queue, starts the next group
        self.blocked_until = 0.0  # after a reject: ignore records until the disk is pulled again
        self.task: asyncio.Task[None] | None = None
        self.inflight: asyncio.Future[None] | None = None
        self.key = b""
        self.lock = asyncio.Lock()  # applying and hashing the replica never overlap
        self.tree: tuple[int, list[bytes]] | None = None  # (generation, levels) of the last resync hashing
        self.halted = state.state == "FailedOver"  # failed over: records are no longer applied
        self.before_failover = "UpToDate"
        self.pins = 0  # test failovers reading the journal: no pruning meanwhile
        self.space_cap_override: int | None = None  # set under retention-volume pressure
        self.retention_alert = ""
        self.retention_alert_at = 0.0
        self.failover_problem: str | None = None  # why the last failover move broke off
        self.error: str | None = None  # why applying this disk failed (status shows it until it works again)

    def journal_on(self) -> bool:
        """Groups are journaled from the first up-to-date state on (the initial copy is not: no point yet)."""
        return self.state.state == "UpToDate" or not self.journal.empty

    def halt(self) -> None:
        """Stop applying (failover): whatever is queued stays unacknowledged in the process server."""
        self.halted = True
        while not self.queue.empty():
            self.queue.get_nowait()

    async def run(self, link: Link) -> None:
        """Apply records in order, a group at a time: whatever is queued (up to GROUP_MAX) is verified in
        worker threads in parallel, written, synced once, recorded once and then acked — group commit, so
        the cost of the syncs is shared when the master target is behind."""
        st = self.state
        while True:
            # A group ends at a commit: every recovery point is a group boundary in the retention journal.
            # It also ends before its old contents would pass `group_bytes`: they must fit in the room the
            # retention volume has (a small volume gets small groups), and they are read into memory.
            group = [self.carry or await self.queue.get()]
            self.carry = None
            size = record_bytes(group[0])
            while not isinstance(group[-1], Commit) and not self.queue.empty() and len(group) < GROUP_MAX:
                nxt = self.queue.get_nowait()
                if size + record_bytes(nxt) > self.mt.group_bytes:
                    self.carry = nxt
                    break
                group.append(nxt)
                size += record_bytes(nxt)
            ready: list[Batch | Commit] = []
            if self.halted:
                continue
            for msg in group:
                if msg.sequence <= st.applied_seq:
                    await link.send(Ack(st.disk, msg.sequence, msg.generation))  # already applied: say so again
                    continue
                if self.blocked_until:
                    # Sent before our reject reached the process server; it resends from applied_seq + 1.
                    log.debug("disk %d: dropping sequence %d (applied %d)", st.disk, msg.sequence, st.applied_seq)
                    continue
                expect = (ready[-1].sequence if ready else st.applied_seq) + 1
                if msg.sequence != expect:
                    # Promise 2: never apply out of order. Pull again from what we hold (after a short delay).
                    log.warning(
                        "disk %d: sequence %d arrived when %d was due; pulling again", st.disk, msg.sequence, expect
                    )
                    self.blocked_until = asyncio.get_running_loop().time() + 1.0
                    continue
                ready.append(msg)
            if ready:
                failpoints.hit("mt.apply")
                if self.journal_on():
                    # Room for this group's old contents first (pruning takes other disks' locks: never
                    # while holding ours).
                    await self.mt.make_room(self, sum(record_bytes(m) for m in ready))
                async with self.lock:
                    await self.apply_group(link, ready)

    async def apply_group(self, link: Link, msgs: list[Batch | Commit]) -> None:
        st = self.state

        def verify(m: Batch | Commit) -> list[bytes | None] | None:
            if isinstance(m, Batch):
                return self.applier.verify_batch(m)
            self.applier.verify_commit(m)
            return None

        results = await asyncio.gather(*(asyncio.to_thread(verify, m) for m in msgs), return_exceptions=True)
        good: list[tuple[Batch | Commit, list[bytes | None] | None]] = []
        failure: tuple[Batch | Commit, BaseException] | None = None
        for m, r in zip(msgs, results, strict=True):
            if isinstance(r, BaseException):
                failure = (m, r)
                break
            good.append((m, r))
        if good:
            batches = [(m, p) for m, p in good if isinstance(m, Batch) and p is not None]
            journal = self.journal if self.journal_on() else None
            first, last = good[0][0].sequence, good[-1][0].sequence
            try:
                # Shielded: a cancelled session must not close the replica under a thread still writing it;
                # stop_workers waits for `inflight` before closing.
                self.inflight = asyncio.ensure_future(asyncio.to_thread(self.write, journal, first, batches))
                await asyncio.shield(self.inflight)
                point: Point | None = None
                changed = False
                for m, _ in good:
                    kind = m.meta.get("kind") if isinstance(m, Commit) else None
                    if kind in ("initial-complete", "resync-complete"):
                        st.state, changed = "UpToDate", True
                        log.info("disk %s/%s: replica %s is up to date (%s)", st.machine, st.name, st.path, kind)
                    elif kind == "point" and isinstance(m, Commit):
                        if st.state == "UpToDate":
                            point = Point.from_commit(m)
                        else:  # records were skipped or the disk grew: not a copy of the source until resynced
                            log.info("disk %d: point %d not recorded: the replica awaits a resync", st.disk, m.sequence)
                    changed = changed or m.generation > st.generation
                    st.generation = max(st.generation, m.generation)
                st.applied_seq = last
                if st.error is not None:
                    st.error, changed = None, True
                if journal is not None:
                    c = good[-1][0]
                    meta = dict(c.meta) if isinstance(c, Commit) else {"generation": c.generation, "kind": "batch"}
                    if meta.get("kind") == "point" and point is None:
                        meta["kind"] = "batch"  # applied, but not a point (see above)
                    try:
                        await asyncio.to_thread(journal.write_commit, first, last, meta)
                    except OSError as exc:
                        raise JournalError(f"cannot write the retention journal in {journal.dir}: "
                                           f"{exc.strerror or exc}") from exc
                if point is not None:
                    st.last_point, changed = point.as_dict(), True
                if changed or journal is None:
                    # With the journal, its COMMIT records applied_seq durably; the state file only changes.
                    await asyncio.to_thread(st.save, self.mt.cfg.disks_dir)
            except (OSError, ReplicaError, JournalError) as exc:
                await asyncio.to_thread(self.roll_back_open_group)
                reason = str(exc) if isinstance(exc, JournalError) else (
                    f"cannot write replica {st.path}: {exc.strerror if isinstance(exc, OSError) else exc}")
                await self.reject(link, good[0][0].sequence, "write-failed", reason)
                return
            except Exception as exc:  # a bug: logged with its traceback; the disk is failed, others go on
                log.exception("disk %d: applying sequences %d..%d failed unexpectedly", st.disk, first, last)
                await asyncio.to_thread(self.roll_back_open_group)
                await self.reject(link, first, "failed", f"applying failed unexpectedly: {exc!r}")
                return
            if self.error is not None:
                log.info("disk %s/%s: applying works again", st.machine, st.name)
                self.error = None
            for m, _ in good:
                await link.send(Ack(st.disk, m.sequence, m.generation))
        if failure is not None:
            m, exc = failure
            if isinstance(exc, EnvelopeError):
                await self.reject(link, m.sequence, "authentication-failed", str(exc))
            elif isinstance(exc, BadCommit):
                await self.reject(link, m.sequence, "bad-commit", str(exc))
            else:
                log.error("disk %d: verifying sequence %d failed unexpectedly", st.disk, m.sequence,
                          exc_info=(type(exc), exc, exc.__traceback__))
                await self.reject(link, m.sequence, "failed", f"verifying failed unexpectedly: {exc!r}")

    def write(self, journal: DiskJournal | None, first: int, batches: list[tuple[Batch, list[bytes | None]]]) -> None:
        """Worker thread: old contents to the journal (synced), then the batches into the replica (synced).
        If the replica write fails half-way, the old contents go back at once."""
        rep = self.applier.replica
        if journal is None or not batches:
            self.applier.write_group(batches)
            return
        if journal.open_undo:  # a failed group whose roll-back failed too: first things first
            journal.abort(replica_writer(rep), rep.sync)
        ranges = [(e.offset, e.length) for b, _ in batches for e in b.extents]
        try:
            journal.write_undo_ranges(first, batches[0][0].generation, ranges, rep.read)
        except OSError as exc:
            journal.discard_undo()  # nothing was written to the replica yet: the group is retried whole
            raise JournalError(f"cannot write the retention journal in {journal.dir}: {exc.strerror or exc}") from exc
        except BaseException:
            journal.discard_undo()
            raise
        try:
            self.applier.write_group(batches)
        except Exception:
            try:
                journal.abort(replica_writer(rep), rep.sync)
            except (OSError, ReplicaError, JournalError) as exc:
                log.critical("disk %d: cannot roll back a failed group: %s (start-up will)", self.state.disk, exc)
            raise

    def roll_back_open_group(self) -> None:
        """Worker thread: a group that failed after its UNDO parts were written (the replica write, the
        COMMIT append or the state file) is rolled back now, so the journal and the replica agree and the
        group can be applied again whole. If that fails too, the next attempt (or start-up) does it."""
        if not self.journal.open_undo:
            return
        rep = self.applier.replica
        try:
            self.journal.abort(replica_writer(rep), rep.sync)
        except (OSError, ReplicaError, JournalError) as exc:
            log.critical("disk %d: cannot roll back a failed group yet: %s (retried)", self.state.disk, exc)

    async def reject(self, link: Link, seq: int, code: str, reason: str) -> None:
        log.error("disk %s/%s sequence %d rejected: %s", self.state.machine, self.state.name, seq, reason)
        self.state.error = reason
        self.blocked_until = asyncio.get_running_loop().time() + RETRY_DELAY
        await link.send(Reject(self.state.disk, seq, code, reason))


class MasterTarget:
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
        self.wakeup = asyncio.Event()
        self.background: set[asyncio.Task[Any]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        await stay_connected(stop, self.cfg.host, self.cfg.port, self.ssl, "mt", self.session, self.stop_workers)
        self.close_disks()

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
        try:
            # The session ends when the connection does, or when a helper ends it (its exception re-raised).
            done, _ = await asyncio.wait(helpers, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            for t in helpers:
                t.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def read_loop(self, link: Link) -> None:
        while True:
            msg = await link.recv()
            if isinstance(msg, Batch | Commit):
                log.debug("disk %d: received sequence %d", msg.disk, msg.sequence)
                w = self.workers.get(msg.disk)
                if w is None:
                    raise RemoteProtocolError("unexpected-message", f"record for disk {msg.disk}, not pulled")
                w.queue.put_nowait(msg)  # bounded by the process server's window
            elif isinstance(msg, Reply):
                link.deliver(msg)
            elif isinstance(msg, Request) and msg.op == "wake":
                self.wakeup.set()
                self.spawn(send_reply(link, msg.op, Reply(msg.id, True, {})), "reply to wake")  # never wait to write
            elif isinstance(msg, Request):
                self.spawn(self.answer(link, msg), f"request {msg.op}")  # answered in its own task, always
            else:
                raise RemoteProtocolError("unexpected-message", f"unexpected {type(msg).__name__}")

    async def answer(self, link: Link, req: Request) -> None:
        """Run a request from the process server and always answer it (plumbing.serve): validated at the
        boundary; a failure is an error reply, never silence."""
        handlers: dict[str, Any] = {
            "check_replica": self.answer_check,
            "resync_hashes": lambda **a: self.answer_hashes(link, **a),
            **{op: functools.partial(fn, self) for op, fn in HANDLERS.items()},
        }
        await serve_request(link, req, "ps", "mt", handlers.get(req.op))

    async def upkeep(self, link: Link) -> None:
        """Every few seconds: prune history as the retention policy says, then tell the process server
        what each disk's history holds (status shows it)."""
        while True:
            await asyncio.sleep(UPKEEP_INTERVAL)
            try:
                await asyncio.to_thread(volume_pressure, self)
            except OSError as exc:
                log.warning("retention volume %s: %s", self.cfg.retention_dir, exc)
            report = {}
            for w in list(self.workers.values()):
                try:
                    async with w.lock:
                        if not w.halted and not w.pins:
                            await asyncio.to_thread(prune, w)
                        pts = await asyncio.to_thread(point_list, w)
                except (OSError, JournalError) as exc:
                    log.error("disk %d: retention upkeep: %s", w.state.disk, exc)
                    continue
                p = pts["points"]
                report[str(w.state.disk)] = {
                    "points": len(p),
                    "oldest_point": p[0]["time"] if p else None,
                    "newest_point": p[-1]["time"] if p else None,
                    "journal_bytes": pts["journal_bytes"],
                    "alert": pts["alert"],
                    "failed_over": pts["failover"],
                    "error": w.error,
                }
            for disk, why in self.failed.items():  # disks that could not be opened: still said every time
                report.setdefault(str(disk), {"error": why})
            if report:
                await link.send(Request(0, "mt_report", {"disks": report}))

    async def poll(self, link: Link) -> None:
        """Learn new assignments; re-pull disks whose last record was rejected, after a delay."""
        loop = asyncio.get_running_loop()
        while True:
            self.wakeup.clear()  # before asking, so a wake that arrives meanwhile is not lost
            try:
                got, invalid = parse_subscribe(await link.request("subscribe"))
            except BadRequest as exc:
                raise RemoteProtocolError(exc.code, str(exc)) from None  # not a subscribe reply: end this session
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
                    if d["disk"] not in self.workers:
                        await self.start_disk(link, d)
                    elif int(d["size"]) != self.workers[d["disk"]].state.size:
                        await self.resize(link, self.workers[d["disk"]], int(d["size"]))
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
                    replica = await asyncio.to_thread(open_replica, st.kind, Path(st.path), st.size)
                    log.info("disk %s/%s: seeding from existing replica %s", st.machine, st.name, st.path)
                else:
                    replica = await asyncio.to_thread(create_replica, st.kind, Path(st.path), st.size)
                    log.info("disk %s/%s: created %s replica %s", st.machine, st.name, st.kind, st.path)
                st.save(self.cfg.disks_dir)
            else:
                if st.uid != d["uid"] or st.path != d["replica_path"]:
                    raise ReplicaError(f"state for disk {disk} does not match the assignment (uid or path changed)")
                replica = await asyncio.to_thread(open_replica, st.kind, Path(st.path), st.size)
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
            await link.send(Reject(disk, 0, "replica-error", msg))

    def open_journal(self, st: ReplicaState, applier: Applier) -> DiskJournal:
        """Open the disk's retention journal; roll back a group the last run did not commit (promise 5)."""
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
            st.last_point = Point.from_group(newest[-1]).as_dict()
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
                w.state.applied_seq, w.state.state = skip, "Inconsistent"
                await asyncio.to_thread(w.state.save, self.cfg.disks_dir)
        except RequestFailed as exc:
            log.error("disk %d: pull refused: %s", w.state.disk, exc)
            w.blocked_until = asyncio.get_running_loop().time() + RETRY_DELAY * 6

    async def resize(self, link: Link, w: DiskWorker, size: int) -> None:
        """The source disk changed size: resize the replica (between two applied groups) to match."""
        st = w.state
        async with w.lock:
            if st.size == size:
                return
            try:
                await asyncio.to_thread(w.applier.replica.close)
                await asyncio.to_thread(resize_replica, st.kind, Path(st.path), size)
                replica = await asyncio.to_thread(open_replica, st.kind, Path(st.path), size)
            except (ReplicaError, OSError) as exc:
                msg = f"cannot resize replica {st.path} from {st.size} to {size} bytes: {exc}"
                log.error("disk %s/%s: %s", st.machine, st.name, msg)
                st.error = msg
                w.blocked_until = asyncio.get_running_loop().time() + RETRY_DELAY * 6
                await link.send(Reject(st.disk, 0, "replica-error", msg))
                return
            log.warning("disk %s/%s: replica %s resized from %d to %d bytes", st.machine, st.name, st.path, st.size,
                        size)
            w.applier.replica = replica
            st.size, st.state, w.tree = size, "Inconsistent", None
            await asyncio.to_thread(st.save, self.cfg.disks_dir)

    async def make_room(self, w: DiskWorker, need: int) -> None:
        """Before a group's old contents go to the journal: if they would take the retention volume into
        its reserve, prune now instead of failing on ENOSPC and retrying for ever (promise 8; the fault
        campaign's retention wedges). First the oldest points of all disks, oldest first, whole segments
        at a time, never a disk's newest point; if that is not enough, the history of the disk that needs
        the room (then of the largest), which a stretch of churn without any point fills."""
        want = need + need // 8 + (1 << 20)  # sealing adds tables and tags; the file system its blocks
        free, total = await asyncio.to_thread(free_bytes, self.cfg.retention_dir)
        short = reserve_bytes(self.cfg.reserve, total) + want - free
        log.debug("disk %d: %d bytes of old contents to journal, %d free on the retention volume", w.state.disk,
                  need, free)
        workers = [x for x in self.workers.values() if not x.halted and not x.pins]
        while short > 0:
            options = [(c, x) for x in workers if (c := oldest_droppable(x)) is not None]
            if not options:
                break
            (_, before), x = min(options, key=lambda o: o[0][0])
            async with x.lock:
                freed = await asyncio.to_thread(drop_oldest, x, before)
            if not freed:
                break
            short -= freed
        for x in sorted(workers, key=lambda x: (x is not w, -x.journal.bytes)):
            if short <= 0:
                return
            async with x.lock:
                short -= await asyncio.to_thread(drop_history, x)
        if short > 0:
            free, total = await asyncio.to_thread(free_bytes, self.cfg.retention_dir)
            log.warning("the retention volume %s has %d bytes free after pruning, too few for the next group of "
                        "disk %s/%s (%d bytes of old contents, %d kept in reserve): what fills it is not history",
                        self.cfg.retention_dir, free, w.state.machine, w.state.name, need,
                        reserve_bytes(self.cfg.reserve, total))

    def spawn(self, coro: Any, name: str = "task") -> None:
        spawn(coro, name, self.background)

    async def answer_hashes(self, link: Link, disk: int, generation: int, query: dict[str, Any],
                            size: int | None = None) -> dict[str, Any]:
        """A resync hash query from the disk's agent (through the process server): the top level of the
        replica's checksum tree (computed afresh), or children of given nodes. Encrypted for the agent."""
        w = self.workers.get(disk)
        if w is None:
            raise OpError("failed", f"disk {disk} is not open on this master target")
        try:
            if size is not None and size != w.state.size:
                await self.resize(link, w, size)
                if size != w.state.size:
                    raise ReplicaError(w.state.error or "the replica could not be resized")
            async with w.lock:
                if query.get("level") is None or w.tree is None or w.tree[0] != generation:
                    log.info("disk %s/%s: hashing replica %s for a resync", w.state.machine, w.state.name, w.state.path)
                    # Sparse VMDK reads walk shared grain tables: one thread; the flat kinds read with pread.
                    threads = 1 if w.state.kind == "vmdk-sparse" else 4
                    leaves = await asyncio.to_thread(
                        hashtree.leaf_hashes, w.applier.replica.read, w.state.size, hashtree.LEAF, None, threads
                    )
                    w.tree = (generation, hashtree.build(leaves))
        except (ReplicaError, OSError) as exc:
            raise OpError("failed", f"cannot hash the replica: {exc}") from None
        levels = w.tree[1]
        if query.get("level") is None:
            hashes = levels[-1]
        else:
            level = int(query["level"])
            if level >= len(levels) - 1:
                raise OpError("bad-input", f"bad hash query: level {level}, the tree has {len(levels)}")
            try:
                kids = hashtree.children([int(p) for p in query["parents"]], hashtree.count(levels[level]))
                hashes = hashtree.pick(levels[level], kids)
            except ValueError as exc:
                raise OpError("bad-input", f"bad hash query: {exc}") from None
        qbytes = json.dumps(query, sort_keys=True, separators=(",", ":")).encode()
        sealed = seal_hashes(w.key, uuid.UUID(w.state.uid).bytes, generation, qbytes, hashes)
        return {"sealed": base64.b64encode(sealed).decode()}

    async def answer_check(self, path: str, format: str, size: int, existing: bool = False) -> dict[str, Any]:
        if overlaps(path, self.cfg.retention_dir):
            code, message = "bad-input", f"replica {path} would be on the retention volume {self.cfg.retention_dir}"
        elif existing:
            code, message = await asyncio.to_thread(check_existing_replica, path, format, size, self.used_paths())
        else:
            code, message = check_replica_path(path, format, size, self.used_paths())
        if code:
            raise OpError(code, message)
        return {}

    def used_paths(self) -> set[str]:
        return {s.path for s in ReplicaState.all(self.cfg.disks_dir)}


def segment_size_for(configured: int, volume_bytes: int) -> int:
    """Journal segment size on a volume of `volume_bytes`: pruning frees whole segments and never the
    newest, so a segment must be a small part of the volume (a 64 MiB volume with 64 MiB segments could
    never prune anything: finding 7 of issue 9). At most 1/16 of the volume, at least 1 MiB."""
    return max(min(configured, volume_bytes // 16), min(configured, 1 << 20))


def check_existing_replica(path: str, kind: str, size: int, used: set[str]) -> tuple[str, str]:
    """Can the replica at `path` (offline seeding) be opened as `kind` with the source's size?"""
    if kind not in KINDS:
        return "bad-input", f"unknown replica format {kind!r}"
    if path in used:
        return "replica-exists", f"replica path {path} is already used by another protected disk"
    try:
        open_replica(kind, Path(path), size).close()
    except (ReplicaError, OSError) as exc:
        return "bad-input", f"cannot use existing replica {path}: {exc}"
    return "", ""


def check_replica_path(path: str, kind: str, size: int, used: set[str]) -> tuple[str, str]:
    """Is `path` usable for a new replica of `size` bytes? ("", "") or (code, message)."""
    if kind not in KINDS:
        return "bad-input", f"unknown replica format {kind!r}"
    p = Path(path)
    if not p.is_absolute():
        return "bad-input", f"replica path {path!r} must be absolute"
    if path in used:
        return "replica-exists", f"replica path {path} is already used by another protected disk"
    if kind == "device":
        try:
            mode = os.stat(p).st_mode
        except OSError as exc:
            return "bad-input", f"replica device {path}: {exc.strerror}"
        if not stat.S_ISBLK(mode):
            return "bad-input", f"{path} is not a block device"
        with open(p, "rb") as f:
            dev_size = f.seek(0, os.SEEK_END)
        if dev_size != size:
            return "size-mismatch", f"device {path} has {dev_size} bytes, the source disk has {size}"
        return "", ""
    flat = p.with_name(p.stem + "-flat.vmdk") if kind in ("vmdk", "vmdk-thick", "vmdk-monolithic-flat") else None
    for q in (p, flat):
        if q is not None and q.exists():
            return "replica-exists", f"replica path {q} already exists on master target (refusing to overwrite)"
    if not p.parent.is_dir():
        return "bad-input", f"directory {p.parent} does not exist on the master target"
    if not os.access(p.parent, os.W_OK):
        return "bad-input", f"directory {p.parent} is not writable on the master target"
    return "", ""
