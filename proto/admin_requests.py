"""Requests and replies between the admin CLI and the process server: status, machines, protect, pause,
resume, resync, unprotect, forget, and the operator's recovery requests by machine (points, failover,
commit, test_failover, test_failover_cleanup, app_point), which the process server relays by disk to the
master target or the agent (proto.mt_requests, proto.agent_requests). Who may send which is in
proto.requests' table of ops.
"""

from __future__ import annotations

from typing import Any

from .agent_requests import AppPointDisk
from .enums import Consistency, ReplicaFormat
from .fields import (
    ENROLL_ROLES,
    MAX_REPLICAS,
    boolean,
    consistency,
    count,
    disk_id,
    list_of,
    map_of,
    name,
    nested,
    nonnegative,
    one_of,
    optional,
    path,
    point_choice,
    record,
    replica_format,
    replica_state,
    replication_state,
    seconds,
    sequence,
    short_text,
    stored_time,
    system_uuid,
    tag,
    text,
    time_,
)
from .mt_requests import FailoverInfo, PointInfo
from .states import Replication
from .wire import Invalid, Wire, checked, message

# What the CLI reads from each status disk (admin.cli.format_status, cmd_pause). Lenient on purpose: text
# rather than names, so a disk registered before names were checked can still be shown (and repaired).
_STATUS_DISK = record(
    {
        "machine": text,
        "disk": text,
        "replication": replication_state,
        "disk_state": replica_state,
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
    machine: str | None = checked(optional(name), None)


@message("status reply")
class StatusReply(Wire):
    disks: tuple[dict[str, Any], ...] = checked(list_of(_STATUS_DISK))
    cache_bytes: int = checked(count)
    cache_quota: int = checked(count)
    master_targets: tuple[str, ...] = checked(list_of(name))
    rpo_threshold: float = checked(seconds)
    # Machines on a round trip (processserver.roundtrip): direction, phase, history. Free-form beyond these.
    roundtrips: tuple[dict[str, Any], ...] = checked(
        list_of(record({"name": name, "direction": text, "phase": text, "history": list_of(record({}))})), ())


@message("machines")
class Machines(Wire):
    pass


@message("machine")
class MachineInfo(Wire):
    """An enrolled machine, and what it said of itself when it last connected (proto.requests.About):
    None until it has (or from a process server older than that request)."""

    name: str = checked(name)
    role: str = checked(one_of(*ENROLL_ROLES))
    enrolled_at: float = checked(time_)
    system_uuid: str | None = checked(optional(system_uuid), None)
    hostname: str | None = checked(optional(short_text), None)
    reported_at: float | None = checked(optional(time_), None)


@message("machines reply")
class MachineList(Wire):
    machines: tuple[MachineInfo, ...] = checked(list_of(nested(MachineInfo)))


@message("protect")
class Protect(Wire):
    machine: str = checked(name)
    mt: str = checked(name)
    format: ReplicaFormat = checked(replica_format, ReplicaFormat.VMDK)
    replica_dir: str | None = checked(optional(path), None)
    replicas: dict[str, str] | None = checked(optional(map_of(name, path, MAX_REPLICAS)), None)  # disk name -> path
    existing: bool = checked(boolean, False)
    datastore: str | None = checked(optional(short_text), None)  # a master target VM's: where the VMDKs go


@message("protected disk")
class ProtectedDisk(Wire):
    OMIT_NONE = frozenset({"vmdk"})
    disk: str = checked(name)
    replica: str = checked(path)
    vmdk: str | None = checked(optional(short_text), None)  # in vSphere: the VMDK behind the device replica


@message("protect reply")
class Protected(Wire):
    disks: tuple[ProtectedDisk, ...] = checked(list_of(nested(ProtectedDisk)))


@message("pause")
class Pause(Wire):
    machine: str = checked(name)


@message("resume")
class Resume(Wire):
    machine: str = checked(name)


@message("resync")
class Resync(Wire):
    machine: str = checked(name)
    full: bool = checked(boolean, False)
    disk: str | None = checked(optional(name), None)


@message("resync reply")
class ResyncRequested(Wire):
    disks: tuple[str, ...] = checked(list_of(name))


@message("points")
class AdminPoints(Wire):
    machine: str = checked(name)


@message("points disk")
class AdminPointsDisk(Wire):
    """A master target's points reply with the disk's name as `disk` and its id as `disk_id`."""

    disk: str = checked(name)
    disk_id: int = checked(disk_id)
    points: tuple[PointInfo, ...] = checked(list_of(nested(PointInfo)))
    journal_bytes: int = checked(count)
    applied_seq: int = checked(sequence)
    alert: str = checked(text)
    failover: FailoverInfo | None = checked(optional(nested(FailoverInfo)))


@message("points reply")
class AdminPointList(Wire):
    OMIT_NONE = frozenset({"roundtrip"})

    machine: str = checked(name)
    disks: tuple[AdminPointsDisk, ...] = checked(list_of(nested(AdminPointsDisk)))
    # The machine's round trip (direction, phase, which identity's points these are), if it is on one.
    roundtrip: dict[str, Any] | None = checked(optional(record({"direction": text, "phase": text, "active": name})),
                                               None)


@message("failover")
class AdminFailover(Wire):
    machine: str = checked(name)
    point: str | None = checked(optional(point_choice), None)
    at: float | None = checked(optional(time_), None)

    def _check(self) -> None:
        if (self.point is None) == (self.at is None):
            raise Invalid("give exactly one of point and at")


@message("failover disk")
class AdminFailoverDisk(Wire):
    disk: str = checked(name)
    disk_id: int = checked(disk_id)
    sequence: int = checked(sequence)
    time: float = checked(time_)
    replica: str = checked(path)
    format: ReplicaFormat = checked(replica_format)
    bytes_written: int = checked(count)
    seconds: float = checked(seconds)
    consistency: Consistency = checked(consistency)
    tag: str = checked(tag)


@message("failover reply")
class AdminFailedOver(Wire):
    machine: str = checked(name)
    disks: tuple[AdminFailoverDisk, ...] = checked(list_of(nested(AdminFailoverDisk)))


@message("commit")
class AdminCommit(Wire):
    machine: str = checked(name)
    vm: str | None = checked(optional(one_of("alternate", "original", "none")), None)  # vSphere: where disks go
    vm_name: str | None = checked(optional(name), None)
    power_on: bool = checked(boolean, False)


@message("commit disk")
class AdminCommitDisk(Wire):
    disk: str = checked(name)
    disk_id: int = checked(disk_id)
    sequence: int = checked(sequence)
    time: float = checked(stored_time)
    replica: str = checked(path)


@message("commit reply")
class AdminCommitted(Wire):
    OMIT_NONE = frozenset({"vm"})
    machine: str = checked(name)
    disks: tuple[AdminCommitDisk, ...] = checked(list_of(nested(AdminCommitDisk)))
    vm: dict[str, Any] | None = checked(optional(record({"vm_uuid": short_text, "what": text,
                                                         "files": list_of(short_text, 100)})), None)


@message("test_failover")
class AdminTestFailover(Wire):
    machine: str = checked(name)
    point: str | None = checked(optional(point_choice), None)
    at: float | None = checked(optional(time_), None)
    directory: str | None = checked(optional(path), None)

    def _check(self) -> None:
        if (self.point is None) == (self.at is None):
            raise Invalid("give exactly one of point and at")


@message("test_failover disk")
class AdminTestFailoverDisk(Wire):
    disk: str = checked(name)
    disk_id: int = checked(disk_id)
    sequence: int = checked(sequence)
    time: float = checked(time_)
    path: str = checked(path)
    format: ReplicaFormat = checked(replica_format)
    copy_seconds: float = checked(seconds)
    undo_groups: int = checked(count)
    bytes_undone: int = checked(count)
    seconds: float = checked(seconds)
    consistency: Consistency = checked(consistency)
    tag: str = checked(tag)
    replication: Replication = checked(replication_state)  # the disk's, now: replicating on, or failed over


@message("test_failover reply")
class AdminTestFailedOver(Wire):
    machine: str = checked(name)
    disks: tuple[AdminTestFailoverDisk, ...] = checked(list_of(nested(AdminTestFailoverDisk)))


@message("test_failover_cleanup")
class AdminTestFailoverCleanup(Wire):
    machine: str = checked(name)


@message("test_failover_cleanup disk")
class AdminCleanupDisk(Wire):
    disk: str = checked(name)  # the process server replaces the master target's disk id by the name
    removed: tuple[str, ...] = checked(list_of(path))


@message("test_failover_cleanup reply")
class AdminTestFailoverCleaned(Wire):
    machine: str = checked(name)
    disks: tuple[AdminCleanupDisk, ...] = checked(list_of(nested(AdminCleanupDisk)))


@message("app_point")
class AdminAppPoint(Wire):
    machine: str = checked(name)
    tag: str = checked(tag, "")


@message("app_point reply")
class AdminAppPointMade(Wire):
    machine: str = checked(name)
    disks: tuple[AppPointDisk, ...] = checked(list_of(nested(AppPointDisk)))
    warnings: tuple[str, ...] = checked(list_of(text, 256))


@message("unprotect")
class Unprotect(Wire):
    machine: str = checked(name)
    delete_replicas: bool = checked(boolean, False)


@message("unprotected disk")
class UnprotectedDisk(Wire):
    OMIT_NONE = frozenset({"vmdk"})
    disk: str = checked(name)
    mt: str = checked(name)
    replica: str | None = checked(optional(path))  # None: the master target had no state for it
    journal: str | None = checked(optional(path), None)  # where the kept retention journal is now
    removed: tuple[str, ...] = checked(list_of(path), ())  # what --delete-replicas deleted (nothing without it)
    vmdk: str | None = checked(optional(text), None)  # in vSphere: what became of the replica VMDK


@message("unprotect reply")
class Unprotected(Wire):
    machine: str = checked(name)
    disks: tuple[UnprotectedDisk, ...] = checked(list_of(nested(UnprotectedDisk)))


@message("forget")
class Forget(Wire):
    machine: str = checked(name)
