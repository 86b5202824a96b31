"""Frame and record codec: the fixed header every byte on the wire and in the cache starts with.

Layout (big-endian), 36 bytes, then `length` bytes of payload::

    0       4     5      6       8            12                20         24                 32       36
    +-------+-----+------+-------+------------+-----------------+----------+------------------+--------+
    | magic | ver | type | flags | disk u32   | sequence u64    | len u32  | payload xxh64    | hdr    |
    | STBY  | u8  | u8   | u16   | (disk id)  | (per disk)      |          | (u64)            | xxh32  |
    +-------+-----+------+-------+------------+-----------------+----------+------------------+--------+

The header checksum (xxh32 over bytes 0..31) lets a reader trust `len` before it buffers the payload, so
a corrupted length cannot make us wait for (or allocate) gigabytes. The payload checksum makes every
frame self-verifying, which is why the process-server cache and the master target's retention journal store
frames byte for byte as records: a torn or corrupted record is found on read (`scan_records`), and what
follows the last good one is classified by one rule (`classify_tail`, below). Integrity against
*tampering* is the envelope's job (AES-GCM), not this checksum's.

Versions: 1 — the only one so far. A reader rejects any other version with a clear error.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

from .enums import GoodbyeCode
from .errors import LocalProtocolError, RemoteProtocolError

MAGIC = b"STBY"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

_HEAD = struct.Struct(">4sBBHIQIQ")  # everything the header checksum covers
_CHECK = struct.Struct(">I")
HEADER_SIZE = _HEAD.size + _CHECK.size  # 36

# A batch carries at most MAX_BATCH_LOGICAL bytes of disk data (see messages.MAX_BATCH_LOGICAL = 16 MiB).
# zstd's worst-case expansion is well under 1 %, AES-GCM adds 28 bytes per extent and the extent table
# 40 bytes per extent, so 32 MiB bounds a batch frame with room to spare — and bounds the memory one
# connection can make us buffer.
MAX_PAYLOAD = 32 * 1024 * 1024
# Control messages are small JSON documents; 1 MiB is generous and keeps a hostile peer from making us
# parse huge JSON.
MAX_CONTROL_PAYLOAD = 1024 * 1024

MAX_DISK = 2**32 - 1
MAX_SEQUENCE = 2**64 - 1


@dataclass(frozen=True, slots=True)
class FrameHeader:
    version: int
    type: int
    flags: int
    disk: int
    sequence: int
    length: int
    payload_hash: int


def encode_frame(ftype: int, disk: int, sequence: int, payload: bytes | memoryview, flags: int = 0) -> bytes:
    """Return header + payload as one bytes object."""
    return encode_frame_of(ftype, disk, sequence, [payload], flags)


def encode_frame_of(ftype: int, disk: int, sequence: int, parts: list[bytes | memoryview], flags: int = 0) -> bytes:
    """Return header + the payload made of `parts` back to back, as one bytes object: the payload is
    copied once (into the frame), not joined first (a journal record's payload is up to 16 MiB)."""
    length = sum(len(p) for p in parts)
    if length > MAX_PAYLOAD:
        raise LocalProtocolError(
            GoodbyeCode.OVERSIZED, f"payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        )
    if not (0 <= disk <= MAX_DISK and 0 <= sequence <= MAX_SEQUENCE and 0 <= ftype <= 255 and 0 <= flags <= 0xFFFF):
        raise LocalProtocolError(GoodbyeCode.BAD_HEADER, "disk, sequence, type or flags out of range")
    if len(parts) == 1:
        phash = xxhash.xxh64_intdigest(parts[0])
    else:
        h = xxhash.xxh64()
        for p in parts:
            h.update(p)
        phash = h.intdigest()
    head = _HEAD.pack(MAGIC, VERSION, ftype, flags, disk, sequence, length, phash)
    return b"".join((head, _CHECK.pack(xxhash.xxh32_intdigest(head)), *parts))


def decode_header(buf: bytes | memoryview) -> FrameHeader:
    """Parse and check a 36-byte header, in a fixed order: magic, version, checksum, length."""
    if len(buf) < HEADER_SIZE:
        raise RemoteProtocolError(GoodbyeCode.TRUNCATED, f"header needs {HEADER_SIZE} bytes, got {len(buf)}")
    head = bytes(buf[: _HEAD.size])
    magic, version, ftype, flags, disk, sequence, length, phash = _HEAD.unpack(head)
    if magic != MAGIC:
        raise RemoteProtocolError(GoodbyeCode.BAD_MAGIC, f"not a standby frame (magic {magic!r})")
    if version not in SUPPORTED_VERSIONS:
        raise RemoteProtocolError(
            GoodbyeCode.BAD_VERSION, f"frame version {version} is not supported (supported: {SUPPORTED_VERSIONS})"
        )
    (check,) = _CHECK.unpack(bytes(buf[_HEAD.size : HEADER_SIZE]))
    if check != xxhash.xxh32_intdigest(head):
        raise RemoteProtocolError(GoodbyeCode.BAD_HEADER_CHECKSUM, "frame header checksum mismatch (corrupted header)")
    if length > MAX_PAYLOAD:
        raise RemoteProtocolError(GoodbyeCode.OVERSIZED, f"frame announces {length} bytes, limit is {MAX_PAYLOAD}")
    return FrameHeader(version, ftype, flags, disk, sequence, length, phash)


def check_payload(header: FrameHeader, payload: bytes | memoryview) -> None:
    if xxhash.xxh64_intdigest(payload) != header.payload_hash:
        raise RemoteProtocolError(
            GoodbyeCode.BAD_PAYLOAD_CHECKSUM, "frame payload checksum mismatch (corrupted payload)"
        )


@dataclass(frozen=True, slots=True)
class Record:
    """One frame read back from storage: where it starts and ends in the file, and its parts."""

    offset: int
    end: int
    header: FrameHeader
    payload: memoryview


def scan_records(buf: bytes | memoryview, start: int = 0) -> tuple[list[Record], int, str | None]:
    """Read consecutive records from `buf` (a whole segment file).

    Returns (records, good_end, problem): `good_end` is the offset just after the last intact record and
    `problem` is None if the buffer ended exactly there, else a short description of what follows it (a
    torn write at the tail, or corruption). Callers truncate a torn tail of the segment they were
    appending to, and refuse to continue past corruption anywhere else.
    """
    mv = memoryview(buf)
    pos = start
    out: list[Record] = []
    while pos < len(mv):
        if len(mv) - pos < HEADER_SIZE:
            return out, pos, f"torn record header at offset {pos}"
        try:
            header = decode_header(mv[pos : pos + HEADER_SIZE])
        except RemoteProtocolError as exc:
            return out, pos, f"bad record at offset {pos}: {exc}"
        end = pos + HEADER_SIZE + header.length
        if end > len(mv):
            return out, pos, f"torn record at offset {pos} ({end - len(mv)} bytes missing)"
        payload = mv[pos + HEADER_SIZE : end]
        try:
            check_payload(header, payload)
        except RemoteProtocolError as exc:
            return out, pos, f"bad record at offset {pos}: {exc}"
        out.append(Record(pos, end, header, payload))
        pos = end
    return out, pos, None


# -- the torn-tail rule ---------------------------------------------------------------------------------
#
# Both segment logs (the process server's cache, the master target's retention journal and redo log) append
# records to the newest segment only, and fsync before anything is acknowledged or relied on. A crash in the
# middle of an append therefore tears at most the *last* record of the *newest* segment, and tears it in
# one of two ways: fewer than HEADER_SIZE bytes of it reached the file, or its header did and the record
# it announces reaches (or passes) the end of the file — its payload is short, or the file system extended
# the file before the payload's blocks were written, so a record ending exactly at the end of the file and
# failing its payload checksum is torn too. That is a *torn tail*: nobody was told it was durable, and it is
# cut off (durably) before anything is appended after it.
#
# Anything else after the last good record is *damage*: a header that does not decode (magic, version,
# header checksum), a complete record that fails its checksum with more bytes after it, a torn record in an
# older segment, or — the cache's extra condition (a damaged acknowledged last record cut off as torn once
# made the replica wait for it for ever) — a torn record whose sequence may have been acknowledged. Damage
# is never cut off and never skipped: the journal refuses to start, the cache keeps the intact records
# before it and sets the rest aside (quarantine) for a resync. Skipping it would lose acknowledged data.

CLEAN = "clean"
TORN = "torn"
DAMAGE = "damage"


@dataclass(frozen=True, slots=True)
class Tail:
    """What follows the last good record of a segment: CLEAN (nothing), TORN (cut it off) or DAMAGE."""

    verdict: str  # CLEAN, TORN or DAMAGE
    reason: str | None = None

    @property
    def torn(self) -> bool:
        return self.verdict == TORN

    @property
    def damaged(self) -> bool:
        return self.verdict == DAMAGE


def classify_tail(
    after: bytes | memoryview, rest: int, problem: str | None = None, *, newest: bool = True,
    acknowledged: bool = False,
) -> Tail:
    """Classify the `rest` bytes that follow a segment's last good record by the torn-tail rule above.

    `after`: the first of those bytes (HEADER_SIZE of them are enough; fewer if fewer follow). `problem`:
    what the scan found there (the reason given back; a default is made up without it). `newest`: the
    segment is the one appends go to. `acknowledged`: the record after the last good one may have been
    acknowledged (the cache's received sequence reaches it). No I/O: the caller reads the bytes.
    """
    if rest <= 0:
        return Tail(CLEAN)
    reason = problem or f"{rest} bytes after the last good record"
    if rest < HEADER_SIZE:
        shape = True  # a header cut short
    else:
        try:
            header = decode_header(after[:HEADER_SIZE])
        except RemoteProtocolError:
            return Tail(DAMAGE, reason)
        shape = HEADER_SIZE + header.length >= rest
    if shape and newest and not acknowledged:
        return Tail(TORN, reason)
    return Tail(DAMAGE, reason)


def scan_segment(buf: bytes | memoryview, *, newest: bool = True) -> tuple[list[Record], int, Tail]:
    """`scan_records` over a whole segment, and what follows its last good record (`classify_tail`)."""
    records, good_end, problem = scan_records(buf)
    mv = memoryview(buf)
    return records, good_end, classify_tail(mv[good_end : good_end + HEADER_SIZE], len(mv) - good_end, problem,
                                            newest=newest)


def iter_frames(buf: bytes | memoryview) -> Iterator[tuple[FrameHeader, memoryview]]:
    """Decode every frame in `buf` strictly; raises RemoteProtocolError on the first problem."""
    records, _, problem = scan_records(buf)
    for r in records:
        yield r.header, r.payload
    if problem:
        raise RemoteProtocolError(GoodbyeCode.BAD_RECORD, problem)
