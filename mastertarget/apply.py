"""Verify, then write: the master target's half of promise 6.

Every extent of a batch is authenticated and decrypted *before* the first byte is written, so a batch
that fails anywhere leaves the replica untouched. Runs in a worker thread (it blocks on I/O and CPU).
"""

from __future__ import annotations

from standby.proto.envelope import Opener
from standby.proto.errors import EnvelopeError
from standby.proto.messages import MAX_BATCH_LOGICAL, Batch, ExtentKind, Marker
from standby.proto.requests import BadRequest, MarkerMeta

from .replicas import Replica


class Applier:
    def __init__(self, key: bytes, uid: bytes, replica: Replica) -> None:
        self.opener = Opener(key, uid, MAX_BATCH_LOGICAL)
        self.opener_key = key
        self.replica = replica

    def verify_batch(self, b: Batch) -> list[bytes | memoryview | None]:
        self.opener.check_batch(b.generation, b.sequence, b.table_bytes(), b.seal)
        plains: list[bytes | memoryview | None] = []
        for e in b.extents:
            if e.offset + e.length > self.replica.size:
                raise EnvelopeError(f"extent {e.offset}+{e.length} lies beyond the replica's {self.replica.size} bytes")
            if e.kind == ExtentKind.DATA:
                plains.append(self.opener.open(b.generation, b.sequence, e.offset, e.length, e.payload))
            else:
                plains.append(None)
        return plains

    def write_verified(self, b: Batch, plains: list[bytes | memoryview | None]) -> None:
        """Write a batch `verify_batch` accepted (no sync: the caller syncs once per group of batches)."""
        for e, plain in zip(b.extents, plains, strict=True):
            if plain is None:
                self.replica.write_zeroes(e.offset, e.length)
            else:
                self.replica.write(e.offset, plain)

    def write_group(self, group: list[tuple[Batch, list[bytes | memoryview | None]]]) -> None:
        """Write verified batches in order, then one sync: the durability point for all of them."""
        for b, plains in group:
            self.write_verified(b, plains)
        self.replica.sync()

    def verify_marker(self, c: Marker) -> None:
        self.opener.check_batch(c.generation, c.sequence, c.meta_bytes(), c.seal)
        try:
            MarkerMeta.from_marker(c.meta)  # authentic, and well-formed: a point's time is a real time...
        except BadRequest as exc:
            raise BadMarker(f"marker {c.sequence} is authentic but invalid: {exc}") from None


class BadMarker(Exception):
    """An authentic MARKER whose meta is invalid (an agent's bug or a compromised agent): not applied."""
