"""Requests and replies between the master target and the process server (master target -> process
server: subscribe, pull, mt_report; process server -> master target: check_replica, find_device, the
relayed resync_hashes, points, failover, failover_commit, test_failover, test_failover_cleanup, release). Who may send
which is in proto.requests' table of ops.
"""

from __future__ import annotations

import base64
from typing import Any

from .agent_requests import HashQuery
from .enums import Consistency, ErrorCode, ReplicaFormat
from .fields import (
    MAX_DISK_ID,
    MAX_ITEMS,
    MAX_REPLICAS,
    boolean,
    consistency,
    count,
    device_wait,
    disk_id,
    disk_key,
    file_name,
    generation,
    is_int,
    list_of,
    map_of,
    name,
    nested,
    optional,
    path,
    replica_format,
    seconds,
    sequence,
    short_text,
    size,
    step_op,
    stored_time,
    tag,
    text,
    time_,
    uuid_text,
    wrapped_key,
)
from .point import Point
from .wire import BadRequest, Invalid, Wire, checked, message, path_text

# ---- master target -> process server ---------------------------------------------------------------


@message("subscribe")
class Subscribe(Wire):
    pass


@message("assignment")
class Assignment(Wire):
    """One disk assigned to the master target (processserver.mtsession.MTSession.subscribe)."""

    disk: int = checked(disk_id)
    machine: str = checked(name)
    name: str = checked(name)
    uid: str = checked(uuid_text)
    size: int = checked(size)
    replica_path: str = checked(path)
    replica_format: ReplicaFormat = checked(replica_format)
    wrapped_key: str = checked(wrapped_key)
    seed: bool = checked(boolean, False)

    @property
    def wrapped_key_bytes(self) -> bytes:
        return base64.b64decode(self.wrapped_key)


@message("subscribe reply")
class Assignments(Wire):
    disks: tuple[Assignment, ...] = checked(list_of(nested(Assignment)))
    cache_dir: str | None = checked(optional(path), None)
    host: str | None = checked(optional(short_text), None)


def parse_subscribe(result: Any) -> tuple[Assignments, list[tuple[int | None, str]]]:
    """The subscribe reply with every valid assignment, and (disk id or None, reason) for each invalid one:
    one poisoned disk must fail alone, not stop the master target from starting the others. Raises
    BadRequest("bad-reply") only if the reply itself is not a subscribe reply."""
    disks = result.get("disks") if isinstance(result, dict) else None
    if not isinstance(disks, list) or len(disks) > MAX_ITEMS:
        raise BadRequest(ErrorCode.BAD_REPLY, f"subscribe reply: disks must be a list of at most {MAX_ITEMS} items")
    good, bad = [], []
    for i, d in enumerate(disks):
        try:
            good.append(Assignment._parse(d))
        except Invalid as exc:
            did = d.get("disk") if isinstance(d, dict) else None
            did = did if is_int(did) and 0 < did <= MAX_DISK_ID else None
            where = path_text((f"disks[{i}]", *exc.path))
            bad.append((did, f"subscribe reply: {where} {exc.problem}"))
    return Assignments.from_wire({**result, "disks": good}, ErrorCode.BAD_REPLY), bad


@message("pull")
class Pull(Wire):
    disk: int = checked(disk_id)
    applied_seq: int = checked(sequence)


@message("pull reply")
class Pulled(Wire):
    received_seq: int = checked(sequence)
    skip_to: int = checked(sequence, 0)


@message("failover step")
class FailoverStep(Wire):
    op: int = checked(step_op)
    src: int = checked(sequence)
    dst: int = checked(sequence)


@message("failover state")
class FailoverInfo(Wire):
    """mastertarget.recovery.FailoverState as vars(), with `point` and `problem` (upkeep.point_list)."""

    OMIT_NONE = frozenset({"point", "problem"})

    latest: int = checked(sequence)
    at: int = checked(sequence)
    target: int = checked(sequence)
    point_time: float = checked(stored_time)
    started_at: float = checked(stored_time)
    committed: bool = checked(boolean)
    step: FailoverStep | None = checked(optional(nested(FailoverStep)))
    # Where the replica is settled at a listed point (None while a move is unfinished), and why the last
    # move broke off: status names a failover point only from `point`.
    point: int | None = checked(optional(sequence), None)
    problem: str | None = checked(optional(text), None)


@message("disk history")
class DiskHistory(Wire):
    """One disk's entry of the master target's periodic report (mastertarget.daemon.MasterTarget.upkeep).
    `error`: why the master target cannot serve the disk (read by the process server; optional)."""

    OMIT_NONE = frozenset({"error"})
    # A disk the master target cannot open is reported with its `error` only.
    points: int = checked(count, 0)
    oldest_point: float | None = checked(optional(time_), None)
    newest_point: float | None = checked(optional(time_), None)
    journal_bytes: int = checked(count, 0)
    alert: str = checked(text, "")
    failed_over: FailoverInfo | None = checked(optional(nested(FailoverInfo)), None)
    error: str | None = checked(optional(text), None)

    @classmethod
    def of(cls, listed: PointList, error: str | None = None) -> DiskHistory:
        """The summary of a disk's `points` reply: what the master target reports every few seconds, and
        what the process server notes at once after a failover or commit (so status is never stale)."""
        p = listed.points
        return cls(len(p), p[0].time if p else None, p[-1].time if p else None, listed.journal_bytes,
                   listed.alert, listed.failover, error)


@message("mt_report")
class MTReport(Wire):
    disks: dict[str, DiskHistory] = checked(map_of(disk_key, nested(DiskHistory)))


# ---- process server -> master target ---------------------------------------------------------------


@message("resync_hashes")
class RelayResyncHashes(Wire):
    """The process server's relay of the agent's query (proto.agent_requests.ResyncHashes) to the master
    target, with the disk's size (it may have grown)."""

    disk: int = checked(disk_id)
    generation: int = checked(generation)
    query: HashQuery = checked(nested(HashQuery))
    size: int | None = checked(optional(size), None)


@message("check_replica")
class CheckReplica(Wire):
    path: str = checked(path)
    format: ReplicaFormat = checked(replica_format)
    size: int = checked(size)
    existing: bool = checked(boolean, False)


@message("find_device")
class FindDevice(Wire):
    """The process server to a master target that runs in a VM: a replica disk was attached to that VM in
    vSphere; find its block device in the guest by its by-id `name` (with disk.EnableUUID=TRUE Linux names
    it after the disk's UUID: `wwn-0x6000c29...`), waiting up to `wait` seconds for it to show, and check
    it has `size` bytes and is used by nobody. Only a name, never a path: the master target looks it up in
    its own by-id directory (mastertarget.guestdisk)."""

    name: str = checked(file_name)
    size: int = checked(size)
    wait: float = checked(device_wait)


@message("find_device reply")
class FoundDevice(Wire):
    """The by-id link itself, not the /dev/sdX it points to today: that name may change at the next boot."""

    path: str = checked(path)


@message("points")
class Points(Wire):
    disk: int = checked(disk_id)


@message("recovery point")
class PointInfo(Wire):
    """A listed recovery point: the wire form of proto.point.Point in the `points` reply, with what going
    back to it costs (`history_bytes`: the undo bytes newer than it) and without its generation."""

    sequence: int = checked(sequence)
    time: float = checked(time_)
    consistency: Consistency = checked(consistency)
    tag: str = checked(tag)
    history_bytes: int = checked(count)

    @classmethod
    def listed(cls, p: Point, history_bytes: int) -> PointInfo:
        return cls(p.sequence, p.time, p.consistency, p.tag, history_bytes)


@message("points reply")
class PointList(Wire):
    """mastertarget.upkeep.point_list"""

    disk: int = checked(disk_id)
    points: tuple[PointInfo, ...] = checked(list_of(nested(PointInfo)))
    journal_bytes: int = checked(count)
    applied_seq: int = checked(sequence)
    alert: str = checked(text)
    failover: FailoverInfo | None = checked(optional(nested(FailoverInfo)))


@message("failover")
class Failover(Wire):
    disk: int = checked(disk_id)
    sequence: int = checked(sequence)


@message("failover reply")
class FailedOver(Wire):
    disk: int = checked(disk_id)
    sequence: int = checked(sequence)
    time: float = checked(time_)
    replica: str = checked(path)
    format: ReplicaFormat = checked(replica_format)
    bytes_written: int = checked(count)
    seconds: float = checked(seconds)


@message("failover_commit")
class FailoverCommit(Wire):
    disk: int = checked(disk_id)


@message("failover_commit reply")
class FailoverCommitted(Wire):
    disk: int = checked(disk_id)
    sequence: int = checked(sequence)
    time: float = checked(stored_time)
    replica: str = checked(path)


@message("test_failover")
class TestFailover(Wire):
    __test__ = False  # not a pytest test class
    disk: int = checked(disk_id)
    sequence: int = checked(sequence)
    directory: str | None = checked(optional(path), None)


@message("test_failover reply")
class TestFailedOver(Wire):
    __test__ = False
    disk: int = checked(disk_id)
    sequence: int = checked(sequence)
    time: float = checked(time_)
    path: str = checked(path)
    format: ReplicaFormat = checked(replica_format)
    copy_seconds: float = checked(seconds)
    undo_groups: int = checked(count)
    bytes_undone: int = checked(count)
    seconds: float = checked(seconds)


@message("test_failover_cleanup")
class TestFailoverCleanup(Wire):
    __test__ = False
    disk: int = checked(disk_id)


@message("test_failover_cleanup reply")
class TestFailoverCleaned(Wire):
    __test__ = False
    disk: int = checked(disk_id)
    removed: tuple[str, ...] = checked(list_of(path))


@message("release")
class Release(Wire):
    """The process server to a master target: these disks are no longer protected (standby unprotect):
    stop applying, forget their state, and delete their replicas and retention journals only if `delete`."""

    disks: tuple[int, ...] = checked(list_of(disk_id, MAX_REPLICAS, 1))
    delete: bool = checked(boolean, False)


@message("released disk")
class ReleasedDisk(Wire):
    disk: int = checked(disk_id)
    replica: str | None = checked(optional(path))  # None: the master target had no state for it
    journal: str | None = checked(optional(path), None)  # where the kept retention journal is now
    removed: tuple[str, ...] = checked(list_of(path), ())


@message("release reply")
class Released(Wire):
    disks: tuple[ReleasedDisk, ...] = checked(list_of(nested(ReleasedDisk)))
