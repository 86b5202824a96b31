"""The payload envelope: checksum of plaintext, then zstd, then AES-256-GCM — in this order, only here.

Sealed extent layout::

    +-------+-----------+-------------------------------------------------------------+
    | flags | nonce 12B | AES-256-GCM( xxh3-128(plain) 16B || zstd(plain) or plain )  |
    +-------+-----------+-------------------------------------------------------------+
    flags bit 0: body is zstd-compressed (we keep it raw when zstd does not shrink it)

The associated data binds every ciphertext to its slot: disk uid, generation, sequence, offset and
length (`extent_ad`). Threat countered: the process server — or anybody on the network or with its disk —
holds only ciphertext; it cannot read it, alter it, or move or replay it into another disk, generation,
sequence or offset without the master target's check failing. Zero extents carry no bytes, so the
*batch* itself is sealed too (`seal_batch`): an AES-GCM tag over the whole extent table, which binds
which ranges are zero, how many extents there are and in which order.

The checksum inside the ciphertext catches our own bugs (compression, buffer handling) after decryption.
Nonces are random 96-bit values; with one key per disk and at most a few billion seals per key the
collision probability stays far below 2^-32.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .checksum import DIGEST_SIZE, block_digest
from .enums import GoodbyeCode
from .errors import EnvelopeError, LocalProtocolError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
FLAG_ZSTD = 0x01
NONCE_POOL = 1024  # nonces drawn from the OS at once
SMALL_EXTENT = 64 * 1024  # extents up to this size skip zstd for a while after failing to shrink (Sealer._compress)
SKIP_AFTER = 8
SKIP_COUNT = 32
OVERHEAD = 1 + NONCE_SIZE + DIGEST_SIZE + TAG_SIZE  # bytes added to a sealed extent beyond its body

_DOMAIN_EXTENT = b"standby/extent/v1"
_DOMAIN_BATCH = b"standby/batch/v1"


@dataclass(frozen=True, slots=True)
class Domain:
    """What a ciphertext is for, bound into its associated data: a ciphertext sealed for one use (a
    batch extent on the wire) can never be accepted for another (an undo record in the retention
    journal), even with the same disk key, generation, sequence and offset."""

    extent: bytes
    table: bytes


WIRE = Domain(_DOMAIN_EXTENT, _DOMAIN_BATCH)
UNDO = Domain(b"standby/undo/v1", b"standby/undo-table/v1")
# The contents a failover rollback overwrote (to go forward again before commit): never an undo record.
REDO = Domain(b"standby/redo/v1", b"standby/redo-table/v1")
_AD = struct.Struct(">16sIQQI")  # disk uid, generation, sequence, offset, length


def extent_ad(
    disk_uid: bytes,
    generation: int,
    sequence: int,
    offset: int,
    length: int,
    flags: int,
    domain: bytes = _DOMAIN_EXTENT,
) -> bytes:
    """Associated data of one extent; the flags byte is bound too, so it cannot be flipped unnoticed."""
    return domain + _AD.pack(disk_uid, generation, sequence, offset, length) + bytes((flags,))


def _in_range(generation: int, sequence: int, offset: int = 0, length: int = 0) -> None:
    """A peer's numbers that the associated data packs (u32, u64, u64, u32): out of range, nothing sealed
    with them can exist, so it is an authentication failure — not a struct.error out of proto/."""
    if not (0 <= generation < 2**32 and 0 <= sequence < 2**64 and 0 <= offset < 2**64 and 0 <= length < 2**32):
        raise EnvelopeError(f"generation {generation}, sequence {sequence}, offset {offset} or length {length} is out "
                            "of range: not authentic")


def _check_uid(disk_uid: bytes) -> bytes:
    if len(disk_uid) != 16:
        raise LocalProtocolError(GoodbyeCode.BAD_DISK_UID, "disk uid must be 16 bytes")
    return bytes(disk_uid)


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor for `level`. A compressor is not thread-safe and holds no secret: one
    per thread and level, shared by every Sealer (a context per disk and thread would cost memory)."""
    by_level: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "zc", None)
    if by_level is None:
        by_level = _local.zc = {}
    zc = by_level.get(level)
    if zc is None:
        zc = by_level[level] = zstandard.ZstdCompressor(level=level)
    return zc


def _nonce() -> bytes:
    """A fresh random nonce, from this thread's pool, filled NONCE_POOL nonces at a time: one getrandom
    call per seal was a quarter of sealing a 4 KiB extent. Still random 96-bit values from the OS (the
    collision bound above holds as is). Per thread, so that two threads sealing with one Sealer can
    never be handed the same bytes."""
    pool: bytes = getattr(_local, "nonces", b"")
    at: int = getattr(_local, "next", 0)
    if at >= len(pool):
        pool, at = os.urandom(NONCE_SIZE * NONCE_POOL), 0
        _local.nonces = pool
    _local.next = at + NONCE_SIZE
    return pool[at : at + NONCE_SIZE]


class Sealer:
    """Seals extents for one disk; several threads may seal with one Sealer at once (the master target
    seals undo records in a pool)."""

    def __init__(self, key: bytes, disk_uid: bytes, level: int = 3, domain: Domain = WIRE) -> None:
        if len(key) != KEY_SIZE:
            raise LocalProtocolError(GoodbyeCode.BAD_KEY, "data key must be 32 bytes (AES-256)")
        self._aead = AESGCM(key)
        self._uid = _check_uid(disk_uid)
        self._level = level
        self._domain = domain
        # Small extents in a row that zstd did not shrink, and small extents still to send raw without
        # trying (`_compress`). Shared by the threads sealing with this Sealer: a lost update only
        # changes which extent is tried next, never what is sealed.
        self._misses = 0
        self._skip = 0

    def _compress(self, plain: bytes | memoryview) -> tuple[bytes | memoryview, int]:
        """zstd, or the plaintext itself when zstd does not shrink it. Small extents pay zstd's fixed cost
        (3.3 us for a 4 KiB block, 60 % of sealing it), which is wasted on incompressible data: after
        SKIP_AFTER small extents in a row that did not shrink, the next SKIP_COUNT small ones go raw
        without trying, then zstd is tried again. What that costs at most is SKIP_COUNT extents sent
        uncompressed when the data turns compressible; large extents are always tried (zstd gives up on
        incompressible input at GB/s)."""
        small = len(plain) <= SMALL_EXTENT
        if small and self._skip > 0:
            self._skip -= 1
            return plain, 0
        packed = _compressor(self._level).compress(plain)
        if len(packed) < len(plain):
            self._misses = 0
            return packed, FLAG_ZSTD
        if small:
            self._misses += 1
            if self._misses >= SKIP_AFTER:
                self._misses, self._skip = 0, SKIP_COUNT
        return plain, 0

    def seal(self, generation: int, sequence: int, offset: int, data: bytes | memoryview) -> bytes:
        plain = data
        packed, flags = self._compress(plain)
        nonce = _nonce()
        ad = extent_ad(self._uid, generation, sequence, offset, len(plain), flags, self._domain.extent)
        body = self._aead.encrypt(nonce, block_digest(plain) + packed, ad)
        return bytes((flags,)) + nonce + body

    def seal_batch(self, generation: int, sequence: int, table: bytes) -> bytes:
        """Tag (nonce + 16-byte tag) over a batch's extent table or a marker's metadata."""
        nonce = _nonce()
        ad = self._domain.table + _AD.pack(self._uid, generation, sequence, 0, len(table)) + table
        return nonce + self._aead.encrypt(nonce, b"", ad)


ZERO_GRAIN = 64 * 1024
_ZEROS = bytes(ZERO_GRAIN)


def zero_runs(buf: memoryview) -> list[tuple[bool, int, int]]:
    """Split `buf` into alternating (is_zero, start, end) runs at ZERO_GRAIN granularity: one memcmp per
    grain, so the Python work is proportional to grains, not bytes. The memcmp is `bytes.startswith`
    (it takes any buffer): comparing a memoryview with `==` goes item by item, 65 times slower, and
    was 7 % of the agent's CPU during an initial replication."""
    out: list[tuple[bool, int, int]] = []
    n = len(buf)
    for start in range(0, n, ZERO_GRAIN):
        end = min(start + ZERO_GRAIN, n)
        z = _ZEROS.startswith(buf[start:end])
        if out and out[-1][0] == z:
            out[-1] = (z, out[-1][1], end)
        else:
            out.append((z, start, end))
    return out


def seal_pieces(
    sealer: Sealer,
    generation: int,
    sequence: int,
    pieces: Iterable[tuple[int, memoryview]],
    pool: Executor | None = None,
    unit: int = 0,
) -> list[tuple[bool, int, int, bytes]]:
    """(is_zero, offset, length, sealed) for each run of the (offset, data) pieces: runs of zeros carry no
    bytes (discards and never-written space cost a table entry), the rest is sealed run by run, in
    extents of at most `unit` bytes if given (a multiple of ZERO_GRAIN). Sealing makes a few copies of
    what it seals (compressed, checksummed, encrypted): a bounded unit bounds that memory, where an 8 MiB
    run of data would hold five times 8 MiB for a moment.

    With a `pool`, pieces are sealed in its threads (zstd releases the GIL) while `pieces` — which may be
    a generator reading them from disk — is still being consumed: reading and sealing overlap. Small
    pieces go in tasks of about POOL_TASK bytes, so the hand-over costs little."""
    if pool is None:
        return [run for offset, data in pieces
                for run in _seal_piece(sealer, generation, sequence, offset, data, unit)]
    tasks: list[Future[list[tuple[bool, int, int, bytes]]]] = []
    batch: list[tuple[int, memoryview]] = []
    size = 0
    try:
        for offset, data in pieces:
            batch.append((offset, data))
            size += len(data)
            if size >= POOL_TASK:
                tasks.append(pool.submit(_seal_batch, sealer, generation, sequence, batch, unit))
                batch, size = [], 0
        if batch:
            tasks.append(pool.submit(_seal_batch, sealer, generation, sequence, batch, unit))
        return [run for t in tasks for run in t.result()]
    finally:
        for t in tasks:
            t.cancel()  # after an error (reading a piece, sealing one): what has not started need not run


POOL_TASK = 256 * 1024


def _seal_piece(sealer: Sealer, generation: int, sequence: int, offset: int, data: memoryview,
                unit: int = 0) -> list[tuple[bool, int, int, bytes]]:
    out: list[tuple[bool, int, int, bytes]] = []
    for is_zero, a, b in zero_runs(data):
        if is_zero:
            out.append((True, offset + a, b - a, b""))
            continue
        step = unit or b - a
        for x in range(a, b, step):
            y = min(x + step, b)
            out.append((False, offset + x, y - x, sealer.seal(generation, sequence, offset + x, data[x:y])))
    return out


def _seal_batch(sealer: Sealer, generation: int, sequence: int, batch: list[tuple[int, memoryview]],
                unit: int = 0) -> list[tuple[bool, int, int, bytes]]:
    return [run for offset, data in batch for run in _seal_piece(sealer, generation, sequence, offset, data, unit)]


class Opener:
    """Verifies and opens what a `Sealer` with the same key and disk uid sealed; safe to share between threads."""

    def __init__(self, key: bytes, disk_uid: bytes, max_extent: int, domain: Domain = WIRE) -> None:
        if len(key) != KEY_SIZE:
            raise LocalProtocolError(GoodbyeCode.BAD_KEY, "data key must be 32 bytes (AES-256)")
        self._aead = AESGCM(key)
        self._uid = _check_uid(disk_uid)
        self._max = max_extent
        self._domain = domain
        # zstd decompression contexts are not thread-safe, and the master target verifies several batches
        # at once in worker threads: one context per thread.
        self._local = threading.local()

    def open(
        self, generation: int, sequence: int, offset: int, length: int, sealed: bytes | memoryview
    ) -> bytes | memoryview:
        """The plaintext of one sealed extent (a view into the decrypted body when it was stored raw: no
        copy of the largest, incompressible extents)."""
        if len(sealed) < OVERHEAD:
            raise EnvelopeError(f"extent at offset {offset}: sealed payload too short")
        if length > self._max:
            raise EnvelopeError(f"extent at offset {offset}: {length} bytes exceeds the {self._max}-byte limit")
        flags = sealed[0]
        if flags & ~FLAG_ZSTD:
            raise EnvelopeError(f"extent at offset {offset}: unknown envelope flags {flags:#x}")
        _in_range(generation, sequence, offset, length)
        nonce = bytes(sealed[1 : 1 + NONCE_SIZE])
        ad = extent_ad(self._uid, generation, sequence, offset, length, flags, self._domain.extent)
        try:
            body = self._aead.decrypt(nonce, sealed[1 + NONCE_SIZE :], ad)
        except InvalidTag:
            raise EnvelopeError(
                f"extent at offset {offset} length {length} (generation {generation}, sequence {sequence}) "
                "failed authentication: altered, or moved from another disk, sequence or offset"
            ) from None
        digest, packed = body[:DIGEST_SIZE], memoryview(body)[DIGEST_SIZE:]
        if flags & FLAG_ZSTD:
            try:
                zd = getattr(self._local, "zd", None)
                if zd is None:
                    zd = self._local.zd = zstandard.ZstdDecompressor()
                plain = zd.decompress(packed, max_output_size=self._max)
            except zstandard.ZstdError as exc:
                raise EnvelopeError(f"extent at offset {offset}: cannot decompress: {exc}") from None
        else:
            plain = packed
        if len(plain) != length or block_digest(plain) != digest:
            raise EnvelopeError(f"extent at offset {offset}: plaintext length or checksum mismatch")
        return plain

    def check_batch(self, generation: int, sequence: int, table: bytes, tag: bytes | memoryview) -> None:
        if len(tag) != NONCE_SIZE + TAG_SIZE:
            raise EnvelopeError(f"batch {sequence}: seal has the wrong size")
        _in_range(generation, sequence, 0, len(table))
        nonce = bytes(tag[:NONCE_SIZE])
        ad = self._domain.table + _AD.pack(self._uid, generation, sequence, 0, len(table)) + table
        try:
            self._aead.decrypt(nonce, bytes(tag[NONCE_SIZE:]), ad)
        except InvalidTag:
            raise EnvelopeError(
                f"batch {sequence} (generation {generation}) failed authentication: its extent table was "
                "altered, or the batch was replayed into another disk, generation or sequence"
            ) from None


_DOMAIN_HASHES = b"standby/hashes/v1"


def _hashes_ad(uid: bytes, generation: int, query: bytes) -> bytes:
    return _DOMAIN_HASHES + _check_uid(uid) + struct.pack(">I", generation) + query


def seal_hashes(key: bytes, disk_uid: bytes, generation: int, query: bytes, hashes: bytes) -> bytes:
    """Encrypt a resync hash answer of the master target for the agent. Hashes of plaintext blocks would
    let the process server confirm guessed contents, and a forged or replayed answer could make the agent
    skip a differing chunk: so they are encrypted and bound to the agent's query (which holds a fresh
    random nonce), generation and disk."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, hashes, _hashes_ad(disk_uid, generation, query))


def open_hashes(key: bytes, disk_uid: bytes, generation: int, query: bytes, sealed: bytes) -> bytes:
    _in_range(generation, 0)
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], _hashes_ad(disk_uid, generation, query))
    except (InvalidTag, ValueError):
        raise EnvelopeError("resync hash answer failed authentication (altered, replayed or another query's)") from None
