"""Typed messages. Each is a small frozen, slotted dataclass validated in its constructor, so an invalid
message cannot exist; `encode()` turns it into one frame, `decode_message()` turns a frame back.

Frame types (the `type` byte of the header) and what they carry:

    1 HELLO     JSON  client -> server: versions it speaks, its role
    2 WELCOME   JSON  server -> client: the chosen version, the identity the server saw
    3 GOODBYE   JSON  either way: an error with a reason code; the sender closes after it
    4 REQUEST   JSON  a control request (enroll, open a disk, admin operations) with a request id
    5 REPLY     JSON  the answer to a request id: ok + result, or an error code and message
    6 BATCH     binary  one batch of a disk's stream: extent table + sealed extent payloads
    7 MARKER    binary  a sealed marker in a disk's stream (e.g. initial replication complete)
    8 ACK       JSON  "stored durably" (agent <- ps) or "applied and synced" (ps <- mt), by sequence
    9 BUSY      JSON  the process server's cache is over quota: not stored, retry after a delay
   10 REJECT    JSON  mt -> ps: a record failed verification or could not be written; not applied

BATCH payload layout::

    batch header 20 B : generation u32 | kind u8 | flags u8 | pad u16 | extent count u32 | cursor u64
    extent table 20 B each : kind u8 | pad 3 | offset u64 | length u32 | stored length u32
    seal 28 B  : AES-GCM tag over batch header + extent table (envelope.seal_batch)
    payloads   : the sealed data extents, back to back (zero extents have none)

MARKER payload: meta length u32 | meta JSON | seal 28 B over the meta JSON.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from .enums import GoodbyeCode
from .errors import LocalProtocolError, RemoteProtocolError
from .frames import HEADER_SIZE, MAX_CONTROL_PAYLOAD, FrameHeader, encode_frame, encode_frame_parts

SECTOR = 512
# One batch carries at most this much *data* (zero extents are free). Big enough for efficient
# sequential initial replication, small enough that a batch verifies and applies in well under a second.
MAX_BATCH_LOGICAL = 16 * 1024 * 1024
MAX_EXTENTS = MAX_BATCH_LOGICAL // SECTOR + 1
SEAL_SIZE = 28
# Records a sender keeps in flight per disk ahead of the acks (the agent to the process server, the process
# server to a master target): enough to keep the network and the receiver's fsync busy, bounded so each
# side's memory stays ~ WINDOW x MAX_BATCH_LOGICAL per disk and a receiver's queue per disk is bounded.
WINDOW = 8
ROLES = ("agent", "mt", "admin", "ps", "enroll")


class FrameType(IntEnum):
    HELLO = 1
    WELCOME = 2
    GOODBYE = 3
    REQUEST = 4
    REPLY = 5
    BATCH = 6
    MARKER = 7
    ACK = 8
    BUSY = 9
    REJECT = 10


class ExtentKind(IntEnum):
    DATA = 1
    ZERO = 2


class BatchKind(IntEnum):
    INITIAL = 0  # initial replication: a contiguous range [previous cursor, cursor)
    DELTA = 1
    RESYNC = 2


@dataclass(frozen=True, slots=True)
class Extent:
    kind: ExtentKind
    offset: int
    length: int
    payload: bytes | memoryview = b""

    def __post_init__(self) -> None:
        if self.offset < 0 or self.offset % SECTOR or self.length <= 0 or self.length % SECTOR:
            raise LocalProtocolError(
                GoodbyeCode.BAD_EXTENT, f"extent {self.offset}+{self.length} is not sector-aligned"
            )
        if self.length >= 2**32 or self.offset >= 2**64:
            raise LocalProtocolError(GoodbyeCode.BAD_EXTENT, "extent longer than 4 GiB or offset out of range")
        if self.kind == ExtentKind.ZERO and len(self.payload):
            raise LocalProtocolError(GoodbyeCode.BAD_EXTENT, "a zero extent carries no payload")
        if self.kind == ExtentKind.DATA and (self.length > MAX_BATCH_LOGICAL or not len(self.payload)):
            raise LocalProtocolError(GoodbyeCode.BAD_EXTENT, "a data extent needs a payload and at most 16 MiB")


_BATCH_HEAD = struct.Struct(">IBBxxIQ")
_EXTENT = struct.Struct(">BxxxQII")


@dataclass(frozen=True, slots=True)
class Batch:
    disk: int  # the process server's number for the disk
    sequence: int
    generation: int
    kind: BatchKind
    cursor: int  # INITIAL: the disk offset up to which this batch completes the copy
    extents: tuple[Extent, ...]
    seal: bytes
    flags: int = 0
    # The frame, when it was encoded where the batch was built (`Batch.framed`); the extents' payloads are
    # then views into it. Not an argument: a batch made with dataclasses.replace encodes its own fields.
    wire: bytes | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < len(self.extents) <= MAX_EXTENTS:
            raise LocalProtocolError(GoodbyeCode.BAD_BATCH, f"a batch holds 1..{MAX_EXTENTS} extents")
        if len(self.seal) != SEAL_SIZE:
            raise LocalProtocolError(GoodbyeCode.BAD_BATCH, "batch seal has the wrong size")
        if not (0 <= self.generation < 2**32 and 0 <= self.cursor < 2**64 and 0 <= self.flags < 256):
            raise LocalProtocolError(GoodbyeCode.BAD_BATCH, "generation, cursor or flags out of range")
        end = -1
        data = 0
        for e in self.extents:
            if e.offset < end:
                raise LocalProtocolError(GoodbyeCode.BAD_BATCH, "extents must be sorted and must not overlap")
            end = e.offset + e.length
            if e.kind == ExtentKind.DATA:
                data += e.length
        if data > MAX_BATCH_LOGICAL:
            raise LocalProtocolError(
                GoodbyeCode.BAD_BATCH, f"batch carries {data} data bytes, limit {MAX_BATCH_LOGICAL}"
            )

    @staticmethod
    def table(generation: int, kind: int, flags: int, cursor: int, extents: list[tuple[int, int, int, int]]) -> bytes:
        """The bytes the batch seal covers: batch header + extent table. `extents`: (kind, offset, length, stored)."""
        parts = [_BATCH_HEAD.pack(generation, kind, flags, len(extents), cursor)]
        parts += [_EXTENT.pack(k, o, n, s) for k, o, n, s in extents]
        return b"".join(parts)

    def table_bytes(self) -> bytes:
        return Batch.table(
            self.generation,
            self.kind,
            self.flags,
            self.cursor,
            [(e.kind, e.offset, e.length, len(e.payload)) for e in self.extents],
        )

    @property
    def data_bytes(self) -> int:
        return sum(e.length for e in self.extents if e.kind == ExtentKind.DATA)

    @property
    def logical_bytes(self) -> int:
        return sum(e.length for e in self.extents)

    @property
    def stored_bytes(self) -> int:
        return sum(len(e.payload) for e in self.extents)

    def encode(self) -> bytes:
        if self.wire is not None:
            return self.wire
        return encode_frame_parts(FrameType.BATCH, self.disk, self.sequence,
                                  [self.table_bytes(), self.seal, *(e.payload for e in self.extents)])

    @staticmethod
    def framed(disk: int, sequence: int, generation: int, kind: BatchKind, cursor: int,
               extents: list[tuple[ExtentKind, int, int, bytes | bytearray | memoryview]], table: bytes,
               seal: bytes) -> Batch:
        """A batch encoded at once, for the sender that built it in a worker thread: the event loop then
        only writes the frame, and the batch holds one copy of its sealed data (its extents' payloads are
        views into the frame) instead of the sealed extents and, while it is written, the frame as well.
        `table` and `seal`: Batch.table of these extents and its seal (the caller sealed it)."""
        payloads = [payload for _, _, _, payload in extents]
        wire = encode_frame_parts(FrameType.BATCH, disk, sequence, [table, seal, *payloads])
        view = memoryview(wire)
        pos = HEADER_SIZE + len(table) + len(seal)
        out = []
        for (k, offset, length, _), payload in zip(extents, payloads, strict=True):
            n = len(payload)
            out.append(Extent(k, offset, length, view[pos : pos + n]))
            pos += n
        batch = Batch(disk, sequence, generation, kind, cursor, tuple(out), seal)
        object.__setattr__(batch, "wire", wire)  # frozen: set once, here, from the fields just checked
        return batch


def _decode_batch(h: FrameHeader, p: memoryview) -> Batch:
    if len(p) < _BATCH_HEAD.size + SEAL_SIZE:
        raise RemoteProtocolError(GoodbyeCode.BAD_BATCH, "batch payload too short")
    generation, kind, flags, count, cursor = _BATCH_HEAD.unpack(p[: _BATCH_HEAD.size])
    if not 0 < count <= MAX_EXTENTS:
        raise RemoteProtocolError(GoodbyeCode.BAD_BATCH, f"batch announces {count} extents")
    try:
        bkind = BatchKind(kind)
    except ValueError:
        raise RemoteProtocolError(GoodbyeCode.BAD_BATCH, f"unknown batch kind {kind}") from None
    pos = _BATCH_HEAD.size
    table_end = pos + count * _EXTENT.size
    if len(p) < table_end + SEAL_SIZE:
        raise RemoteProtocolError(GoodbyeCode.BAD_BATCH, "batch extent table truncated")
    entries = [_EXTENT.unpack(p[pos + i * _EXTENT.size : pos + (i + 1) * _EXTENT.size]) for i in range(count)]
    seal = bytes(p[table_end : table_end + SEAL_SIZE])
    data_pos = table_end + SEAL_SIZE
    if data_pos + sum(e[3] for e in entries) != len(p):
        raise RemoteProtocolError(GoodbyeCode.BAD_BATCH, "batch payload length does not match its extent table")
    extents = []
    try:
        for k, offset, length, stored in entries:
            extents.append(Extent(ExtentKind(k), offset, length, p[data_pos : data_pos + stored]))
            data_pos += stored
        return Batch(h.disk, h.sequence, generation, bkind, cursor, tuple(extents), seal, flags)
    except (LocalProtocolError, ValueError) as exc:
        raise RemoteProtocolError(GoodbyeCode.BAD_BATCH, f"invalid batch: {exc}") from None


_META_LEN = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Marker:
    """A sealed marker in a disk's stream, ordered and acknowledged like a batch.

    `meta` always holds `generation` and `kind` (a proto.enums.MarkerKind word); proto.requests.MarkerMeta
    checks the rest.
    """

    disk: int
    sequence: int
    meta: dict[str, Any]
    seal: bytes

    def __post_init__(self) -> None:
        if type(self.meta.get("generation")) is not int or not isinstance(self.meta.get("kind"), str):
            raise LocalProtocolError(GoodbyeCode.BAD_MARKER, "marker meta needs an integer generation and a kind")
        if len(self.seal) != SEAL_SIZE:
            raise LocalProtocolError(GoodbyeCode.BAD_MARKER, "marker seal has the wrong size")

    @property
    def generation(self) -> int:
        return int(self.meta["generation"])

    def meta_bytes(self) -> bytes:
        return meta_bytes(self.meta)

    def encode(self) -> bytes:
        m = self.meta_bytes()
        return encode_frame(FrameType.MARKER, self.disk, self.sequence, _META_LEN.pack(len(m)) + m + self.seal)


def meta_bytes(meta: dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no spaces): what a marker seal covers."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def _decode_marker(h: FrameHeader, p: memoryview) -> Marker:
    if len(p) < 4 + SEAL_SIZE:
        raise RemoteProtocolError(GoodbyeCode.BAD_MARKER, "marker payload too short")
    (n,) = _META_LEN.unpack(p[:4])
    if 4 + n + SEAL_SIZE != len(p):
        raise RemoteProtocolError(GoodbyeCode.BAD_MARKER, "marker payload length mismatch")
    try:
        meta = json.loads(bytes(p[4 : 4 + n]))
        if not isinstance(meta, dict):
            raise ValueError("meta is not an object")
        return Marker(h.disk, h.sequence, meta, bytes(p[4 + n :]))
    except (ValueError, RecursionError, LocalProtocolError) as exc:
        raise RemoteProtocolError(GoodbyeCode.BAD_MARKER, f"invalid marker: {exc}") from None


# ---- JSON control messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    role: str
    versions: tuple[int, ...] = (1,)
    software: str = "standby"

    def __post_init__(self) -> None:
        if self.role not in ROLES or not self.versions:
            raise LocalProtocolError(GoodbyeCode.BAD_HELLO, f"invalid role {self.role!r} or no versions")


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    name: str
    role: str


@dataclass(frozen=True, slots=True)
class Goodbye:
    # A proto.enums.GoodbyeCode word. Kept as text: a newer peer may send a code we do not know.
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.op or not isinstance(self.args, dict) or self.id < 0:
            raise LocalProtocolError(GoodbyeCode.BAD_REQUEST, "a request needs an op, a non-negative id and dict args")


@dataclass(frozen=True, slots=True)
class Reply:
    id: int
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    # When not ok: a proto.enums.ErrorCode word. Kept as text: a newer peer may send a code we do not know.
    code: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    disk: int
    sequence: int
    generation: int


@dataclass(frozen=True, slots=True)
class Busy:
    disk: int
    sequence: int
    retry_after: float
    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    disk: int
    sequence: int
    # A proto.enums.RejectCode word. Kept as text: a newer peer may send a code we do not know.
    code: str
    reason: str


Message = Hello | Welcome | Goodbye | Request | Reply | Batch | Marker | Ack | Busy | Reject

# (class, frame type, fields carried as disk/sequence in the header rather than in the JSON)
_JSON_TYPES: dict[type, FrameType] = {
    Hello: FrameType.HELLO,
    Welcome: FrameType.WELCOME,
    Goodbye: FrameType.GOODBYE,
    Request: FrameType.REQUEST,
    Reply: FrameType.REPLY,
    Ack: FrameType.ACK,
    Busy: FrameType.BUSY,
    Reject: FrameType.REJECT,
}
_BY_TYPE = {t: c for c, t in _JSON_TYPES.items()}
_HEADER_FIELDS = ("disk", "sequence")


def encode(msg: Message) -> bytes:
    if isinstance(msg, Batch | Marker):
        return msg.encode()
    ftype = _JSON_TYPES.get(type(msg))
    if ftype is None:
        raise LocalProtocolError(GoodbyeCode.BAD_MESSAGE, f"cannot encode {type(msg).__name__}")
    body = {k: getattr(msg, k) for k in msg.__slots__ if k not in _HEADER_FIELDS}  # type: ignore[union-attr]
    payload = json.dumps(body, separators=(",", ":")).encode()
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise LocalProtocolError(GoodbyeCode.OVERSIZED, "control message over 1 MiB")
    return encode_frame(ftype, getattr(msg, "disk", 0), getattr(msg, "sequence", 0), payload)


def decode_message(h: FrameHeader, payload: memoryview) -> Message:
    """Build the typed message of a checked frame. Raises RemoteProtocolError for anything invalid."""
    if h.type == FrameType.BATCH:
        return _decode_batch(h, payload)
    if h.type == FrameType.MARKER:
        return _decode_marker(h, payload)
    cls = _BY_TYPE.get(h.type)
    if cls is None:
        raise RemoteProtocolError(GoodbyeCode.BAD_TYPE, f"unknown frame type {h.type}")
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise RemoteProtocolError(GoodbyeCode.OVERSIZED, "control message over 1 MiB")
    try:
        body = json.loads(bytes(payload))
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        if "disk" in cls.__slots__:
            body["disk"], body["sequence"] = h.disk, h.sequence
        if cls is Hello:
            body["versions"] = tuple(body.get("versions", ()))
        msg = cls(**body)
        _check_types(msg)
        return msg
    except (ValueError, TypeError, RecursionError, LocalProtocolError) as exc:
        raise RemoteProtocolError(GoodbyeCode.BAD_MESSAGE, f"invalid {cls.__name__}: {exc}") from None


def _check_types(msg: Message) -> None:
    """JSON gives us any type; refuse a message whose fields are not what the dataclass declares."""
    expect = {int: int, float: (int, float), str: str, bool: bool}
    for name, f in msg.__dataclass_fields__.items():  # type: ignore[union-attr]
        v = getattr(msg, name)
        t = (
            f.type
            if isinstance(f.type, type)
            else {"int": int, "str": str, "bool": bool, "float": float}.get(str(f.type))
        )
        if t in expect and not isinstance(v, expect[t]) or (t in (int, float) and isinstance(v, bool)):
            raise ValueError(f"field {name} has the wrong type")
        if name == "args" or name == "result":
            if not isinstance(v, dict):
                raise ValueError(f"field {name} must be an object")
        if name == "versions" and not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError("versions must be integers")
