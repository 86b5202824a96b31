"""Requests and replies of a machine's round trip (processserver.roundtrip): the operator's reprotect,
failback and reverse (admin -> process server), and the recovered machine's shutdown step and its undoing
(process server -> agent). Who may send which is in proto.requests' table of ops."""

from __future__ import annotations

from typing import Any

from .agent_requests import AppPointDisk
from .enums import ReplicaFormat
from .fields import (
    MAX_REPLICAS,
    boolean,
    list_of,
    map_of,
    name,
    nested,
    one_of,
    optional,
    path,
    record,
    replica_format,
    seconds,
    short_text,
    tag,
    text,
)
from .wire import Wire, checked, message

LOCATIONS = ("original", "alternate")
FAILBACK_ACTIONS = ("start", "complete", "cancel")
SYNC_MODES = ("before-shutdown", "full")
_DISK_REPLICA = record({"disk": name, "replica": path})


@message("reprotect")
class Reprotect(Wire):
    machine: str = checked(name)  # the machine's original name
    agent: str = checked(name)  # the recovered machine's agent identity
    mt: str = checked(name)  # the master target at the original site
    location: str = checked(one_of(*LOCATIONS), "original")
    format: ReplicaFormat | None = checked(optional(replica_format), None)
    replica_dir: str | None = checked(optional(path), None)
    replicas: dict[str, str] | None = checked(optional(map_of(name, path, MAX_REPLICAS)), None)
    full: bool = checked(boolean, False)
    existing: bool = checked(boolean, False)
    rpo_threshold: float | None = checked(optional(seconds), None)


@message("reprotect reply")
class Reprotected(Wire):
    machine: str = checked(name)
    agent: str = checked(name)
    mt: str = checked(name)
    mode: str = checked(one_of("checksum", "full"))
    disks: tuple[dict[str, Any], ...] = checked(list_of(_DISK_REPLICA))


@message("failback")
class Failback(Wire):
    machine: str = checked(name)
    action: str = checked(one_of(*FAILBACK_ACTIONS), "start")
    sync: str = checked(one_of(*SYNC_MODES), "before-shutdown")


@message("failback reply")
class FailbackDone(Wire):
    machine: str = checked(name)
    phase: str = checked(short_text)
    message: str = checked(text)
    result: dict[str, Any] | None = checked(optional(record({})), None)


@message("reverse")
class Reverse(Wire):
    machine: str = checked(name)


@message("reverse reply")
class Reversed(Wire):
    machine: str = checked(name)
    mt: str = checked(name)
    disks: tuple[dict[str, Any], ...] = checked(list_of(_DISK_REPLICA))


@message("shutdown")
class Shutdown(Wire):
    tag: str = checked(tag, "failback-final")


@message("shutdown reply")
class ShutDown(Wire):
    disks: tuple[AppPointDisk, ...] = checked(list_of(nested(AppPointDisk)))
    warnings: tuple[str, ...] = checked(list_of(text, 256))
    shutdown_script: str | None = checked(optional(path), None)


@message("start_workload")
class StartWorkload(Wire):
    pass


@message("start_workload reply")
class WorkloadStarted(Wire):
    started: bool = checked(boolean)
    reason: str = checked(text)
