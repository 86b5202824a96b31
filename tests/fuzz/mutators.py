"""Mutations that know the formats: raw byte damage (what a torn write or a flipped bit does), and
structure-aware edits that recompute the frame's header xxh32 and payload xxh64 — and, where a target has
the key, the AES-GCM seal — so that a mutation gets past the integrity checks to the parser behind them.
Hostile JSON values (huge ints, 1e400, NaN, deep nesting, 10k-element lists, `../` names, ...) are written
as raw JSON text, so values Python's encoder would never produce reach the decoders too.
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import xxhash

from standby.proto.frames import HEADER_SIZE, MAX_PAYLOAD

_HEAD = struct.Struct(">4sBBHIQIQ")  # from the layout diagram in proto/frames.py
_CHECK = struct.Struct(">I")

INTERESTING = [0, 1, 2, 7, 8, 16, 20, 28, 36, 127, 128, 255, 256, 511, 512, 4095, 4096, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, MAX_PAYLOAD, MAX_PAYLOAD + 1]


# ---- raw bytes ------------------------------------------------------------------------------------------------


def _put_int(rng: random.Random, b: bytearray) -> None:
    if not b:
        return
    width = rng.choice([1, 2, 4, 8])
    pos = rng.randrange(len(b))
    v = rng.choice(INTERESTING) if rng.random() < 0.8 else rng.getrandbits(width * 8)
    v &= (1 << (width * 8)) - 1
    if rng.random() < 0.3:  # near an existing value
        old = int.from_bytes(b[pos : pos + width].ljust(width, b"\0"), "big")
        v = (old + rng.choice([-2, -1, 1, 2, 1 << 8, -(1 << 8)])) % (1 << (width * 8))
    raw = v.to_bytes(width, rng.choice(["big", "little"]))
    b[pos : pos + width] = raw[: len(b) - pos]


def mutate_bytes(
    rng: random.Random, data: bytes, others: list[bytes] | None = None, rounds: int | None = None
) -> bytes:
    """A few random edits: bit flips, byte sets, interesting integers, insertions, deletions, duplication,
    truncation, splicing with another input."""
    b = bytearray(data)
    for _ in range(rounds if rounds is not None else rng.choice([1, 1, 1, 2, 3, 5])):
        op = rng.randrange(10)
        n = len(b)
        if op == 0 and n:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(n)
                b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            b[rng.randrange(n)] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x20, 0x22, 0x5C, rng.randrange(256)])
        elif op == 2:
            _put_int(rng, b)
        elif op == 3:
            i = rng.randint(0, n)
            b[i:i] = rng.randbytes(rng.choice([1, 2, 4, 16, 100]))
        elif op == 4 and n:
            i = rng.randrange(n)
            del b[i : i + rng.choice([1, 2, 4, 16, 64, 1024])]
        elif op == 5 and n:
            i = rng.randrange(n)
            j = min(n, i + rng.choice([1, 8, 64, 512]))
            k = rng.randint(0, n)
            b[k:k] = b[i:j]
        elif op == 6 and n:
            del b[rng.randint(0, n) :]
        elif op == 7 and others:
            o = rng.choice(others)
            if o:
                i, j = rng.randint(0, n), rng.randint(0, len(o))
                b = b[:i] + o[j:] if rng.random() < 0.5 else b[:i] + bytearray(o[:j])
        elif op == 8 and n:
            i = rng.randrange(n)
            b[i : i + 4] = rng.randbytes(4)
        else:
            b += rng.choice([b"\0" * rng.randint(1, 40), rng.randbytes(rng.randint(1, 40)), b"STBY"])
    return bytes(b)


# ---- frames ---------------------------------------------------------------------------------------------------


def frame_fields(frame: bytes) -> list[Any] | None:
    if len(frame) < HEADER_SIZE:
        return None
    return list(_HEAD.unpack(frame[: _HEAD.size]))


def build_frame(fields: list[Any], payload: bytes, fix_length: bool = True, fix_hash: bool = True) -> bytes:
    """A frame from header fields [magic, version, type, flags, stream, sequence, length, payload hash] and a
    payload, with the length and payload hash recomputed (if asked) and the header checksum always right."""
    magic, version, ftype, flags, stream, seq, length, phash = fields
    if fix_length:
        length = len(payload)
    if fix_hash:
        phash = xxhash.xxh64_intdigest(payload)
    head = _HEAD.pack(magic, version & 0xFF, ftype & 0xFF, flags & 0xFFFF, stream & 0xFFFFFFFF,
                      seq & 0xFFFFFFFFFFFFFFFF, length & 0xFFFFFFFF, phash & 0xFFFFFFFFFFFFFFFF)
    return head + _CHECK.pack(xxhash.xxh32_intdigest(head)) + payload


def fix_frame(frame: bytes) -> bytes:
    """Recompute length, payload hash and header checksum of a (mutated) frame."""
    f = frame_fields(frame)
    if f is None:
        return frame
    return build_frame(f, frame[HEADER_SIZE:])


def mutate_header(rng: random.Random, frame: bytes) -> bytes:
    """Change one header field and recompute the checksums, so the mutation reaches what reads the field."""
    f = frame_fields(frame)
    if f is None:
        return frame
    payload = frame[HEADER_SIZE:]
    i = rng.choice([0, 1, 2, 2, 3, 4, 4, 5, 5, 6, 6, 7])
    if i == 0:
        f[0] = rng.choice([b"STBX", b"\0\0\0\0", b"stby"])
    elif i == 1:
        f[1] = rng.choice([0, 2, 255])
    elif i == 2:
        f[2] = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0x40, 0x41, 0x42, 0x43, 255, rng.randrange(256)])
    elif i == 3:
        f[3] = rng.choice([1, 0xFFFF, rng.randrange(65536)])
    elif i == 4:
        f[4] = rng.choice([0, 1, 2, 3, 2**31, 2**32 - 1, rng.getrandbits(32)])
    elif i == 5:
        f[5] = rng.choice([0, 1, 2, f[5] - 1, f[5] + 1, f[5] + 100, 2**63, 2**64 - 1, rng.getrandbits(64)])
    elif i == 6:  # a length that lies (keeps the payload): the header checksum is right, so it is believed
        f[6] = rng.choice([0, len(payload) - 1, len(payload) + 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2**32 - 1])
        return build_frame(f, payload, fix_length=False)
    else:
        f[7] = rng.getrandbits(64)
        return build_frame(f, payload, fix_hash=False)
    return build_frame(f, payload)


def mutate_frame(rng: random.Random, frame: bytes, others: list[bytes], payload_mutator: Any = None) -> bytes:
    """One mutation of an encoded frame: raw damage (1 in 5: checksums then catch it) or a structure-aware
    edit of its header or payload with the checksums recomputed."""
    r = rng.random()
    if r < 0.2 or len(frame) < HEADER_SIZE:
        return mutate_bytes(rng, frame, others)
    if r < 0.4:
        return mutate_header(rng, frame)
    f = frame_fields(frame)
    assert f is not None
    payload = frame[HEADER_SIZE:]
    if payload_mutator is not None and rng.random() < 0.7:
        payload = payload_mutator(rng, f[2], payload)
    else:
        payload = mutate_bytes(rng, payload, [o[HEADER_SIZE:] for o in others])
    return build_frame(f, payload)


# ---- JSON -----------------------------------------------------------------------------------------------------


class Raw:
    """A JSON token written as is (1e400, NaN, -Infinity, 10**400 as digits, broken text...)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:60]!r}{'...' if len(self.text) > 60 else ''})"


def dumps(v: Any) -> str:
    """JSON text of `v`, where Raw values go in verbatim (no validation: the point is hostile text)."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dumps(x) for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return json.dumps(v)


def deep(depth: int, kind: str = "list") -> Raw:
    return Raw(("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth))


_POOL: list[Any] = [
    Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1" + "0" * 400),
    Raw("-" + "9" * 300), Raw("1e-400"), Raw("0.5"), Raw("-0"), Raw("1E+20"), Raw("9" * 5000),
    10**20, 2**63, 2**64, 2**64 - 1, 2**32, -1, -5, 0, 1, True, False, None,
    "", "x", "x" * 300, "x" * 10_000, "../../../etc/passwd", "a/../../b", "not-a-uuid", "\u0000",
    "\ud800", "\U0001f600" * 3, "12345678-1234-1234-1234-1234567890ab", "0" * 32, "-", ".", "..",
    [], {}, [1], [None], {"": None}, ["a"] * 3, list(range(10_000)), [[]] * 100,
    deep(50), deep(1000), deep(100_000), deep(50, "dict"), deep(5000, "dict"),
    {"generation": 1, "kind": "point"}, [1, 2, 3, 4], 0.1, -0.0, 1.5,
]


def hostile_value(rng: random.Random, near: Any = None) -> Any:
    """A value a hostile peer might put where a well-behaved one puts `near`."""
    if isinstance(near, int) and not isinstance(near, bool) and rng.random() < 0.3:
        return rng.choice([near + 1, near - 1, -near, near * 2**32, str(near), float(near)])
    if isinstance(near, str) and rng.random() < 0.3:
        return rng.choice([near + "/..", "../" + near, near * 100, near.upper(), near[:-1], [near], {"x": near}])
    return rng.choice(_POOL)


def mutate_json_value(rng: random.Random, v: Any, depth: int = 0) -> Any:
    """A copy of `v` with one node changed: a value replaced, a key deleted, added or renamed, a list grown."""
    if isinstance(v, dict) and v and rng.random() < 0.75 and depth < 6:
        v = dict(v)
        k = rng.choice(list(v))
        r = rng.random()
        if r < 0.6:
            v[k] = mutate_json_value(rng, v[k], depth + 1)
        elif r < 0.75:
            del v[k]
        elif r < 0.9:
            v[rng.choice(["extra", "__class__", "", k + "_", "op", "id", "disk", "time", "kind"])] = hostile_value(rng)
        else:
            v[k.upper() if k.upper() != k else k + "x"] = v.pop(k)
        return v
    if isinstance(v, list) and v and rng.random() < 0.7 and depth < 6:
        v = list(v)
        r = rng.random()
        i = rng.randrange(len(v))
        if r < 0.6:
            v[i] = mutate_json_value(rng, v[i], depth + 1)
        elif r < 0.8:
            del v[i]
        else:
            v = v * rng.choice([2, 100])
        return v
    return hostile_value(rng, v)


def mutate_json_text(rng: random.Random, text: bytes) -> bytes:
    """A JSON document mutated structurally (parsed and edited) or as text (broken syntax, encodings)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        doc = None
    if doc is None or rng.random() < 0.15:
        r = rng.random()
        if r < 0.5:
            return mutate_bytes(rng, text)
        if r < 0.7:
            return text.decode("utf-8", "replace").encode("utf-16")
        return rng.choice([b"", b"null", b"[]", b"1", b'"x"', b"{", b"\xff\xfe", b"{}" * 2, b"[" * 100_000])
    return dumps(mutate_json_value(rng, doc)).encode("utf-8", "surrogatepass")
