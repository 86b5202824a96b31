"""In-process targets of what arrives from a peer: the frame codec, the message decoder, the sans-I/O
connection in both roles, the payload envelope, key unwrapping and the resync checksum tree.

The allowed error of each is the one its module documents (proto/errors.py: "Any other exception
escaping `standby.proto` is a bug"): RemoteProtocolError for frames, messages and connections,
EnvelopeError for sealed payloads, KeyWrapError for wrapped keys, ValueError for hashtree.differing.
"""

from __future__ import annotations

import json
import os
import random
import struct
from functools import cache
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from standby.proto import hashtree
from standby.proto.checksum import block_digest
from standby.proto.connection import CLOSED, NEED_DATA, Connection, Role
from standby.proto.envelope import (
    FLAG_ZSTD,
    NONCE_SIZE,
    WIRE,
    Opener,
    Sealer,
    extent_ad,
    open_hashes,
    seal_hashes,
)
from standby.proto.errors import EnvelopeError, RemoteProtocolError
from standby.proto.frames import HEADER_SIZE, MAX_PAYLOAD, check_payload, decode_header, scan_records
from standby.proto.keywrap import KeyWrapError, unwrap_key, wrap_key
from standby.proto.messages import (
    MAX_BATCH_LOGICAL,
    Batch,
    ExtentKind,
    FrameType,
    Hello,
    Marker,
    Message,
    decode_message,
    encode,
)

from .corpus import KEY, UID, control_messages, frame_corpus, make_batch, make_marker
from .engine import PropertyViolation, Target
from .formats import mutate_batch_payload, mutate_marker_payload
from .mutators import INTERESTING, mutate_bytes, mutate_frame, mutate_header, mutate_json_text

SEALER = Sealer(KEY, UID.bytes, 1)
OPENER = Opener(KEY, UID.bytes, MAX_BATCH_LOGICAL)


def reseal_for(sequence: int):  # noqa: ANN201 - a closure for formats.Reseal
    return lambda generation, table: SEALER.seal_batch(generation, sequence, table)


def payload_mutator(rng: random.Random, ftype: int, payload: bytes) -> bytes:
    """Type-aware payload edits: JSON documents for control frames, tables for BATCH, meta for MARKER."""
    if ftype == FrameType.BATCH:
        return mutate_batch_payload(rng, payload, reseal_for(rng.randrange(1, 20)))
    if ftype == FrameType.MARKER:
        return mutate_marker_payload(rng, payload, reseal_for(rng.randrange(1, 20)))
    return mutate_json_text(rng, payload)


def mutate_one_frame(rng: random.Random, frame: bytes, others: list[bytes]) -> bytes:
    return mutate_frame(rng, frame, others, payload_mutator)


# ---- frames.decode_header ---------------------------------------------------------------------------------------


def _header_seeds(rng: random.Random) -> list[bytes]:
    return [f[:HEADER_SIZE] for f in frame_corpus(rng)]


def _header_run(data: bytes) -> None:
    h = decode_header(data)
    if not 0 <= h.length <= MAX_PAYLOAD:
        raise PropertyViolation(f"decode_header accepted length {h.length}")


def _header_mutate(rng: random.Random, seed: bytes, seeds: list[bytes]) -> bytes:
    return (mutate_header(rng, seed) if rng.random() < 0.6 else mutate_bytes(rng, seed, seeds))[: HEADER_SIZE + 4]


# ---- frames.scan_records ----------------------------------------------------------------------------------------


def _segment_seeds(rng: random.Random) -> list[bytes]:
    frames = frame_corpus(rng)
    return [b"".join(rng.sample(frames, rng.randint(1, 6))) for _ in range(12)]


def mutate_segment(rng: random.Random, seg: bytes, seeds: list[bytes], payload_mut: Any = payload_mutator) -> bytes:
    """Edit one record of a run of records (checksums recomputed) or damage the bytes of the whole run."""
    recs, _, _ = scan_records(seg)
    if not recs or rng.random() < 0.3:
        return mutate_bytes(rng, seg, seeds)
    r = rng.choice(recs)
    new = mutate_frame(rng, bytes(seg[r.offset : r.end]), [], payload_mut)
    return seg[: r.offset] + new + seg[r.end :]


def _scan_run(data: bytes) -> None:
    recs, good_end, problem = scan_records(data)
    pos = 0
    for r in recs:
        if r.offset != pos or r.end <= r.offset:
            raise PropertyViolation("records are not contiguous")
        check_payload(r.header, r.payload)
        pos = r.end
    if good_end != pos or (problem is None) != (good_end == len(data)):
        raise PropertyViolation(f"good_end {good_end}, problem {problem!r}, length {len(data)}")


# ---- messages.decode_message ------------------------------------------------------------------------------------


def _message_run(frame: bytes) -> None:
    h = decode_header(frame)
    payload = memoryview(frame)[HEADER_SIZE : HEADER_SIZE + h.length]
    if len(payload) != h.length:
        raise RemoteProtocolError("truncated", "short frame")  # not the decoder's case: the connection's
    check_payload(h, payload)
    msg = decode_message(h, payload)
    _roundtrip(msg)
    _verify(msg)


def _verify(msg: Message) -> None:
    """What the master target does next with a decoded record (mastertarget/apply.py): check the seal, open
    the extents. Only EnvelopeError may come out of that (proto/errors.py)."""
    try:
        if isinstance(msg, Batch):
            OPENER.check_batch(msg.generation, msg.sequence, msg.table_bytes(), msg.seal)
            for e in msg.extents:
                if e.kind == ExtentKind.DATA:
                    OPENER.open(msg.generation, msg.sequence, e.offset, e.length, e.payload)
        elif isinstance(msg, Marker):
            OPENER.check_batch(msg.generation, msg.sequence, msg.meta_bytes(), msg.seal)
    except EnvelopeError:
        pass


def _roundtrip(msg: Message) -> None:
    """What the decoder accepted the encoder must be able to send again, unchanged (the process server
    forwards what it received; a message that cannot be encoded again is one the codec should refuse)."""
    try:
        once = encode(msg)
        h = decode_header(once)
        again = encode(decode_message(h, memoryview(once)[HEADER_SIZE:]))
    except Exception as exc:
        raise PropertyViolation(f"decoded {type(msg).__name__} does not encode again: {exc!r}") from None
    if again != once:
        raise PropertyViolation(f"decoded {type(msg).__name__} changes when encoded again")


# ---- connection ---------------------------------------------------------------------------------------------------


def _connection_seeds(rng: random.Random) -> list[tuple[str, list[bytes]]]:
    ctl = control_messages()
    frames = frame_corpus(rng)
    ops = [f for f in frames if f[5] not in (FrameType.HELLO, FrameType.WELCOME, FrameType.GOODBYE)]
    hellos = [encode(m) for m in ctl if isinstance(m, Hello)]
    welcome = encode(ctl[5])
    out: list[tuple[str, list[bytes]]] = []
    for _ in range(8):
        out.append(("server", [rng.choice(hellos), *rng.sample(ops, rng.randint(0, 5))]))
        out.append(("client", [welcome, *rng.sample(ops, rng.randint(0, 5))]))
    return out


def _connection_mutate(
    rng: random.Random, seed: tuple[str, list[bytes]], seeds: list[Any]
) -> tuple[str, tuple, bool, bytes]:
    role, frames = seed
    frames = list(frames)
    for _ in range(rng.choice([1, 1, 2])):
        r = rng.random()
        i = rng.randrange(len(frames))
        if r < 0.7:
            frames[i] = mutate_one_frame(rng, frames[i], frames)
        elif r < 0.8:
            frames.insert(i, frames[i])
        elif r < 0.9 and len(frames) > 1:
            del frames[i]
        else:
            frames.insert(i, encode(rng.choice(control_messages())))  # a HELLO/GOODBYE at the wrong time
    stream = b"".join(frames)
    cuts = tuple(sorted(rng.randrange(len(stream) + 1) for _ in range(rng.choice([0, 1, 3, 10]))))
    return role, cuts, rng.random() < 0.3, stream


def _connection_run(inp: Any) -> None:
    if isinstance(inp[1], list):  # a seed as is
        role, frames = inp
        inp = (role, (), False, b"".join(frames))
    role, cuts, eof, stream = inp
    conn = Connection(Role.SERVER if role == "server" else Role.CLIENT)
    if conn.role is Role.CLIENT:
        conn.send(Hello("agent"))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    for chunk in [*chunks, *([b""] if eof else [])]:
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                break
            if not isinstance(ev, Message):  # type: ignore[arg-type]
                raise PropertyViolation(f"next_event returned {ev!r}")
            if conn.buffered > HEADER_SIZE + MAX_PAYLOAD + len(chunk):
                raise PropertyViolation(f"{conn.buffered} bytes buffered")


# ---- envelope -----------------------------------------------------------------------------------------------------


def _zstd_bombs(rng: random.Random) -> list[bytes]:
    import zstandard

    zc = zstandard.ZstdCompressor(level=1)
    big = zc.compress(bytes(64 << 20))  # 64 MiB of zeros in a few KiB: over the 16 MiB extent limit
    no_size = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(20 << 20))
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"abcd"
    return [big, no_size, skippable, zc.compress(b"a" * 4096) * 2, zc.compress(b""), b"\x28\xb5\x2f\xfd",
            zc.compress(rng.randbytes(4096))]


def _envelope_seeds(rng: random.Random) -> list[tuple[int, int, int, int, bytes]]:
    out = []
    for _ in range(10):
        n = rng.choice([512, 4096, 65536])
        data = rng.randbytes(n) if rng.random() < 0.5 else b"x" * n
        gen, seq, off = rng.randrange(1, 5), rng.randrange(1, 100), rng.randrange(0, 1 << 30, 512)
        out.append((gen, seq, off, n, SEALER.seal(gen, seq, off, data)))
    return out


def _authentic(gen: int, seq: int, off: int, length: int, flags: int, body: bytes) -> bytes:
    """A sealed extent whose AEAD check passes: what only the key holder (the agent) can make."""
    nonce = os.urandom(NONCE_SIZE)
    ad = extent_ad(UID.bytes, gen, seq, off, length, flags, WIRE.extent)
    return bytes((flags,)) + nonce + AESGCM(KEY).encrypt(nonce, body, ad)


def _envelope_mutate(rng: random.Random, seed: tuple, seeds: list[Any]) -> tuple[int, int, int, int, bytes]:
    gen, seq, off, length, sealed = seed
    r = rng.random()
    if r < 0.3:
        return gen, seq, off, length, mutate_bytes(rng, sealed)
    if r < 0.45:
        which = rng.randrange(4)
        vals = [gen, seq, off, length]
        vals[which] = rng.choice(INTERESTING) & ((1 << (32 if which in (0, 3) else 64)) - 1)
        return (*vals, sealed)  # type: ignore[return-value]
    # Past the AEAD: hostile plaintext bodies (a checksum that lies, zstd bombs, junk, wrong lengths).
    plain = rng.randbytes(length) if length <= 1 << 20 else b""
    digest = block_digest(plain) if rng.random() < 0.7 else rng.randbytes(16)
    flags = FLAG_ZSTD if rng.random() < 0.8 else rng.choice([0, 2, 0x80, 0xFF])
    packed = rng.choice([*_zstd_bombs_cached(), plain, mutate_bytes(rng, _zstd_bombs_cached()[-1])])
    if rng.random() < 0.2:
        packed = packed[: rng.randrange(len(packed) + 1)]
    body = rng.choice([digest + packed, digest, digest[:7], b""])
    return gen, seq, off, length, _authentic(gen, seq, off, length, flags, body)


@cache
def _zstd_bombs_cached() -> tuple[bytes, ...]:
    return tuple(_zstd_bombs(random.Random(1)))


def _envelope_run(inp: tuple[int, int, int, int, bytes]) -> None:
    gen, seq, off, length, sealed = inp
    plain = OPENER.open(gen, seq, off, length, sealed)
    if len(plain) != length:
        raise PropertyViolation(f"opened {len(plain)} bytes for an extent of {length}")


def _seals_seeds(rng: random.Random) -> list[tuple[str, int, int, bytes, bytes]]:
    out = []
    for i in range(6):
        b = make_batch(rng, 1, 5 + i)
        out.append(("batch", b.generation, b.sequence, b.table_bytes(), b.seal))
        q = json.dumps({"nonce": rng.randbytes(8).hex(), "level": 1, "parents": [0]}).encode()
        out.append(("hashes", 2, 0, q, seal_hashes(KEY, UID.bytes, 2, q, rng.randbytes(64))))
        c = make_marker(rng, 1, 9 + i)
        out.append(("batch", c.generation, c.sequence, c.meta_bytes(), c.seal))
    return out


def _seals_mutate(rng: random.Random, seed: tuple, seeds: list[Any]) -> tuple[str, int, int, bytes, bytes]:
    kind, gen, seq, table, tag = seed
    r = rng.random()
    if r < 0.4:
        tag = mutate_bytes(rng, tag)
    elif r < 0.8:
        table = mutate_bytes(rng, table)
    else:  # a marker's generation comes from its JSON meta: any integer
        gen = rng.choice([*INTERESTING, -1, -(2**31), 2**40, 10**30])
    return kind, gen, seq, table, tag


def _seals_run(inp: tuple[str, int, int, bytes, bytes]) -> None:
    kind, gen, seq, table, tag = inp
    if kind == "batch":
        OPENER.check_batch(gen, seq, table, tag)
    else:
        open_hashes(KEY, UID.bytes, gen, table, tag)


# ---- keywrap ------------------------------------------------------------------------------------------------------


@cache
def _mt_key() -> tuple[bytes, bytes]:
    k = ec.generate_private_key(ec.SECP256R1())
    priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub


def _keywrap_seeds(rng: random.Random) -> list[tuple[bytes, bytes]]:
    _, pub = _mt_key()
    own = b"disk:" + UID.bytes
    return [(b"disk:" + rng.randbytes(16), wrap_key(rng.randbytes(32), pub, own)) for _ in range(3)] + [
        (own, wrap_key(rng.randbytes(32), pub, own)) for _ in range(3)
    ]


def _keywrap_mutate(rng: random.Random, seed: tuple[bytes, bytes], seeds: list[Any]) -> tuple[bytes, bytes]:
    context, wrapped = seed
    r = rng.random()
    w = bytearray(wrapped)
    if r < 0.4:
        return context, mutate_bytes(rng, wrapped)
    if r < 0.7:  # hostile ephemeral points: infinity, compressed, off the curve, coordinates >= p
        p = 2**256 - 2**224 + 2**192 + 2**96 - 1
        point = rng.choice([
            b"\x00" * 65, b"\x02" + rng.randbytes(32) + b"\0" * 32, b"\x04" + rng.randbytes(64),
            b"\x04" + p.to_bytes(32, "big") + b"\0" * 32, b"\x04" + b"\xff" * 64, b"\x04" + b"\0" * 64,
            b"\x06" + bytes(wrapped[2:66]), b"\x03" + bytes(wrapped[2:34]) + b"\0" * 32,
        ])
        w[1:66] = point
        return context, bytes(w)
    if r < 0.85:
        return rng.choice([b"", b"x" * 1025, b"disk:" + UID.bytes[:15], context + b"\0", b"\xff" * 1024]), wrapped
    w[0] = rng.choice([0, 2, 255])
    return context, bytes(w)


def _keywrap_run(inp: tuple[bytes, bytes]) -> None:
    context, wrapped = inp
    priv, _ = _mt_key()
    key = unwrap_key(wrapped, priv, context)
    if len(key) != 32:
        raise PropertyViolation(f"unwrapped a {len(key)}-byte key")


# ---- hashtree -----------------------------------------------------------------------------------------------------


def _hashtree_seeds(rng: random.Random) -> list[tuple[str, int, int, list[int]]]:
    return [("children", 64, 4096, [0, 1, 63]), ("pick", 100, 0, [0, 5, 99]), ("differing", 3, 0, [4, 7, 9]),
            ("children", 1, 10, [0]), ("pick", 64, 0, list(range(64)))]


def _hashtree_mutate(rng: random.Random, seed: tuple, seeds: list[Any]) -> tuple[str, int, int, list[int]]:
    op, nodes, below, idx = seed
    idx = list(idx)
    r = rng.random()
    hostile = [-1, -2, -64, -(2**63), 2**31, 2**32, 2**63, 2**64, 10**400, nodes, nodes + 1, 0]
    if r < 0.5 and idx:
        idx[rng.randrange(len(idx))] = rng.choice(hostile)
    elif r < 0.6:
        idx = idx * rng.choice([10, 1000])
    elif r < 0.7:
        idx = list(range(rng.choice([10_000, 2000])))
    elif r < 0.8:
        below = rng.choice([0, -1, 1, 2**40, nodes * 64 + 1])
    elif r < 0.9:
        nodes = rng.choice([0, 1, 2, 3])
    else:
        idx = []
    return op, nodes, below, idx


def _hashtree_run(inp: tuple[str, int, int, list[int]]) -> None:
    op, nodes, below, idx = inp
    level = bytes(range(256)) * (nodes * hashtree.HASH // 256) + bytes(nodes * hashtree.HASH % 256)
    if op == "children":
        kids = hashtree.children(idx, below)
        bad = [k for k in kids if not 0 <= k < max(below, 0)]
        if bad:
            raise PropertyViolation(f"children() of parents {idx[:5]}... gave indexes outside 0..{below}: {bad[:3]}")
    elif op == "pick":
        got = hashtree.pick(level, idx)
        if len(got) != hashtree.HASH * len(idx):
            raise PropertyViolation(f"pick() of {len(idx)} indexes from {nodes} nodes returned {len(got)} bytes, "
                                    f"not {hashtree.HASH * len(idx)} (indexes {idx[:5]})")
    else:
        theirs = bytearray(hashtree.pick(level, idx) if all(0 <= i < nodes for i in idx) else b"")
        if theirs:
            theirs[0] ^= 1
        diff = hashtree.differing(idx, hashtree.pick(level, idx), bytes(theirs))
        if not set(diff) <= set(idx):
            raise PropertyViolation("differing() returned an index it was not asked about")


# ---- the list -----------------------------------------------------------------------------------------------------

TARGETS = [
    Target("frames.decode_header", _header_seeds, _header_mutate, _header_run, (RemoteProtocolError,),
           ci_inputs=40_000, weight=1.0),
    Target("frames.scan_records", _segment_seeds, mutate_segment, _scan_run, (), ci_inputs=10_000, weight=1.0),
    Target("messages.decode_message", frame_corpus, mutate_one_frame, _message_run, (RemoteProtocolError,),
           ci_inputs=30_000, weight=3.0),
    Target("connection.both_roles", _connection_seeds, _connection_mutate, _connection_run,
           (RemoteProtocolError,), ci_inputs=20_000, weight=3.0),
    Target("envelope.open", _envelope_seeds, _envelope_mutate, _envelope_run, (EnvelopeError,),
           ci_inputs=3_000, weight=1.0),
    Target("envelope.seals", _seals_seeds, _seals_mutate, _seals_run, (EnvelopeError,), ci_inputs=20_000,
           weight=0.5),
    Target("keywrap.unwrap_key", _keywrap_seeds, _keywrap_mutate, _keywrap_run, (KeyWrapError,),
           ci_inputs=5_000, weight=0.3),
    Target("hashtree.children_pick_differing", _hashtree_seeds, _hashtree_mutate, _hashtree_run, (ValueError,),
           ci_inputs=2_000, weight=0.3),
]
