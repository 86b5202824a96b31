"""Valid inputs made with the product's own encoders: the seeds every mutation starts from.

A batch is sealed the way the agent seals it (agent/reader.py: zero runs become zero extents, the seal
covers the extent table), a marker the way the agent's delta loop makes a point, control messages with the
arguments the daemons really send.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

from standby.proto.envelope import Sealer, seal_pieces
from standby.proto.messages import (
    Ack,
    Batch,
    BatchKind,
    Busy,
    Extent,
    ExtentKind,
    Goodbye,
    Hello,
    Marker,
    Reject,
    Reply,
    Request,
    Welcome,
    encode,
    meta_bytes,
)

KEY = bytes(range(32))  # the disk's data key in every in-process target
UID = uuid.UUID("6f1c2a34-9b7e-4c1d-8e2f-0a1b2c3d4e5f")
SECTOR = 512


def data_pieces(rng: random.Random, max_extents: int = 4) -> list[tuple[int, memoryview]]:
    """(offset, data) pieces of a batch: random (incompressible), text (compressible) and zeros."""
    out = []
    off = rng.choice([0, 4096, 1 << 20])
    for _ in range(rng.randint(1, max_extents)):
        n = rng.choice([512, 4096, 8192, 65536, 131072])
        kind = rng.random()
        if kind < 0.4:
            data = rng.randbytes(n)
        elif kind < 0.7:
            data = (b"log line %08d\n" % off * (n // 10 + 1))[:n]
        else:
            data = bytes(n)
        out.append((off, memoryview(data)))
        off += n + rng.choice([0, 512, 65536])
    return out


def make_batch(
    rng: random.Random, disk: int = 1, sequence: int = 1, generation: int = 1, kind: BatchKind = BatchKind.DELTA,
    key: bytes = KEY, uid: bytes = UID.bytes,
) -> Batch:
    sealer = Sealer(key, uid, 1)
    pieces = data_pieces(rng)
    extents = [
        Extent(ExtentKind.ZERO, off, n) if zero else Extent(ExtentKind.DATA, off, n, sealed)
        for zero, off, n, sealed in seal_pieces(sealer, generation, sequence, pieces)
    ]
    cursor = extents[-1].offset + extents[-1].length if kind == BatchKind.INITIAL else 0
    table = Batch.table(generation, kind, 0, cursor, [(e.kind, e.offset, e.length, len(e.payload)) for e in extents])
    seal = sealer.seal_batch(generation, sequence, table)
    return Batch(disk, sequence, generation, kind, cursor, tuple(extents), seal)


def point_meta(rng: random.Random, generation: int = 1) -> dict[str, Any]:
    return rng.choice([
        {"generation": generation, "kind": "point", "consistency": "crash-consistent", "time": time.time()},
        {"generation": generation, "kind": "point", "consistency": "app-consistent", "time": time.time(),
         "tag": "nightly"},
        {"generation": generation, "kind": "initial-complete"},
        {"generation": generation, "kind": "resync-complete"},
    ])


def make_marker(
    rng: random.Random, disk: int = 1, sequence: int = 2, generation: int = 1, meta: dict[str, Any] | None = None,
    key: bytes = KEY, uid: bytes = UID.bytes,
) -> Marker:
    meta = meta if meta is not None else point_meta(rng, generation)
    sealer = Sealer(key, uid, 1)
    return Marker(disk, sequence, meta, sealer.seal_batch(generation, sequence, meta_bytes(meta)))


def control_messages() -> list[Any]:
    """One of each JSON message, with the arguments the daemons send."""
    uid = str(UID)
    return [
        Hello("agent"), Hello("mt"), Hello("admin"), Hello("enroll"), Hello("agent", (1, 2, 7)),
        Welcome(1, "ps", "agent"),
        Goodbye("sequence-gap", "expected sequence 5, got 7"),
        Request(1, "disk_open", {"name": "sda", "path": "/dev/sda", "size": 1 << 30, "uid": uid}),
        Request(2, "disk_key", {"disk": 1, "wrapped_key": "AAAA"}),
        Request(3, "disk_report", {"disk": 1, "report": {"dirty_bytes": 0, "tracker": "tracefs"}}),
        Request(4, "resync_begin", {"disk": 1, "generation": 2, "mode": "checksum", "reason": "test"}),
        Request(5, "resync_hashes", {"disk": 1, "generation": 2, "query": {"nonce": "ab", "level": 1,
                                                                          "parents": [0, 1]}}),
        Request(6, "subscribe", {}), Request(7, "pull", {"disk": 1, "applied_seq": 0}),
        Request(8, "status", {"machine": None}), Request(9, "failover", {"machine": "src", "point": "latest"}),
        Request(10, "enroll", {"name": "web01", "role": "agent", "passphrase": "x", "csr": "-----BEGIN"}),
        Request(0, "wake", {}),
        Reply(1, True, {"disk": 1, "next_sequence": 1, "resync": None}),
        Reply(2, False, {}, "bad-input", "unknown request 'x'"),
        Ack(1, 5, 1), Busy(1, 6, 1.0, "process server cache is over its quota"),
        Reject(1, 7, "authentication-failed", "extent failed authentication"),
    ]


def frame_corpus(rng: random.Random) -> list[bytes]:
    frames = [encode(m) for m in control_messages()]
    for i in range(6):
        kind = [BatchKind.INITIAL, BatchKind.DELTA, BatchKind.RESYNC][i % 3]
        frames.append(make_batch(rng, 1 + i % 2, 1 + i, 1, kind).encode())
    for i in range(4):
        frames.append(make_marker(rng, 1, 10 + i).encode())
    return frames
