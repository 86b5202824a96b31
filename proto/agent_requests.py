"""Requests and replies between the agent and the process server (agent -> process server: disk_open,
disk_key, disk_report, resync_begin, resync_hashes; process server -> agent: app_point), and the resync
hash query the master target answers. Who may send which is in proto.requests' table of ops.
"""

from __future__ import annotations

import base64

from .enums import Consistency
from .fields import (
    MAX_HASH_PARENTS,
    RESYNC_PHASES,
    boolean,
    consistency,
    count,
    disk_id,
    fraction,
    generation,
    hash_level,
    hash_node,
    hash_nonce,
    list_of,
    name,
    nested,
    nonnegative,
    one_of,
    optional,
    pair,
    path,
    pem,
    replication_state,
    resync_mode,
    sealed_hashes,
    seconds,
    sequence,
    short_text,
    size,
    span,
    tag,
    text,
    time_,
    uuid_text,
    wrapped_key,
)
from .states import Replication
from .wire import Invalid, Wire, checked, message

# ---- agent -> process server ------------------------------------------------------------------------


@message("disk_open")
class DiskOpen(Wire):
    name: str = checked(name)
    path: str = checked(path)
    size: int = checked(size)
    uid: str = checked(uuid_text)


@message("resync request")
class ResyncWanted(Wire):
    """A resync the operator or the process server asked for, not yet started (registry resync_request)."""

    mode: str = checked(resync_mode)
    reason: str = checked(text)


@message("disk_open reply")
class DiskOpened(Wire):
    OMIT_NONE = frozenset({"mt_cert"})  # sent only when key_needed
    disk: int = checked(disk_id)
    replication: Replication = checked(replication_state)
    protected: bool = checked(boolean)
    generation: int = checked(generation)
    next_sequence: int = checked(sequence)
    cursor: int = checked(count)
    initial_complete: bool = checked(boolean)
    key_needed: bool = checked(boolean)
    seed: bool = checked(boolean, False)
    resync: ResyncWanted | None = checked(optional(nested(ResyncWanted)), None)
    mt_cert: str | None = checked(optional(pem), None)


@message("disk_key")
class DiskKey(Wire):
    disk: int = checked(disk_id)
    wrapped_key: str = checked(wrapped_key)

    @property
    def wrapped_key_bytes(self) -> bytes:
        return base64.b64decode(self.wrapped_key)


@message("resync progress")
class ResyncProgress(Wire):
    """agent.resync.Progress.report()"""

    mode: str = checked(resync_mode)
    reason: str = checked(text)
    phase: str = checked(one_of(*RESYNC_PHASES))
    progress: float = checked(fraction)
    eta_seconds: float | None = checked(optional(nonnegative))
    bytes_differing: int = checked(count)
    bytes_shipped: int = checked(count)
    hash_bytes: int = checked(count)
    elapsed: float = checked(span)


@message("last app-consistent point")
class LastAppPoint(Wire):
    time: float = checked(time_)
    freeze_seconds: float | None = checked(optional(seconds))
    tag: str = checked(tag)


@message("agent report")
class AgentReport(Wire):
    """What only the agent knows about a disk, for status (agent.daemon.Agent.report)."""

    OMIT_NONE = frozenset({"error"})

    tracker: str | None = checked(optional(short_text))
    tracking_lost: str | None = checked(optional(text))
    dirty_bytes: int | None = checked(optional(count))
    tracker_cpu_seconds: float = checked(seconds)
    epochs: int = checked(count)
    points: int = checked(count)
    inconsistent_epochs: int = checked(count)
    last_inconsistent_reason: str = checked(text)
    bytes_shipped: int = checked(count)
    app_points: int = checked(count)
    last_app_point: LastAppPoint | None = checked(optional(nested(LastAppPoint)))
    resync: ResyncProgress | None = checked(optional(nested(ResyncProgress)))
    resync_pending: tuple[str, str] | None = checked(optional(pair(resync_mode, text)))  # (mode, reason)
    error: str | None = checked(optional(text), None)  # why this disk's replication failed (supervision)


@message("disk_report")
class DiskReport(Wire):
    disk: int = checked(disk_id)
    report: AgentReport = checked(nested(AgentReport))


@message("disk_report reply")
class DiskReported(Wire):
    resync: ResyncWanted | None = checked(optional(nested(ResyncWanted)))


@message("resync_begin")
class ResyncBegin(Wire):
    disk: int = checked(disk_id)
    generation: int = checked(generation)
    mode: str = checked(resync_mode)
    reason: str = checked(text)


@message("resync_begin reply")
class ResyncBegun(Wire):
    generation: int = checked(generation)


@message("hash query")
class HashQuery(Wire):
    """A resync hash query (agent.resync.query): the top level (level and parents null) or the children at
    `level` of `parents`. The master target seals its answer over this object's canonical JSON, so it is
    relayed exactly as the agent wrote it."""

    level: int | None = checked(optional(hash_level))
    parents: tuple[int, ...] | None = checked(optional(list_of(hash_node, MAX_HASH_PARENTS, 1)))
    nonce: str = checked(hash_nonce)

    def _check(self) -> None:
        if (self.level is None) != (self.parents is None):
            raise Invalid("level and parents must both be null (the top level) or both be given")


@message("resync_hashes")
class ResyncHashes(Wire):
    """The agent's query (agent -> process server); the process server relays it to the master target
    (proto.mt_requests.RelayResyncHashes), which answers with the sealed hashes."""

    disk: int = checked(disk_id)
    generation: int = checked(generation)
    query: HashQuery = checked(nested(HashQuery))


@message("resync_hashes reply")
class SealedHashes(Wire):
    sealed: str = checked(sealed_hashes)


# ---- process server -> agent -----------------------------------------------------------------------


@message("app_point")
class AppPoint(Wire):
    tag: str = checked(tag, "")


@message("app_point disk")
class AppPointDisk(Wire):
    """One disk's line of an app_point reply (agent.appoint.AppPoints._entry); sequence None: no point."""

    disk: str = checked(name)
    sequence: int | None = checked(optional(sequence))
    consistency: Consistency | None = checked(optional(consistency))
    time: float | None = checked(optional(time_))
    freeze_seconds: float | None = checked(optional(seconds))
    reason: str = checked(text)


@message("app_point reply")
class AppPointMade(Wire):
    disks: tuple[AppPointDisk, ...] = checked(list_of(nested(AppPointDisk)))
    warnings: tuple[str, ...] = checked(list_of(text, 256))

