"""Structure-aware mutation of BATCH, MARKER and UNDO payloads: change one field of the batch header, the
extent table or the marker meta, rebuild the payload and — when the caller passes a `reseal` — seal the
table again with the disk's key, so the mutation survives AES-GCM authentication and reaches the code that
trusts an authenticated table (a hostile agent holds that key).

Layouts are taken from the diagrams in proto/messages.py and mastertarget/journal_codec.py, not from their
private structs.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

from standby.proto.messages import meta_bytes

from .mutators import INTERESTING, Raw, dumps, hostile_value, mutate_bytes, mutate_json_text, mutate_json_value

BATCH_HEAD = struct.Struct(">IBBxxIQ")  # generation u32 | kind u8 | flags u8 | pad u16 | count u32 | cursor u64
BATCH_EXTENT = struct.Struct(">BxxxQII")  # kind u8 | pad 3 | offset u64 | length u32 | stored u32
UNDO_HEAD = struct.Struct(">II")  # generation u32 | count u32
UNDO_ENTRY = struct.Struct(">QIIBxxx")  # offset u64 | length u32 | stored u32 | kind u8 | pad 3
META_LEN = struct.Struct(">I")
SEAL = 28

Reseal = Callable[[int, bytes], bytes]  # (generation, sealed table or meta bytes) -> 28-byte seal
# Hostile point times: issue 9 finding 5 (10**400 stored, never acked; lists, None, strings, objects).
TIMES: list[Any] = [Raw("1e400"), Raw("-1e400"), Raw("1" + "0" * 400), Raw("NaN"), Raw("Infinity"), Raw("1e-400"),
                    10**20, 2**63, -1, True, None, "1700000000", "x", [1700000000], {"t": 1}, 0]


def _fit(v: int, bits: int) -> int:
    return v & ((1 << bits) - 1)


def _interesting(rng: random.Random, old: int, bits: int) -> int:
    v = rng.choice([*INTERESTING, old + 1, old - 1, old + 512, old * 2, rng.getrandbits(bits)])
    return _fit(v, bits)


def _mutate_entries(rng: random.Random, entries: list[list[int]], blobs: list[bytes], fields: dict[str, int],
                    widths: dict[str, int]) -> None:
    """Edit one extent-table entry (named fields) or the list itself; `blobs` follow their entries."""
    r = rng.random()
    if not entries or r < 0.1:
        entries.append([rng.choice([0, 1, 2]) if k == "kind" else rng.choice(INTERESTING) & 0xFFFFFFFF
                        for k in fields])
        blobs.append(b"")
        return
    i = rng.randrange(len(entries))
    if r < 0.6:
        name = rng.choice(list(fields))
        j = fields[name]
        if name == "kind":
            entries[i][j] = rng.choice([0, 1, 2, 3, 255])
        elif name == "offset" and rng.random() < 0.5:
            entries[i][j] = _fit(entries[i][j] + rng.choice([1, 511, -512, 1 << 40, 2**63]), 64)
        else:
            entries[i][j] = _interesting(rng, entries[i][j], widths[name])
    elif r < 0.7:
        entries.insert(i, list(entries[i]))  # a duplicate: overlapping extents
        blobs.insert(i, blobs[i])
    elif r < 0.8:
        del entries[i], blobs[i]
    elif r < 0.9:
        k = rng.randrange(len(entries))
        entries[i], entries[k] = entries[k], entries[i]
        blobs[i], blobs[k] = blobs[k], blobs[i]
    else:
        blobs[i] = mutate_bytes(rng, blobs[i])
        if rng.random() < 0.7:
            entries[i][fields["stored"]] = len(blobs[i])


def mutate_batch_payload(rng: random.Random, payload: bytes, reseal: Reseal | None = None) -> bytes:
    if len(payload) < BATCH_HEAD.size + SEAL:
        return mutate_bytes(rng, payload)
    gen, kind, flags, count, cursor = BATCH_HEAD.unpack_from(payload, 0)
    table_end = BATCH_HEAD.size + count * BATCH_EXTENT.size
    if table_end + SEAL > len(payload):
        return mutate_bytes(rng, payload)
    entries = [list(BATCH_EXTENT.unpack_from(payload, BATCH_HEAD.size + i * BATCH_EXTENT.size)) for i in range(count)]
    seal = payload[table_end : table_end + SEAL]
    pos = table_end + SEAL
    blobs = []
    for e in entries:
        blobs.append(payload[pos : pos + e[3]])
        pos += e[3]
    tail = payload[pos:]
    r = rng.random()
    declared = None
    if r < 0.1:
        gen = _interesting(rng, gen, 32)
    elif r < 0.2:
        kind = rng.choice([0, 1, 2, 3, 255])
    elif r < 0.25:
        flags = rng.randrange(256)
    elif r < 0.35:
        cursor = _interesting(rng, cursor, 64)
    elif r < 0.42:
        declared = _interesting(rng, count, 32)  # a count that does not match the table
    elif r < 0.9:
        _mutate_entries(rng, entries, blobs, {"kind": 0, "offset": 1, "length": 2, "stored": 3},
                        {"kind": 8, "offset": 64, "length": 32, "stored": 32})
    else:
        tail = rng.choice([b"", b"\0" * rng.randint(1, 64), rng.randbytes(8)])
    table = BATCH_HEAD.pack(gen, kind, flags, len(entries) if declared is None else declared, cursor) + b"".join(
        BATCH_EXTENT.pack(e[0] & 0xFF, _fit(e[1], 64), _fit(e[2], 32), _fit(e[3], 32)) for e in entries
    )
    if reseal is not None and rng.random() < 0.85:
        seal = reseal(gen, table)
    return table + seal + b"".join(blobs) + tail


def mutate_meta(rng: random.Random, meta: dict[str, Any]) -> Any:
    """A marker meta with one hostile field — mostly keeping generation and kind valid, so the marker is
    accepted by the codec and the hostile value reaches what uses it (time, consistency, tag, first)."""
    r = rng.random()
    if r < 0.6:
        m = dict(meta)
        key = rng.choice(["time", "time", "time", "consistency", "tag", "first", "kind", "generation", "extra"])
        if key == "kind":
            m[key] = rng.choice(["point", "initial-complete", "resync-complete", "batch", "", "x" * 100])
        elif key == "time" and rng.random() < 0.7:  # the value every consumer of a point parses
            m[key] = rng.choice(TIMES)
        else:
            m[key] = hostile_value(rng, m.get(key))
        return m
    return mutate_json_value(rng, meta)


def mutate_marker_payload(rng: random.Random, payload: bytes, reseal: Reseal | None = None) -> bytes:
    if len(payload) < 4 + SEAL:
        return mutate_bytes(rng, payload)
    (n,) = META_LEN.unpack_from(payload, 0)
    meta, seal = payload[4 : 4 + n], payload[4 + n :]
    r = rng.random()
    if r < 0.75:
        try:
            doc = json.loads(meta)
        except (ValueError, RecursionError):
            doc = None

        meta = dumps(mutate_meta(rng, doc)).encode() if isinstance(doc, dict) else mutate_json_text(rng, meta)
        if reseal is not None:
            try:
                parsed = json.loads(meta)
                gen = parsed.get("generation") if isinstance(parsed, dict) else None
                if type(gen) is int and 0 <= gen < 2**32:
                    seal = reseal(gen, meta_bytes(parsed))
            except (ValueError, RecursionError, TypeError, OverflowError):
                pass
        return META_LEN.pack(len(meta)) + meta + seal
    if r < 0.9:
        return META_LEN.pack(_interesting(rng, n, 32)) + meta + seal
    return mutate_bytes(rng, payload)


def mutate_undo_payload(rng: random.Random, payload: bytes, reseal: Reseal | None = None) -> bytes:
    """An UNDO/REDO record payload with one field of its table changed (resealed when `reseal` is given)."""
    if len(payload) < UNDO_HEAD.size + SEAL:
        return mutate_bytes(rng, payload)
    gen, count = UNDO_HEAD.unpack_from(payload, 0)
    end = UNDO_HEAD.size + count * UNDO_ENTRY.size
    if end + SEAL > len(payload) or rng.random() < 0.1:
        return mutate_bytes(rng, payload)
    entries = [list(UNDO_ENTRY.unpack_from(payload, UNDO_HEAD.size + i * UNDO_ENTRY.size)) for i in range(count)]
    seal = payload[end : end + SEAL]
    pos = end + SEAL
    blobs = []
    for e in entries:
        blobs.append(payload[pos : pos + e[2]])
        pos += e[2]
    tail = payload[pos:]
    declared = None
    r = rng.random()
    if r < 0.1:
        gen = _interesting(rng, gen, 32)
    elif r < 0.2:
        declared = _interesting(rng, count, 32)
    elif r < 0.9:
        _mutate_entries(rng, entries, blobs, {"offset": 0, "length": 1, "stored": 2, "kind": 3},
                        {"offset": 64, "length": 32, "stored": 32, "kind": 8})
    else:
        tail = rng.choice([b"", b"\0" * 9, rng.randbytes(3)])
    head = UNDO_HEAD.pack(gen, len(entries) if declared is None else declared) + b"".join(
        UNDO_ENTRY.pack(_fit(e[0], 64), _fit(e[1], 32), _fit(e[2], 32), e[3] & 0xFF) for e in entries
    )
    if reseal is not None and rng.random() < 0.85:
        seal = reseal(gen, head)
    return head + seal + b"".join(blobs) + tail
