"""Typed control requests and replies: every value a peer sends in a REQUEST's args or a REPLY's result,
and in a COMMIT's meta, is checked here before anything stores or acts on it (DESIGN promise 9).

Theory of operation
-------------------
A control request travels as `Request(id, op, args)` and is answered by `Reply(id, ok, result, ...)`
(proto.messages); the JSON of `args` and `result` is what it was before this module existed, so old and
new daemons of this release interoperate. Here each request's args and each reply's result has one
small frozen, slotted dataclass, validated in its constructor, so an invalid one cannot exist:

- the receiving side calls `parse_request(op, args, role)` (role: the peer's HELLO role, which the TLS
  certificate proved) or `parse_reply(op, result, role)` (role: ours, the requester's) and gets a typed
  object, or `BadRequest` with a stable `code` and a message naming the op, the field and what was wrong
  (`disk_open: size must be a positive multiple of 512 bytes (at most 1 PiB), got -5`); it answers that
  peer with the code and message and stores nothing;
- the sending side builds the dataclass and sends `obj.to_wire()` (a plain JSON dict);
- `OPS` is the one table of who may send which op to whom. An op name alone is not unique: `points`,
  `failover`, `test_failover`, `test_failover_cleanup` and `app_point` exist as the operator's request
  (admin -> process server, by machine) and as the relayed one (process server -> master target or agent,
  by disk), and `resync_hashes` as the agent's query and the process server's relay of it (with the disk
  size). So `OPS` is keyed by (op, sender role).

Decoding refuses unknown keys, missing keys (keys with a default may be left out: today's senders
leave them out or send null), wrong types (a bool is not an int, an int is not a string) and values out
of range. Nothing here raises anything but `BadRequest` on a peer's input, whatever JSON it is: any other
exception out of `from_wire`, `parse_request` or `parse_reply` is a bug (the tests fuzz this).

Two error kinds, as everywhere in proto/: `InvalidMessage` (a LocalProtocolError) when *we* build an
invalid message, `BadRequest` (a RemoteProtocolError) when a *peer* sent one.

The checks of single values (bounds, names, times, paths) and the `Wire` base class are in
proto.fields.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from .errors import LocalProtocolError
from .fields import (
    COMMIT_KINDS,
    CONSISTENCIES,
    ENROLL_ROLES,
    MAX_DISK_ID,
    MAX_HASH_PARENTS,
    MAX_ITEMS,
    MAX_REPLICAS,
    MAX_TAG,
    REPLICA_FORMATS,
    RESYNC_MODES,
    RESYNC_PHASES,
    ROLES,
    BadRequest,
    InvalidMessage,
    Wire,
    _f,
    _Invalid,
    _is_int,
    _path_text,
    _show,
    boolean,
    consistency,
    count,
    disk_id,
    disk_key,
    fraction,
    generation,
    hash_level,
    hash_node,
    hash_nonce,
    list_of,
    map_of,
    message,
    name,
    nested,
    nonnegative,
    one_of,
    optional,
    pair,
    passphrase,
    path,
    pem,
    point_choice,
    record,
    replica_format,
    resync_mode,
    sealed_hashes,
    seconds,
    sequence,
    short_text,
    size,
    span,
    step_op,
    stored_time,
    tag,
    text,
    time_,
    token,
    uuid_text,
    wrapped_key,
)


@message("reply")
class Empty(Wire):
    """The result of requests that answer nothing but ok: `{}`."""


# ---- agent -> process server ------------------------------------------------------------------------


@message("disk_open")
class DiskOpen(Wire):
    name: str = _f(name)
    path: str = _f(path)
    size: int = _f(size)
    uid: str = _f(uuid_text)


@message("resync request")
class ResyncWanted(Wire):
    """A resync the operator or the process server asked for, not yet started (registry resync_request)."""

    mode: str = _f(resync_mode)
    reason: str = _f(text)


@message("disk_open reply")
class DiskOpened(Wire):
    OMIT_NONE = frozenset({"mt_cert"})  # sent only when key_needed
    disk: int = _f(disk_id)
    state: str = _f(token)
    protected: bool = _f(boolean)
    generation: int = _f(generation)
    next_sequence: int = _f(sequence)
    cursor: int = _f(count)
    initial_committed: bool = _f(boolean)
    key_needed: bool = _f(boolean)
    seed: bool = _f(boolean, False)
    resync: ResyncWanted | None = _f(optional(nested(ResyncWanted)), None)
    mt_cert: str | None = _f(optional(pem), None)


@message("disk_key")
class DiskKey(Wire):
    disk: int = _f(disk_id)
    wrapped_key: str = _f(wrapped_key)

    @property
    def wrapped_key_bytes(self) -> bytes:
        return base64.b64decode(self.wrapped_key)


@message("resync progress")
class ResyncProgress(Wire):
    """agent.resync.Progress.report()"""

    mode: str = _f(resync_mode)
    reason: str = _f(text)
    phase: str = _f(one_of(*RESYNC_PHASES))
    progress: float = _f(fraction)
    eta_seconds: float | None = _f(optional(nonnegative))
    bytes_differing: int = _f(count)
    bytes_shipped: int = _f(count)
    hash_bytes: int = _f(count)
    elapsed: float = _f(span)


@message("last app-consistent point")
class LastAppPoint(Wire):
    time: float = _f(time_)
    freeze_seconds: float | None = _f(optional(seconds))
    tag: str = _f(tag)


@message("agent report")
class AgentReport(Wire):
    """What only the agent knows about a disk, for status (agent.daemon.Agent.report)."""

    OMIT_NONE = frozenset({"error"})

    tracker: str | None = _f(optional(short_text))
    tracking_lost: str | None = _f(optional(text))
    dirty_bytes: int | None = _f(optional(count))
    tracker_cpu_seconds: float = _f(seconds)
    epochs: int = _f(count)
    points: int = _f(count)
    inconsistent_epochs: int = _f(count)
    last_inconsistent_reason: str = _f(text)
    bytes_shipped: int = _f(count)
    app_points: int = _f(count)
    last_app_point: LastAppPoint | None = _f(optional(nested(LastAppPoint)))
    resync: ResyncProgress | None = _f(optional(nested(ResyncProgress)))
    resync_pending: tuple[str, str] | None = _f(optional(pair(resync_mode, text)))  # (mode, reason)
    error: str | None = _f(optional(text), None)  # why this disk's replication failed (supervision)


@message("disk_report")
class DiskReport(Wire):
    disk: int = _f(disk_id)
    report: AgentReport = _f(nested(AgentReport))


@message("disk_report reply")
class DiskReported(Wire):
    resync: ResyncWanted | None = _f(optional(nested(ResyncWanted)))


@message("resync_begin")
class ResyncBegin(Wire):
    disk: int = _f(disk_id)
    generation: int = _f(generation)
    mode: str = _f(resync_mode)
    reason: str = _f(text)


@message("resync_begin reply")
class ResyncBegun(Wire):
    generation: int = _f(generation)


@message("hash query")
class HashQuery(Wire):
    """A resync hash query (agent.resync.query): the top level (level and parents null) or the children at
    `level` of `parents`. The master target seals its answer over this object's canonical JSON, so it is
    relayed exactly as the agent wrote it."""

    level: int | None = _f(optional(hash_level))
    parents: tuple[int, ...] | None = _f(optional(list_of(hash_node, MAX_HASH_PARENTS, 1)))
    nonce: str = _f(hash_nonce)

    def _check(self) -> None:
        if (self.level is None) != (self.parents is None):
            raise _Invalid("level and parents must both be null (the top level) or both be given")


@message("resync_hashes")
class ResyncHashes(Wire):
    """The agent's query (agent -> process server)."""

    disk: int = _f(disk_id)
    generation: int = _f(generation)
    query: HashQuery = _f(nested(HashQuery))


@message("resync_hashes")
class RelayResyncHashes(Wire):
    """The process server's relay of it to the master target, with the disk's size (it may have grown)."""

    disk: int = _f(disk_id)
    generation: int = _f(generation)
    query: HashQuery = _f(nested(HashQuery))
    size: int | None = _f(optional(size), None)


@message("resync_hashes reply")
class SealedHashes(Wire):
    sealed: str = _f(sealed_hashes)

    @property
    def sealed_bytes(self) -> bytes:
        return base64.b64decode(self.sealed)


# ---- master target -> process server ---------------------------------------------------------------


@message("subscribe")
class Subscribe(Wire):
    pass


@message("assignment")
class Assignment(Wire):
    """One disk assigned to the master target (processserver.server.MTSession.subscribe)."""

    disk: int = _f(disk_id)
    machine: str = _f(name)
    name: str = _f(name)
    uid: str = _f(uuid_text)
    size: int = _f(size)
    replica_path: str = _f(path)
    replica_format: str = _f(replica_format)
    wrapped_key: str = _f(wrapped_key)
    seed: bool = _f(boolean, False)

    @property
    def wrapped_key_bytes(self) -> bytes:
        return base64.b64decode(self.wrapped_key)


@message("subscribe reply")
class Assignments(Wire):
    disks: tuple[Assignment, ...] = _f(list_of(nested(Assignment)))
    cache_dir: str | None = _f(optional(path), None)
    host: str | None = _f(optional(short_text), None)


def parse_subscribe(result: Any) -> tuple[Assignments, list[tuple[int | None, str]]]:
    """The subscribe reply with every valid assignment, and (disk id or None, reason) for each invalid one:
    one poisoned disk must fail alone, not stop the master target from starting the others. Raises
    BadRequest("bad-reply") only if the reply itself is not a subscribe reply."""
    disks = result.get("disks") if isinstance(result, dict) else None
    if not isinstance(disks, list) or len(disks) > MAX_ITEMS:
        raise BadRequest("bad-reply", f"subscribe reply: disks must be a list of at most {MAX_ITEMS} items")
    good, bad = [], []
    for i, d in enumerate(disks):
        try:
            good.append(Assignment._parse(d))
        except _Invalid as exc:
            did = d.get("disk") if isinstance(d, dict) else None
            did = did if _is_int(did) and 0 < did <= MAX_DISK_ID else None
            where = _path_text((f"disks[{i}]", *exc.path))
            bad.append((did, f"subscribe reply: {where} {exc.problem}"))
    return Assignments.from_wire({**result, "disks": good}, "bad-reply"), bad


@message("pull")
class Pull(Wire):
    disk: int = _f(disk_id)
    applied_seq: int = _f(sequence)


@message("pull reply")
class Pulled(Wire):
    received_seq: int = _f(sequence)
    skip_to: int = _f(sequence, 0)


@message("failover step")
class FailoverStep(Wire):
    op: int = _f(step_op)
    src: int = _f(sequence)
    dst: int = _f(sequence)


@message("failover state")
class FailoverInfo(Wire):
    """mastertarget.recovery.FailoverState as vars(), with `point` and `problem` (operations.point_list)."""

    OMIT_NONE = frozenset({"point", "problem"})

    latest: int = _f(sequence)
    at: int = _f(sequence)
    target: int = _f(sequence)
    point_time: float = _f(stored_time)
    started_at: float = _f(stored_time)
    committed: bool = _f(boolean)
    step: FailoverStep | None = _f(optional(nested(FailoverStep)))
    # Where the replica is settled at a listed point (None while a move is unfinished), and why the last
    # move broke off: status names a failover point only from `point`.
    point: int | None = _f(optional(sequence), None)
    problem: str | None = _f(optional(text), None)


@message("disk history")
class DiskHistory(Wire):
    """One disk's entry of the master target's periodic report (mastertarget.daemon.MasterTarget.upkeep).
    `error`: why the master target cannot serve the disk (read by the process server; optional)."""

    OMIT_NONE = frozenset({"error"})
    # A disk the master target cannot open is reported with its `error` only.
    points: int = _f(count, 0)
    oldest_point: float | None = _f(optional(time_), None)
    newest_point: float | None = _f(optional(time_), None)
    journal_bytes: int = _f(count, 0)
    alert: str = _f(text, "")
    failed_over: FailoverInfo | None = _f(optional(nested(FailoverInfo)), None)
    error: str | None = _f(optional(text), None)


@message("mt_report")
class MTReport(Wire):
    disks: dict[str, DiskHistory] = _f(map_of(disk_key, nested(DiskHistory)))


# ---- process server -> master target ---------------------------------------------------------------


@message("check_replica")
class CheckReplica(Wire):
    path: str = _f(path)
    format: str = _f(replica_format)
    size: int = _f(size)
    existing: bool = _f(boolean, False)


@message("points")
class Points(Wire):
    disk: int = _f(disk_id)


@message("recovery point")
class PointInfo(Wire):
    sequence: int = _f(sequence)
    time: float = _f(time_)
    consistency: str = _f(consistency)
    tag: str = _f(tag)
    history_bytes: int = _f(count)


@message("points reply")
class PointList(Wire):
    """mastertarget.operations.point_list"""

    disk: int = _f(disk_id)
    points: tuple[PointInfo, ...] = _f(list_of(nested(PointInfo)))
    journal_bytes: int = _f(count)
    applied_seq: int = _f(sequence)
    alert: str = _f(text)
    failover: FailoverInfo | None = _f(optional(nested(FailoverInfo)))


@message("failover")
class Failover(Wire):
    disk: int = _f(disk_id)
    sequence: int = _f(sequence)


@message("failover reply")
class FailedOver(Wire):
    disk: int = _f(disk_id)
    sequence: int = _f(sequence)
    time: float = _f(time_)
    replica: str = _f(path)
    format: str = _f(replica_format)
    bytes_written: int = _f(count)
    seconds: float = _f(seconds)


@message("failover_commit")
class FailoverCommit(Wire):
    disk: int = _f(disk_id)


@message("failover_commit reply")
class FailoverCommitted(Wire):
    disk: int = _f(disk_id)
    sequence: int = _f(sequence)
    time: float = _f(stored_time)
    replica: str = _f(path)


@message("test_failover")
class TestFailover(Wire):
    __test__ = False  # not a pytest test class
    disk: int = _f(disk_id)
    sequence: int = _f(sequence)
    directory: str | None = _f(optional(path), None)


@message("test_failover reply")
class TestFailedOver(Wire):
    __test__ = False
    disk: int = _f(disk_id)
    sequence: int = _f(sequence)
    time: float = _f(time_)
    path: str = _f(path)
    format: str = _f(replica_format)
    copy_seconds: float = _f(seconds)
    undo_groups: int = _f(count)
    bytes_undone: int = _f(count)
    seconds: float = _f(seconds)


@message("test_failover_cleanup")
class TestFailoverCleanup(Wire):
    __test__ = False
    disk: int = _f(disk_id)


@message("test_failover_cleanup reply")
class TestFailoverCleaned(Wire):
    __test__ = False
    disk: int = _f(disk_id)
    removed: tuple[str, ...] = _f(list_of(path))


@message("wake")
class Wake(Wire):
    pass


# ---- process server -> agent -----------------------------------------------------------------------


@message("app_point")
class AppPoint(Wire):
    tag: str = _f(tag, "")


@message("app_point disk")
class AppPointDisk(Wire):
    """One disk's line of an app_point reply (agent.appoint.AppPoints._entry); sequence None: no point."""

    disk: str = _f(name)
    sequence: int | None = _f(optional(sequence))
    consistency: str | None = _f(optional(consistency))
    time: float | None = _f(optional(time_))
    freeze_seconds: float | None = _f(optional(seconds))
    reason: str = _f(text)


@message("app_point reply")
class AppPointMade(Wire):
    disks: tuple[AppPointDisk, ...] = _f(list_of(nested(AppPointDisk)))
    warnings: tuple[str, ...] = _f(list_of(text, 256))


# ---- admin -> process server -----------------------------------------------------------------------

# What the CLI reads from each status disk (admin.cli.format_status, cmd_pause). Lenient on purpose: text
# rather than names, so a disk registered before names were checked can still be shown (and repaired).
_STATUS_DISK = record(
    {
        "machine": text,
        "disk": text,
        "state": text,
        "size": count,
        "mt": optional(text),
        "replica": optional(text),
        "format": optional(text),
        "progress": nonnegative,
        "rate": nonnegative,
        "eta_seconds": optional(nonnegative),
        "compression_ratio": optional(nonnegative),
        "bytes_received": count,
        "bytes_wire": count,
        "bytes_applied": count,
        "backlog_records": count,
        "backlog_bytes": count,
        "error": optional(text),
        "applying": text,
        "alerts": list_of(text),
    }
)


@message("status")
class Status(Wire):
    machine: str | None = _f(optional(name), None)


@message("status reply")
class StatusReply(Wire):
    disks: tuple[dict[str, Any], ...] = _f(list_of(_STATUS_DISK))
    cache_bytes: int = _f(count)
    cache_quota: int = _f(count)
    master_targets: tuple[str, ...] = _f(list_of(name))
    rpo_threshold: float = _f(seconds)


@message("machines")
class Machines(Wire):
    pass


@message("machine")
class MachineInfo(Wire):
    name: str = _f(name)
    role: str = _f(one_of(*ENROLL_ROLES))
    enrolled_at: float = _f(time_)


@message("machines reply")
class MachineList(Wire):
    machines: tuple[MachineInfo, ...] = _f(list_of(nested(MachineInfo)))


@message("protect")
class Protect(Wire):
    machine: str = _f(name)
    mt: str = _f(name)
    format: str = _f(replica_format, "vmdk")
    replica_dir: str | None = _f(optional(path), None)
    replicas: dict[str, str] | None = _f(optional(map_of(name, path, MAX_REPLICAS)), None)  # disk name -> path
    existing: bool = _f(boolean, False)


@message("protected disk")
class ProtectedDisk(Wire):
    disk: str = _f(name)
    replica: str = _f(path)


@message("protect reply")
class Protected(Wire):
    disks: tuple[ProtectedDisk, ...] = _f(list_of(nested(ProtectedDisk)))


@message("pause")
class Pause(Wire):
    machine: str = _f(name)


@message("resume")
class Resume(Wire):
    machine: str = _f(name)


@message("resync")
class Resync(Wire):
    machine: str = _f(name)
    full: bool = _f(boolean, False)
    disk: str | None = _f(optional(name), None)


@message("resync reply")
class ResyncRequested(Wire):
    disks: tuple[str, ...] = _f(list_of(name))


@message("points")
class AdminPoints(Wire):
    machine: str = _f(name)


@message("points disk")
class AdminPointsDisk(Wire):
    """A master target's points reply with the disk's name as `disk` and its id as `disk_id`."""

    disk: str = _f(name)
    disk_id: int = _f(disk_id)
    points: tuple[PointInfo, ...] = _f(list_of(nested(PointInfo)))
    journal_bytes: int = _f(count)
    applied_seq: int = _f(sequence)
    alert: str = _f(text)
    failover: FailoverInfo | None = _f(optional(nested(FailoverInfo)))


@message("points reply")
class AdminPointList(Wire):
    machine: str = _f(name)
    disks: tuple[AdminPointsDisk, ...] = _f(list_of(nested(AdminPointsDisk)))


@message("failover")
class AdminFailover(Wire):
    machine: str = _f(name)
    point: str | None = _f(optional(point_choice), None)
    at: float | None = _f(optional(time_), None)

    def _check(self) -> None:
        if (self.point is None) == (self.at is None):
            raise _Invalid("give exactly one of point and at")


@message("failover disk")
class AdminFailoverDisk(Wire):
    disk: str = _f(name)
    disk_id: int = _f(disk_id)
    sequence: int = _f(sequence)
    time: float = _f(time_)
    replica: str = _f(path)
    format: str = _f(replica_format)
    bytes_written: int = _f(count)
    seconds: float = _f(seconds)
    consistency: str = _f(consistency)
    tag: str = _f(tag)


@message("failover reply")
class AdminFailedOver(Wire):
    machine: str = _f(name)
    disks: tuple[AdminFailoverDisk, ...] = _f(list_of(nested(AdminFailoverDisk)))


@message("commit")
class AdminCommit(Wire):
    machine: str = _f(name)


@message("commit disk")
class AdminCommitDisk(Wire):
    disk: str = _f(name)
    disk_id: int = _f(disk_id)
    sequence: int = _f(sequence)
    time: float = _f(stored_time)
    replica: str = _f(path)


@message("commit reply")
class AdminCommitted(Wire):
    machine: str = _f(name)
    disks: tuple[AdminCommitDisk, ...] = _f(list_of(nested(AdminCommitDisk)))


@message("test_failover")
class AdminTestFailover(Wire):
    machine: str = _f(name)
    point: str | None = _f(optional(point_choice), None)
    at: float | None = _f(optional(time_), None)
    directory: str | None = _f(optional(path), None)

    def _check(self) -> None:
        if (self.point is None) == (self.at is None):
            raise _Invalid("give exactly one of point and at")


@message("test_failover disk")
class AdminTestFailoverDisk(Wire):
    disk: str = _f(name)
    disk_id: int = _f(disk_id)
    sequence: int = _f(sequence)
    time: float = _f(time_)
    path: str = _f(path)
    format: str = _f(replica_format)
    copy_seconds: float = _f(seconds)
    undo_groups: int = _f(count)
    bytes_undone: int = _f(count)
    seconds: float = _f(seconds)
    consistency: str = _f(consistency)
    tag: str = _f(tag)


@message("test_failover reply")
class AdminTestFailedOver(Wire):
    machine: str = _f(name)
    disks: tuple[AdminTestFailoverDisk, ...] = _f(list_of(nested(AdminTestFailoverDisk)))


@message("test_failover_cleanup")
class AdminTestFailoverCleanup(Wire):
    machine: str = _f(name)


@message("test_failover_cleanup disk")
class AdminCleanupDisk(Wire):
    disk: str = _f(name)  # the process server replaces the master target's disk id by the name
    removed: tuple[str, ...] = _f(list_of(path))


@message("test_failover_cleanup reply")
class AdminTestFailoverCleaned(Wire):
    machine: str = _f(name)
    disks: tuple[AdminCleanupDisk, ...] = _f(list_of(nested(AdminCleanupDisk)))


@message("app_point")
class AdminAppPoint(Wire):
    machine: str = _f(name)
    tag: str = _f(tag, "")


@message("app_point reply")
class AdminAppPointMade(Wire):
    machine: str = _f(name)
    disks: tuple[AppPointDisk, ...] = _f(list_of(nested(AppPointDisk)))
    warnings: tuple[str, ...] = _f(list_of(text, 256))


# ---- enroll -> process server ----------------------------------------------------------------------


@message("ca")
class Ca(Wire):
    pass


@message("ca reply")
class CaCert(Wire):
    ca_pem: str = _f(pem)


@message("enroll")
class Enroll(Wire):
    name: str = _f(name)
    role: str = _f(one_of(*ENROLL_ROLES))
    passphrase: str = _f(passphrase)
    csr: str = _f(pem)
    replace: bool = _f(boolean, False)

    def _check(self) -> None:
        if self.name == "admin":
            raise _Invalid("is reserved for the admin identity", ("name",))


@message("enroll reply")
class Enrolled(Wire):
    cert_pem: str = _f(pem)
    ca_pem: str = _f(pem)


# ---- COMMIT meta ---------------------------------------------------------------------------------------


@message("commit meta")
class CommitMeta(Wire):
    """The JSON meta of a COMMIT record (proto.messages.Commit.meta), as the agent writes it (kind
    initial-complete: time; resync-complete: mode, reason, bytes_differing, time; point: consistency, time,
    and tag and freeze_seconds for an app point) and as the master target's journal keeps it (kind batch,
    and `first`, the group's first sequence).

    `to_wire()` leaves out what is None. The seal of a received COMMIT covers its original bytes: verify
    and store those, never a re-encoding of this object."""

    OMIT_NONE = frozenset(
        {"time", "consistency", "tag", "freeze_seconds", "mode", "reason", "bytes_differing", "first"}
    )
    generation: int = _f(generation)
    kind: str = _f(one_of(*COMMIT_KINDS))
    time: float | None = _f(optional(time_), None)
    consistency: str | None = _f(optional(consistency), None)
    tag: str | None = _f(optional(tag), None)
    freeze_seconds: float | None = _f(optional(seconds), None)
    mode: str | None = _f(optional(resync_mode), None)
    reason: str | None = _f(optional(text), None)
    bytes_differing: int | None = _f(optional(count), None)
    first: int | None = _f(optional(sequence), None)

    def _check(self) -> None:
        if self.kind == "point" and (self.time is None or self.consistency is None):
            raise _Invalid("a point needs a time and a consistency")

    @classmethod
    def from_commit(cls, meta: Any) -> CommitMeta:
        """A peer's COMMIT meta; BadRequest("bad-commit") if invalid."""
        return cls.from_wire(meta, "bad-commit")


# ---- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpSpec:
    op: str
    sender: str  # the HELLO role (proved by the certificate) allowed to send it
    served_by: tuple[str, ...]
    request: type[Wire]
    reply: type[Wire]


_SPECS = (
    # agent -> process server (processserver.server.AgentSession.run)
    OpSpec("disk_open", "agent", ("ps",), DiskOpen, DiskOpened),
    OpSpec("disk_key", "agent", ("ps",), DiskKey, Empty),
    OpSpec("disk_report", "agent", ("ps",), DiskReport, DiskReported),
    OpSpec("resync_begin", "agent", ("ps",), ResyncBegin, ResyncBegun),
    OpSpec("resync_hashes", "agent", ("ps",), ResyncHashes, SealedHashes),
    # master target -> process server (processserver.server.MTSession.run)
    OpSpec("subscribe", "mt", ("ps",), Subscribe, Assignments),
    OpSpec("pull", "mt", ("ps",), Pull, Pulled),
    OpSpec("mt_report", "mt", ("ps",), MTReport, Empty),
    # process server -> master target (mastertarget.daemon.MasterTarget.session, mastertarget.operations)
    OpSpec("check_replica", "ps", ("mt",), CheckReplica, Empty),
    OpSpec("resync_hashes", "ps", ("mt",), RelayResyncHashes, SealedHashes),
    OpSpec("points", "ps", ("mt",), Points, PointList),
    OpSpec("failover", "ps", ("mt",), Failover, FailedOver),
    OpSpec("failover_commit", "ps", ("mt",), FailoverCommit, FailoverCommitted),
    OpSpec("test_failover", "ps", ("mt",), TestFailover, TestFailedOver),
    OpSpec("test_failover_cleanup", "ps", ("mt",), TestFailoverCleanup, TestFailoverCleaned),
    # process server -> agent and master target
    OpSpec("wake", "ps", ("agent", "mt"), Wake, Empty),
    # process server -> agent (agent.daemon.Agent.read_loop)
    OpSpec("app_point", "ps", ("agent",), AppPoint, AppPointMade),
    # admin -> process server (processserver.admin.AdminSession, processserver.recovery.RecoveryAdmin)
    OpSpec("status", "admin", ("ps",), Status, StatusReply),
    OpSpec("machines", "admin", ("ps",), Machines, MachineList),
    OpSpec("protect", "admin", ("ps",), Protect, Protected),
    OpSpec("pause", "admin", ("ps",), Pause, Empty),
    OpSpec("resume", "admin", ("ps",), Resume, Empty),
    OpSpec("resync", "admin", ("ps",), Resync, ResyncRequested),
    OpSpec("points", "admin", ("ps",), AdminPoints, AdminPointList),
    OpSpec("failover", "admin", ("ps",), AdminFailover, AdminFailedOver),
    OpSpec("commit", "admin", ("ps",), AdminCommit, AdminCommitted),
    OpSpec("test_failover", "admin", ("ps",), AdminTestFailover, AdminTestFailedOver),
    OpSpec("test_failover_cleanup", "admin", ("ps",), AdminTestFailoverCleanup, AdminTestFailoverCleaned),
    OpSpec("app_point", "admin", ("ps",), AdminAppPoint, AdminAppPointMade),
    # enroll -> process server (processserver.enroll.Enrollment.session)
    OpSpec("ca", "enroll", ("ps",), Ca, CaCert),
    OpSpec("enroll", "enroll", ("ps",), Enroll, Enrolled),
)

OPS: dict[tuple[str, str], OpSpec] = {(s.op, s.sender): s for s in _SPECS}
OP_NAMES = frozenset(s.op for s in _SPECS)


def parse_request(op: Any, args: Any, role: str, server: str | None = None) -> Wire:
    """The typed request `op` with `args` from a peer whose role is `role`; `server`: our role, if we
    want requests served elsewhere refused too. BadRequest: `unknown-request` (no such op, or not one
    `server` serves), `forbidden` (not one this role may send), `bad-input` (invalid args)."""
    if not isinstance(op, str) or op not in OP_NAMES:
        raise BadRequest("unknown-request", f"unknown request {_show(op)}")
    spec = OPS.get((op, role))
    if spec is None:
        raise BadRequest("forbidden", f"{op}: not a request the {role} role may send")
    if server is not None and server not in spec.served_by:
        raise BadRequest("unknown-request", f"{op}: not a request this {server} serves")
    return spec.request.from_wire(args, "bad-input", op)


def parse_reply(op: str, result: Any, role: str) -> Wire:
    """The typed result of the reply to our request `op`, sent as `role`. BadRequest("bad-reply") if the
    peer's result is invalid; LocalProtocolError if we have no such request (a bug)."""
    spec = OPS.get((op, role))
    if spec is None:
        raise LocalProtocolError("unknown-request", f"no request {op!r} is sent by a {role}")
    return spec.reply.from_wire(result, "bad-reply", f"{op} reply")


# What the daemons use of proto.fields comes through here too: this module is the interface.
__all__ = [
    "BadRequest",
    "CONSISTENCIES",
    "InvalidMessage",
    "MAX_TAG",
    "OPS",
    "REPLICA_FORMATS",
    "RESYNC_MODES",
    "ROLES",
    "CommitMeta",
    "Wire",
    "parse_reply",
    "parse_request",
    "parse_subscribe",
]
