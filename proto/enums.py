"""The closed sets of words both ends must agree on: marker kinds, consistencies, replica formats and the
error codes of replies.

Each is a `StrEnum` whose values are exactly the strings on the wire, so the JSON does not change: a member
*is* a str (`MarkerKind.POINT == "point"`, `json.dumps` writes `"point"`), and a typed request or reply
(proto.requests) holds the member after decoding while its `to_wire()` gives back the plain string.

`ErrorCode` lists the codes a REPLY carries when `ok` is false (and a `BadRequest` carries): the CLI maps
them to exit codes (plumbing.errors.REPLY_CODES). A REPLY decoded from a peer keeps its code as text
(proto.messages.Reply): a newer peer may send a code this release does not know, and the message still
says what happened. GOODBYE and REJECT reasons are not listed here.
"""

from __future__ import annotations

from enum import StrEnum


class MarkerKind(StrEnum):
    """What a MARKER record marks (proto.requests.MarkerMeta.kind)."""

    INITIAL_COMPLETE = "initial-complete"  # the initial replication of a generation is complete
    RESYNC_COMPLETE = "resync-complete"  # a resync reached its end: the replica equals the source again
    POINT = "point"  # a recovery point (its consistency says which kind)
    BATCH = "batch"  # the master target journal's own: a group of applied batches


class Consistency(StrEnum):
    """What a recovery point promises (DESIGN promise 4)."""

    CRASH = "crash-consistent"  # the replica equals the source disk at one instant
    APP = "app-consistent"  # ... and that instant was taken frozen, with the pre/post scripts run


class ReplicaFormat(StrEnum):
    """How a master target stores a replica disk (mastertarget.replicas opens each)."""

    VMDK = "vmdk"
    VMDK_THICK = "vmdk-thick"
    VMDK_MONOLITHIC_FLAT = "vmdk-monolithic-flat"
    VMDK_SPARSE = "vmdk-sparse"
    RAW = "raw"
    DEVICE = "device"


class ErrorCode(StrEnum):
    """Why a request failed: the `code` of an error REPLY, stable for scripts and for the CLI's exit code."""

    # the request itself (proto.requests.BadRequest)
    BAD_INPUT = "bad-input"  # an argument is invalid (or the operation's input is: a path, a format...)
    UNKNOWN_REQUEST = "unknown-request"  # no such op, or not one this peer serves
    FORBIDDEN = "forbidden"  # not an op this role may send, or not this identity's disk
    BAD_REPLY = "bad-reply"  # the peer's reply to our request is invalid
    BAD_MARKER = "bad-marker"  # a MARKER's meta is invalid
    # what the request names
    UNKNOWN_MACHINE = "unknown-machine"
    UNKNOWN_DISK = "unknown-disk"
    UNKNOWN_POINT = "unknown-point"
    REPLICA_EXISTS = "replica-exists"
    SIZE_MISMATCH = "size-mismatch"
    # the state of things
    REFUSED = "refused"  # not in this state (failed over, committed...)
    BUSY = "busy"  # the same operation is already running
    UNREACHABLE = "unreachable"  # the daemon that must do it is not connected or did not answer
    FAILED = "failed"  # it was tried and failed (the message says why), or a bug
    # enrollment and identity
    NOT_ENROLLED = "not-enrolled"
    BAD_PASSPHRASE = "bad-passphrase"
    RATE_LIMITED = "rate-limited"
