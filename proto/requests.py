"""Typed control requests and replies: every value a peer sends in a REQUEST's args or a REPLY's result,
and in a MARKER's meta, is checked here before anything stores or acts on it (DESIGN promise 9).

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
  by disk), `resync_hashes` as the agent's query and the process server's relay of it (with the disk
  size), and `about` from an agent and from a master target. So `OPS` is keyed by (op, sender role).

Decoding refuses unknown keys, missing keys (keys with a default may be left out: today's senders
leave them out or send null), wrong types (a bool is not an int, an int is not a string) and values out
of range. Nothing here raises anything but `BadRequest` on a peer's input, whatever JSON it is: any other
exception out of `from_wire`, `parse_request` or `parse_reply` is a bug (the tests fuzz this).

Two error kinds, as everywhere in proto/: `InvalidMessage` (a LocalProtocolError) when *we* build an
invalid message, `BadRequest` (a RemoteProtocolError) when a *peer* sent one.

Where things are
----------------
This module holds the table of ops and the two parse functions. The dataclasses live by conversation:
proto.agent_requests (agent <-> process server), proto.mt_requests (master target <-> process server),
proto.admin_requests (admin -> process server), proto.enroll_requests (enrollment) and proto.marker_meta
(a MARKER's meta). The checks of single values (bounds, names, times, paths) are in proto.fields, the
`Wire` base class and the two errors in proto.wire, the closed sets of words (marker kind, consistency,
replica format, error code) in proto.enums.

This module also re-exports all of those dataclasses, errors, enums and constants (`__all__`): the
daemons and the tests import them from here (`from standby.proto.requests import BadRequest, MarkerMeta`),
as they did when everything lived in this one module, and need to know only this one name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .admin_requests import (
    AdminAppPoint,
    AdminAppPointMade,
    AdminCleanupDisk,
    AdminCommit,
    AdminCommitDisk,
    AdminCommitted,
    AdminFailedOver,
    AdminFailover,
    AdminFailoverDisk,
    AdminPointList,
    AdminPoints,
    AdminPointsDisk,
    AdminTestFailedOver,
    AdminTestFailover,
    AdminTestFailoverCleaned,
    AdminTestFailoverCleanup,
    AdminTestFailoverDisk,
    Forget,
    MachineInfo,
    MachineList,
    Machines,
    Pause,
    Protect,
    Protected,
    ProtectedDisk,
    Resume,
    Resync,
    ResyncRequested,
    Status,
    StatusReply,
    Unprotect,
    Unprotected,
    UnprotectedDisk,
)
from .agent_requests import (
    AgentReport,
    AppPoint,
    AppPointDisk,
    AppPointMade,
    DiskKey,
    DiskOpen,
    DiskOpened,
    DiskReport,
    DiskReported,
    HashQuery,
    LastAppPoint,
    ResyncBegin,
    ResyncBegun,
    ResyncHashes,
    ResyncProgress,
    ResyncWanted,
    SealedHashes,
)
from .enroll_requests import Ca, CaCert, Enroll, Enrolled
from .enums import Consistency, ErrorCode, MarkerKind, ReplicaFormat
from .errors import LocalProtocolError
from .fields import (
    CONSISTENCIES,
    ENROLL_ROLES,
    MARKER_KINDS,
    MAX_DISK_ID,
    MAX_HASH_PARENTS,
    MAX_ITEMS,
    MAX_REPLICAS,
    MAX_TAG,
    REPLICA_FORMATS,
    RESYNC_MODES,
    RESYNC_PHASES,
    ROLES,
    short_text,
    system_uuid,
)
from .marker_meta import MarkerMeta
from .mt_requests import (
    Assignment,
    Assignments,
    CheckReplica,
    DiskHistory,
    FailedOver,
    Failover,
    FailoverCommit,
    FailoverCommitted,
    FailoverInfo,
    FailoverStep,
    FindDevice,
    FoundDevice,
    MTReport,
    PointInfo,
    PointList,
    Points,
    Pull,
    Pulled,
    RelayResyncHashes,
    Release,
    Released,
    ReleasedDisk,
    Subscribe,
    TestFailedOver,
    TestFailover,
    TestFailoverCleaned,
    TestFailoverCleanup,
    parse_subscribe,
)
from .trip_requests import (
    Failback,
    FailbackDone,
    Reprotect,
    Reprotected,
    Reverse,
    Reversed,
    ShutDown,
    Shutdown,
    StartWorkload,
    WorkloadStarted,
)
from .vsphere_requests import (
    MtCheck,
    MtChecked,
    VCenterAdd,
    VCenterAdded,
    VCenterList,
    VCenterListAsk,
    VCenterRemove,
    VCenterVmList,
    VCenterVms,
)
from .wire import BadRequest, InvalidMessage, Wire, checked, message, show


@message("reply")
class Empty(Wire):
    """The result of requests that answer nothing but ok: `{}`."""


@message("wake")
class Wake(Wire):
    """The process server to an agent or a master target: there is work for you now (no arguments)."""


@message("about")
class About(Wire):
    """An agent or a master target to the process server, once per connection: which machine it runs on.
    `system_uuid` (SMBIOS, or "" when unknown) is how a standby machine is matched to its VM in vCenter
    (a VM's BIOS UUID); `hostname` is for people. Stored in the registry's machines table."""

    system_uuid: str = checked(system_uuid)
    hostname: str = checked(short_text)


# ---- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpSpec:
    op: str
    sender: str  # the HELLO role (proved by the certificate) allowed to send it
    served_by: tuple[str, ...]
    request: type[Wire]
    reply: type[Wire]


_SPECS = (
    # agent -> process server (processserver.agentsession.AgentSession.run)
    OpSpec("disk_open", "agent", ("ps",), DiskOpen, DiskOpened),
    OpSpec("disk_key", "agent", ("ps",), DiskKey, Empty),
    OpSpec("disk_report", "agent", ("ps",), DiskReport, DiskReported),
    OpSpec("resync_begin", "agent", ("ps",), ResyncBegin, ResyncBegun),
    OpSpec("resync_hashes", "agent", ("ps",), ResyncHashes, SealedHashes),
    # agent and master target -> process server, once per connection (plumbing.about)
    OpSpec("about", "agent", ("ps",), About, Empty),
    OpSpec("about", "mt", ("ps",), About, Empty),
    # master target -> process server (processserver.mtsession.MTSession.run)
    OpSpec("subscribe", "mt", ("ps",), Subscribe, Assignments),
    OpSpec("pull", "mt", ("ps",), Pull, Pulled),
    OpSpec("mt_report", "mt", ("ps",), MTReport, Empty),
    # process server -> master target (mastertarget.daemon.MasterTarget.session, mastertarget.operations)
    OpSpec("check_replica", "ps", ("mt",), CheckReplica, Empty),
    OpSpec("find_device", "ps", ("mt",), FindDevice, FoundDevice),
    OpSpec("resync_hashes", "ps", ("mt",), RelayResyncHashes, SealedHashes),
    OpSpec("points", "ps", ("mt",), Points, PointList),
    OpSpec("failover", "ps", ("mt",), Failover, FailedOver),
    OpSpec("failover_commit", "ps", ("mt",), FailoverCommit, FailoverCommitted),
    OpSpec("test_failover", "ps", ("mt",), TestFailover, TestFailedOver),
    OpSpec("test_failover_cleanup", "ps", ("mt",), TestFailoverCleanup, TestFailoverCleaned),
    OpSpec("release", "ps", ("mt",), Release, Released),
    # process server -> agent and master target
    OpSpec("wake", "ps", ("agent", "mt"), Wake, Empty),
    # process server -> agent (agent.daemon.Agent.read_loop)
    OpSpec("app_point", "ps", ("agent",), AppPoint, AppPointMade),
    OpSpec("shutdown", "ps", ("agent",), Shutdown, ShutDown),
    OpSpec("start_workload", "ps", ("agent",), StartWorkload, WorkloadStarted),
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
    OpSpec("unprotect", "admin", ("ps",), Unprotect, Unprotected),
    OpSpec("forget", "admin", ("ps",), Forget, Empty),
    # admin -> process server: the round trip (processserver.roundtrip)
    OpSpec("reprotect", "admin", ("ps",), Reprotect, Reprotected),
    OpSpec("failback", "admin", ("ps",), Failback, FailbackDone),
    OpSpec("reverse", "admin", ("ps",), Reverse, Reversed),
    # admin -> process server: vCenter (processserver.vcenteradmin)
    OpSpec("vcenter_add", "admin", ("ps",), VCenterAdd, VCenterAdded),
    OpSpec("vcenter_list", "admin", ("ps",), VCenterListAsk, VCenterList),
    OpSpec("vcenter_remove", "admin", ("ps",), VCenterRemove, Empty),
    OpSpec("vcenter_vms", "admin", ("ps",), VCenterVms, VCenterVmList),
    OpSpec("mt_check", "admin", ("ps",), MtCheck, MtChecked),
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
        raise BadRequest(ErrorCode.UNKNOWN_REQUEST, f"unknown request {show(op)}")
    spec = OPS.get((op, role))
    if spec is None:
        raise BadRequest(ErrorCode.FORBIDDEN, f"{op}: not a request the {role} role may send")
    if server is not None and server not in spec.served_by:
        raise BadRequest(ErrorCode.UNKNOWN_REQUEST, f"{op}: not a request this {server} serves")
    return spec.request.from_wire(args, ErrorCode.BAD_INPUT, op)


def parse_reply(op: str, result: Any, role: str) -> Wire:
    """The typed result of the reply to our request `op`, sent as `role`. BadRequest("bad-reply") if the
    peer's result is invalid; LocalProtocolError if we have no such request (a bug)."""
    spec = OPS.get((op, role))
    if spec is None:
        raise LocalProtocolError(ErrorCode.UNKNOWN_REQUEST, f"no request {op!r} is sent by a {role}")
    return spec.reply.from_wire(result, ErrorCode.BAD_REPLY, f"{op} reply")


__all__ = [
    "Failback", "FailbackDone", "Reprotect", "Reprotected", "Reverse", "Reversed", "ShutDown", "Shutdown",
    "StartWorkload", "WorkloadStarted", "MtCheck", "MtChecked", "VCenterAdd", "VCenterAdded", "VCenterList",
    "VCenterListAsk", "VCenterRemove", "VCenterVmList", "VCenterVms",
    "About", "FindDevice", "FoundDevice",
    "Empty", "OP_NAMES", "OPS", "OpSpec", "Wake", "parse_reply", "parse_request", "BadRequest", "InvalidMessage",
    "Wire", "message", "MarkerKind", "Consistency", "ErrorCode", "ReplicaFormat", "MARKER_KINDS", "CONSISTENCIES",
    "ENROLL_ROLES", "MAX_DISK_ID", "MAX_HASH_PARENTS", "MAX_ITEMS", "MAX_REPLICAS", "MAX_TAG", "REPLICA_FORMATS",
    "RESYNC_MODES", "RESYNC_PHASES", "ROLES", "DiskOpen", "ResyncWanted", "DiskOpened", "DiskKey", "ResyncProgress",
    "LastAppPoint", "AgentReport", "DiskReport", "DiskReported", "ResyncBegin", "ResyncBegun", "HashQuery",
    "ResyncHashes", "SealedHashes", "AppPoint", "AppPointDisk", "AppPointMade", "Subscribe", "Assignment",
    "Assignments", "parse_subscribe", "Pull", "Pulled", "FailoverStep", "FailoverInfo", "DiskHistory", "MTReport",
    "RelayResyncHashes", "CheckReplica", "Points", "PointInfo", "PointList", "Failover", "FailedOver",
    "FailoverCommit", "FailoverCommitted", "TestFailover", "TestFailedOver", "TestFailoverCleanup",
    "TestFailoverCleaned", "Status", "StatusReply", "Machines", "MachineInfo", "MachineList", "Protect",
    "ProtectedDisk", "Protected", "Pause", "Resume", "Resync", "ResyncRequested", "AdminPoints", "AdminPointsDisk",
    "AdminPointList", "AdminFailover", "AdminFailoverDisk", "AdminFailedOver", "AdminCommit", "AdminCommitDisk",
    "AdminCommitted", "AdminTestFailover", "AdminTestFailoverDisk", "AdminTestFailedOver",
    "AdminTestFailoverCleanup", "AdminCleanupDisk", "AdminTestFailoverCleaned", "AdminAppPoint",
    "AdminAppPointMade", "Unprotect", "UnprotectedDisk", "Unprotected", "Forget", "Release", "ReleasedDisk",
    "Released", "Ca", "CaCert", "Enroll", "Enrolled", "MarkerMeta",
]
