"""The closed sets of words both ends must agree on: marker kinds, consistencies, replica formats, the
error codes of replies and the reason codes of GOODBYE and REJECT.

Each is a `StrEnum` whose values are exactly the strings on the wire, so the JSON does not change: a member
*is* a str (`MarkerKind.POINT == "point"`, `json.dumps` writes `"point"`), and a typed request or reply
(proto.requests) holds the member after decoding while its `to_wire()` gives back the plain string.

`ErrorCode` lists the codes a REPLY carries when `ok` is false (and a `BadRequest` carries): the CLI maps
them to exit codes (plumbing.errors.REPLY_CODES). `GoodbyeCode` lists why a connection ends: the `code` of
a GOODBYE, and of every proto.errors.ProtocolError but those about a request (proto.wire's BadRequest and
InvalidMessage carry an ErrorCode). `RejectCode` lists why a master target refused a record: the `code` of
a REJECT. A REPLY, GOODBYE or REJECT decoded from a peer keeps its code as text (proto.messages): a newer
peer may send a code this release does not know, and the message still says what happened. Senders use the
members; receivers compare the text with them.
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
    MISSING = "missing"  # a disk or replica that must exist does not (an original disk, a replica to seed from)
    IN_USE = "in-use"  # a disk to be written is mounted or held by another program
    # the state of things
    REFUSED = "refused"  # not in this state (failed over, committed...)
    BUSY = "busy"  # the same operation is already running
    UNREACHABLE = "unreachable"  # the daemon that must do it is not connected or did not answer
    FAILED = "failed"  # it was tried and failed (the message says why), or a bug
    # enrollment and identity
    NOT_ENROLLED = "not-enrolled"
    BAD_PASSPHRASE = "bad-passphrase"
    RATE_LIMITED = "rate-limited"


class GoodbyeCode(StrEnum):
    """Why a connection ends: the `code` of the GOODBYE a daemon sends before closing (plumbing.link
    Link.close), and the code of every proto.errors.ProtocolError (a RemoteProtocolError's is what the
    daemon sends when the peer broke the protocol: plumbing.link.stay_connected, processserver.server).

    Some words are also ErrorCode words ("forbidden", "not-enrolled", "bad-marker", "bad-reply",
    "bad-input", "unknown-request"). They are members here too, with equal values, rather than borrowed
    from ErrorCode: a StrEnum cannot share members with another, each set stays whole on its own (a reader
    of GOODBYE codes finds every one here), and `Link.close` takes this one type. Being equal strings,
    `GoodbyeCode.FORBIDDEN == ErrorCode.FORBIDDEN`, so a peer's code compares right with either; and a
    BadRequest (whose code is an ErrorCode) that ends a session is said goodbye with the same word.
    """

    # the process server refuses the connection (processserver.server) or what comes on it
    NOT_ENROLLED = "not-enrolled"  # no client certificate, and the HELLO is not an enrollment's
    FORBIDDEN = "forbidden"  # certificate not current, a role that cannot connect here, another machine's disk,
    # or a master target's ack for a disk not assigned to it
    TIMEOUT = "timeout"  # an enrollment connection sent no request in time (processserver.enroll)
    REPLACED = "replaced"  # a newer connection from the same master target took this one's place
    UNPROTECTED = "unprotected"  # the operator unprotected the agent's machine: it reconnects to learn which disks
    NOT_PROTECTED = "not-protected"  # an agent sent a record for a disk that is not protected yet
    SEQUENCE_GAP = "sequence-gap"  # an agent's record is not the next of its disk: it sends again from there
    INTERNAL_ERROR = "internal-error"  # the process server failed to store a record: the agent sends again
    BAD_ACK = "bad-ack"  # a master target acked a sequence other than the next one to apply
    BAD_MARKER = "bad-marker"  # an agent's MARKER meta is invalid (or a MARKER frame is malformed)
    BAD_REPLY = "bad-reply"  # the process server's answer to a master target's `subscribe` is invalid
    # BadRequest words (an ErrorCode's): a peer's invalid request that ended a session instead of a REPLY
    BAD_INPUT = "bad-input"
    UNKNOWN_REQUEST = "unknown-request"
    # the peer broke the protocol (proto.connection, proto.frames, proto.messages: RemoteProtocolError)
    UNEXPECTED_MESSAGE = "unexpected-message"  # a message this state or this role does not take
    BAD_VERSION = "bad-version"  # no protocol version both ends speak
    TRUNCATED = "truncated"  # the connection ended inside a frame
    BAD_MAGIC = "bad-magic"  # not a standby frame
    BAD_HEADER_CHECKSUM = "bad-header-checksum"  # a frame header was corrupted
    BAD_PAYLOAD_CHECKSUM = "bad-payload-checksum"  # a frame payload was corrupted
    OVERSIZED = "oversized"  # a frame or control message over its limit
    BAD_TYPE = "bad-type"  # an unknown frame type
    BAD_MESSAGE = "bad-message"  # a control message's JSON is not a valid message of its type
    BAD_BATCH = "bad-batch"  # a BATCH frame is malformed
    # never sent in a GOODBYE: a stored record read back (process server cache, master target segments)
    BAD_RECORD = "bad-record"  # a damaged or torn record in a segment file (proto.frames.iter_frames)
    # never sent in a GOODBYE: our own mistake (LocalProtocolError, a bug), which Link turns into LinkClosed
    # and plumbing.serve answers in a REPLY if a request's handler met it
    ILLEGAL_SEND = "illegal-send"  # a message this state or role may not send
    AFTER_EOF = "after-eof"  # data handed to a connection after its end of stream
    BAD_HEADER = "bad-header"  # a frame header field out of range
    BAD_EXTENT = "bad-extent"  # an extent not aligned, too long, or with a wrong payload
    BAD_HELLO = "bad-hello"  # a HELLO without a valid role or versions
    BAD_REQUEST = "bad-request"  # a REQUEST without an op, with a negative id or args not a dict
    BAD_DISK_UID = "bad-disk-uid"  # a disk uid that is not 16 bytes (proto.envelope)
    BAD_KEY = "bad-key"  # a data key that is not 32 bytes (proto.envelope)
    ILLEGAL_TRANSITION = "illegal-transition"  # a replication state move the table forbids (proto.states)


class RejectCode(StrEnum):
    """Why a master target refused one record of a disk: the `code` of a REJECT (mastertarget.worker,
    mastertarget.daemon). The process server quarantines the disk on AUTHENTICATION_FAILED and BAD_MARKER
    (retrying the same cached record cannot help) and retries the others (processserver.mtsession)."""

    AUTHENTICATION_FAILED = "authentication-failed"  # the payload failed authentication: nothing written
    BAD_MARKER = "bad-marker"  # the MARKER's meta is invalid: nothing recorded (same word as ErrorCode's)
    WRITE_FAILED = "write-failed"  # writing the replica or the journal failed: the group rolled back
    FAILED = "failed"  # verifying or applying failed unexpectedly (a bug, logged with its traceback)
    REPLICA_ERROR = "replica-error"  # sequence 0: the replica cannot be opened, resized or used
