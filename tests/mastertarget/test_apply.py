"""The master target's verify-then-write step (`standby.mastertarget.apply.Applier`), no daemons.

Batches are built exactly as the agent builds them (`BatchBuilder` over a real image file, or by hand
with `Sealer` + `Batch.table`) and applied into a real `raw` replica. A valid batch applies; every kind
of tampering a holder of ciphertext only could try raises `EnvelopeError`, and the replica file is then
byte-identical to what it was before: verification of *all* extents happens before the first write.

The replica starts out holding image A (random data everywhere); the batches under test come from
image B (data, text and zero ranges), so any write at all — data or zeros — would change the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from standby.agent.reader import ZERO_GRAIN, BatchBuilder
from standby.mastertarget.apply import Applier, BadMarker
from standby.mastertarget.replicas import Replica, create_replica
from standby.proto.envelope import Sealer
from standby.proto.errors import EnvelopeError
from standby.proto.frames import HEADER_SIZE, decode_header
from standby.proto.messages import (
    SECTOR,
    Batch,
    BatchKind,
    Extent,
    ExtentKind,
    Marker,
    decode_message,
    meta_bytes,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
UID = b"disk-uid-0000001"
OTHER_UID = b"disk-uid-0000002"
DISK = 7
GEN = 3
GRAIN = ZERO_GRAIN  # 64 KiB: the reader's zero-detection granularity
# Grain layout of image B: r = random (incompressible), t = text (compressible), z = zeros.
LAYOUT = "rzrztt" + "zrrztz" + "rrzr"
SIZE = len(LAYOUT) * GRAIN  # 1 MiB
B_LENGTH = SIZE - 2 * GRAIN  # the batch under test covers all but the last two grains (room to move extents)


@dataclass
class Env:
    root: Path
    replica: Replica
    applier: Applier
    image_a: bytes
    image_b: bytes
    builder_b: BatchBuilder

    @property
    def replica_path(self) -> Path:
        return self.root / "replica.img"

    def replica_bytes(self) -> bytes:
        return self.replica_path.read_bytes()

    def batch_b(self, sequence: int = 2) -> Batch:
        return self.builder_b.initial_batch(GEN, sequence, 0, B_LENGTH)


def _image_b(rng: random.Random) -> bytes:
    parts = []
    for i, c in enumerate(LAYOUT):
        if c == "r":
            parts.append(rng.randbytes(GRAIN))
        elif c == "t":
            line = b"grain %04d: a compressible log line\n" % i
            parts.append((line * (GRAIN // len(line) + 1))[:GRAIN])
        else:
            parts.append(bytes(GRAIN))
    return b"".join(parts)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    rng = random.Random(4242)
    image_a = rng.randbytes(SIZE)
    image_b = _image_b(rng)
    (tmp_path / "a.img").write_bytes(image_a)
    (tmp_path / "b.img").write_bytes(image_b)
    replica = create_replica("raw", tmp_path / "replica.img", SIZE)
    try:
        applier = Applier(KEY, UID, replica)
        first = BatchBuilder(str(tmp_path / "a.img"), DISK, KEY, UID, 3).initial_batch(GEN, 1, 0, SIZE)
        assert apply_batch(applier, first) == SIZE
        assert (tmp_path / "replica.img").read_bytes() == image_a
        yield Env(
            tmp_path, replica, applier, image_a, image_b, BatchBuilder(str(tmp_path / "b.img"), DISK, KEY, UID, 3)
        )
    finally:
        replica.close()


def apply_batch(applier: Applier, b: Batch) -> int:
    """One batch through the master target's own path (a group of one): verify every extent, then write
    and sync. Returns the logical bytes written."""
    plains = applier.verify_batch(b)
    applier.write_group([(b, plains)])
    return b.logical_bytes


def _wire(b: Batch) -> Batch:
    """Encode to a frame and decode it back, as the master target receives it."""
    frame = b.encode()
    header = decode_header(frame[:HEADER_SIZE])
    msg = decode_message(header, memoryview(frame)[HEADER_SIZE:])
    assert isinstance(msg, Batch)
    return msg


def _data_indexes(b: Batch) -> list[int]:
    return [i for i, e in enumerate(b.extents) if e.kind == ExtentKind.DATA]


def _zero_indexes(b: Batch) -> list[int]:
    return [i for i, e in enumerate(b.extents) if e.kind == ExtentKind.ZERO]


def _with_extents(b: Batch, extents: list[Extent]) -> Batch:
    return dataclasses.replace(b, extents=tuple(extents))


def _flip(buf: bytes | memoryview, pos: int) -> bytes:
    out = bytearray(buf)
    out[pos] ^= 0x01
    return bytes(out)


def _replace_extent(b: Batch, i: int, e: Extent) -> Batch:
    ext = list(b.extents)
    ext[i] = e
    return _with_extents(b, ext)


# ---- the valid path ----------------------------------------------------------------------------------


def test_batch_b_has_the_shape_the_tamper_tests_need(env: Env) -> None:
    b = env.batch_b()
    kinds = [e.kind for e in b.extents]
    assert kinds.count(ExtentKind.DATA) >= 3 and kinds.count(ExtentKind.ZERO) >= 3
    assert b.extents[-1].kind == ExtentKind.DATA  # tampering with the last extent tests all-before-any
    assert b.cursor == B_LENGTH
    # Two 64 KiB random extents: same stored length, so swapping them leaves the extent table as it was.
    first, second = b.extents[0], b.extents[2]
    assert first.length == second.length == GRAIN and len(first.payload) == len(second.payload)


def test_valid_batch_applies(env: Env) -> None:
    b = _wire(env.batch_b())
    assert apply_batch(env.applier, b) == B_LENGTH
    expected = env.image_b[:B_LENGTH] + env.image_a[B_LENGTH:]
    assert env.replica_bytes() == expected
    assert env.replica.read(0, SIZE) == expected


def test_valid_marker_verifies(env: Env) -> None:
    meta = {"generation": GEN, "kind": "initial-complete", "time": 1_800_000_000.5}
    seal = Sealer(KEY, UID).seal_batch(GEN, 9, meta_bytes(meta))
    env.applier.verify_marker(Marker(DISK, 9, meta, seal))
    with pytest.raises(EnvelopeError, match="failed authentication"):
        env.applier.verify_marker(Marker(DISK, 9, {**meta, "kind": "something-else"}, seal))
    with pytest.raises(EnvelopeError, match="failed authentication"):
        env.applier.verify_marker(Marker(DISK, 10, meta, seal))  # replayed at another sequence


@pytest.mark.parametrize("time", [10**400, None, [1.0], "1800000000", {"t": 1}, -1, 1.0, True])
def test_an_authentic_marker_with_an_invalid_time_is_refused(env: Env, time: object) -> None:
    """Issue 9, finding 5: a point whose time is 10**400 or not a number at all (sealed by an enrolled
    agent, so it authenticates) must be refused, not crash the master target's point parsing."""
    meta = {"generation": GEN, "kind": "point", "consistency": "crash-consistent", "time": time}
    seal = Sealer(KEY, UID).seal_batch(GEN, 9, meta_bytes(meta))
    with pytest.raises(BadMarker, match="authentic but invalid"):
        env.applier.verify_marker(Marker(DISK, 9, meta, seal))


# ---- tampering: each must raise and leave the replica untouched ------------------------------------------


def t_payload_byte_last_extent(b: Batch) -> Batch:
    i = _data_indexes(b)[-1]
    e = b.extents[i]
    return _replace_extent(b, i, dataclasses.replace(e, payload=_flip(e.payload, len(e.payload) // 2)))


def t_payload_byte_first_extent(b: Batch) -> Batch:
    i = _data_indexes(b)[0]
    e = b.extents[i]
    return _replace_extent(b, i, dataclasses.replace(e, payload=_flip(e.payload, len(e.payload) - 1)))


def t_envelope_flags_byte(b: Batch) -> Batch:
    i = _data_indexes(b)[-1]
    e = b.extents[i]
    return _replace_extent(b, i, dataclasses.replace(e, payload=_flip(e.payload, 0)))


def t_nonce_byte(b: Batch) -> Batch:
    i = _data_indexes(b)[-1]
    e = b.extents[i]
    return _replace_extent(b, i, dataclasses.replace(e, payload=_flip(e.payload, 5)))


def t_batch_seal_byte(b: Batch) -> Batch:
    return dataclasses.replace(b, seal=_flip(b.seal, len(b.seal) - 1))


def t_data_to_zero(b: Batch) -> Batch:
    i = _data_indexes(b)[-1]
    e = b.extents[i]
    return _replace_extent(b, i, Extent(ExtentKind.ZERO, e.offset, e.length))


def t_offset_moved(b: Batch) -> Batch:
    i = len(b.extents) - 1  # the last extent: moving it up one grain stays inside the replica
    e = b.extents[i]
    return _replace_extent(b, i, dataclasses.replace(e, offset=e.offset + GRAIN))


def t_zero_extent_moved(b: Batch) -> Batch:
    i = _zero_indexes(b)[0]
    e = b.extents[i]
    return _replace_extent(b, i, dataclasses.replace(e, offset=e.offset + SECTOR, length=e.length - SECTOR))


def t_length_shrunk(b: Batch) -> Batch:
    i = _zero_indexes(b)[-1]
    e = b.extents[i]
    return _replace_extent(b, i, dataclasses.replace(e, length=e.length - SECTOR))


def t_payloads_swapped(b: Batch) -> Batch:
    """Same stored lengths: the extent table is unchanged, so only the per-extent binding catches it."""
    ext = list(b.extents)
    ext[0], ext[2] = (
        dataclasses.replace(ext[0], payload=ext[2].payload),
        dataclasses.replace(ext[2], payload=ext[0].payload),
    )
    return _with_extents(b, ext)


def t_sequence_changed(b: Batch) -> Batch:
    return dataclasses.replace(b, sequence=b.sequence + 1)


def t_generation_changed(b: Batch) -> Batch:
    return dataclasses.replace(b, generation=b.generation + 1)


def t_cursor_changed(b: Batch) -> Batch:
    return dataclasses.replace(b, cursor=b.cursor + GRAIN)


def t_kind_changed(b: Batch) -> Batch:
    return dataclasses.replace(b, kind=BatchKind.DELTA)


def t_flags_changed(b: Batch) -> Batch:
    return dataclasses.replace(b, flags=1)


def t_data_extent_dropped(b: Batch) -> Batch:
    i = _data_indexes(b)[-1]
    return _with_extents(b, [e for j, e in enumerate(b.extents) if j != i])


def t_zero_extent_dropped(b: Batch) -> Batch:
    i = _zero_indexes(b)[0]
    return _with_extents(b, [e for j, e in enumerate(b.extents) if j != i])


TAMPERS: dict[str, Callable[[Batch], Batch]] = {
    f.__name__[2:]: f
    for f in (
        t_payload_byte_last_extent,
        t_payload_byte_first_extent,
        t_envelope_flags_byte,
        t_nonce_byte,
        t_batch_seal_byte,
        t_data_to_zero,
        t_offset_moved,
        t_zero_extent_moved,
        t_length_shrunk,
        t_payloads_swapped,
        t_sequence_changed,
        t_generation_changed,
        t_cursor_changed,
        t_kind_changed,
        t_flags_changed,
        t_data_extent_dropped,
        t_zero_extent_dropped,
    )
}


def _assert_rejected(env: Env, applier: Applier, b: Batch) -> None:
    before = env.replica_bytes()
    assert before == env.image_a
    with pytest.raises(EnvelopeError):
        apply_batch(applier, b)
    after = env.replica_bytes()
    assert hashlib.sha256(after).digest() == hashlib.sha256(before).digest(), "a rejected batch wrote to the replica"
    assert env.replica.read(0, SIZE) == before


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampered_batch_is_rejected_and_nothing_written(env: Env, name: str) -> None:
    tampered = _wire(TAMPERS[name](env.batch_b()))
    _assert_rejected(env, env.applier, tampered)
    # The untampered batch still applies afterwards: the failure left no state behind.
    apply_batch(env.applier, env.batch_b())
    assert env.replica_bytes() == env.image_b[:B_LENGTH] + env.image_a[B_LENGTH:]


def test_extent_replayed_from_another_sequence_is_rejected(env: Env) -> None:
    b = env.batch_b(sequence=2)
    other = env.batch_b(sequence=5)  # the same data sealed for another sequence
    i = _data_indexes(b)[-1]
    # Random data is stored uncompressed: same stored length, so the extent table (and the batch seal)
    # is unchanged and only the extent's own binding to its sequence can catch the replay.
    assert other.extents[i].offset == b.extents[i].offset and len(other.extents[i].payload) == len(b.extents[i].payload)
    _assert_rejected(env, env.applier, _wire(_replace_extent(b, i, other.extents[i])))


def test_batch_for_another_disk_uid_is_rejected(env: Env) -> None:
    _assert_rejected(env, Applier(KEY, OTHER_UID, env.replica), _wire(env.batch_b()))


def test_batch_under_another_key_is_rejected(env: Env) -> None:
    _assert_rejected(env, Applier(OTHER_KEY, UID, env.replica), _wire(env.batch_b()))


def test_batch_built_for_another_disk_is_rejected(env: Env) -> None:
    """Another disk's whole batch, valid for *its* key and uid, moved to this replica."""
    other = BatchBuilder(str(env.root / "b.img"), DISK, OTHER_KEY, OTHER_UID, 3).initial_batch(GEN, 2, 0, B_LENGTH)
    _assert_rejected(env, env.applier, _wire(other))


def _hand_batch(extents: list[tuple[ExtentKind, int, bytes | int]], sequence: int = 2) -> Batch:
    """A correctly sealed batch: (kind, offset, data bytes for DATA | length for ZERO)."""
    sealer = Sealer(KEY, UID)
    ext = []
    for kind, offset, what in extents:
        if kind == ExtentKind.DATA:
            assert isinstance(what, bytes)
            ext.append(Extent(kind, offset, len(what), sealer.seal(GEN, sequence, offset, what)))
        else:
            assert isinstance(what, int)
            ext.append(Extent(kind, offset, what))
    end = max(e.offset + e.length for e in ext)
    table = Batch.table(GEN, BatchKind.INITIAL, 0, end, [(e.kind, e.offset, e.length, len(e.payload)) for e in ext])
    return Batch(DISK, sequence, GEN, BatchKind.INITIAL, end, tuple(ext), sealer.seal_batch(GEN, sequence, table))


def test_hand_built_batch_applies(env: Env) -> None:
    data = b"\x5a" * (2 * SECTOR)
    b = _hand_batch(
        [(ExtentKind.DATA, 0, data), (ExtentKind.ZERO, GRAIN, GRAIN), (ExtentKind.DATA, SIZE - SECTOR, data[:SECTOR])]
    )
    apply_batch(env.applier, _wire(b))
    expected = bytearray(env.image_a)
    expected[0 : 2 * SECTOR] = data
    expected[GRAIN : 2 * GRAIN] = bytes(GRAIN)
    expected[SIZE - SECTOR :] = data[:SECTOR]
    assert env.replica_bytes() == bytes(expected)


@pytest.mark.parametrize(
    "last",
    [
        (ExtentKind.DATA, SIZE, b"\x11" * SECTOR),  # starts at the end
        (ExtentKind.DATA, SIZE - SECTOR, b"\x11" * (2 * SECTOR)),  # straddles the end
        (ExtentKind.ZERO, SIZE - GRAIN, 2 * GRAIN),  # a zero extent straddling the end
        (ExtentKind.ZERO, 1 << 40, GRAIN),  # far beyond
    ],
    ids=["data-at-end", "data-straddling", "zero-straddling", "zero-far-beyond"],
)
def test_extent_beyond_replica_size_is_rejected(env: Env, last: tuple[ExtentKind, int, bytes | int]) -> None:
    # Correctly sealed (an agent whose disk is larger than the replica), valid extents first.
    b = _hand_batch([(ExtentKind.DATA, 0, b"\x22" * GRAIN), (ExtentKind.ZERO, GRAIN, GRAIN), last])
    _assert_rejected(env, env.applier, _wire(b))


def test_batch_beyond_replica_from_a_larger_disk_is_rejected(env: Env) -> None:
    big = env.root / "big.img"
    big.write_bytes(random.Random(1).randbytes(SIZE + 2 * GRAIN))
    b = BatchBuilder(str(big), DISK, KEY, UID, 3).initial_batch(GEN, 2, SIZE - 2 * GRAIN, 4 * GRAIN)
    _assert_rejected(env, env.applier, _wire(b))


@pytest.mark.parametrize("state, recorded", [("UpToDate", True), ("Inconsistent", False)])
def test_point_is_recorded_only_while_the_replica_is_a_faithful_copy(env: Env, state: str, recorded: bool) -> None:
    """Promise 4: after skipped records or a grown disk (state Inconsistent until a resync completes) a
    point marker is applied but not recorded as a recovery point."""
    import asyncio
    from types import SimpleNamespace

    from standby.mastertarget.diskstate import ReplicaState
    from standby.mastertarget.journal import DiskJournal
    from standby.mastertarget.worker import DiskWorker
    from standby.proto.envelope import Sealer
    from standby.proto.messages import Ack, Marker, meta_bytes

    st = ReplicaState(DISK, "m", "d", "u", SIZE, "raw", str(env.replica_path), 1, GEN, state)
    host = SimpleNamespace(disks_dir=env.root)
    journal = DiskJournal(env.root / "retention", DISK, KEY, UID)
    assert journal.open() is None
    worker = DiskWorker(host, st, env.applier, journal)  # type: ignore[arg-type]
    meta = {"generation": GEN, "kind": "point", "consistency": "crash-consistent", "time": 1_800_000_001.0}
    point = Marker(DISK, 2, meta, Sealer(KEY, UID).seal_batch(GEN, 2, meta_bytes(meta)))
    sent: list[object] = []

    class Link:
        async def send(self, msg: object) -> None:
            sent.append(msg)

    asyncio.run(worker.apply_group(Link(), [point]))  # type: ignore[arg-type]
    assert sent == [Ack(DISK, 2, GEN)] and st.applied_seq == 2
    assert bool(journal.points()) == recorded
    assert [g.last for g in journal.groups] == ([2] if state == "UpToDate" else [])
    assert (st.last_point is not None) == recorded


def test_a_journaled_group_keeps_the_old_contents_and_an_unverified_table_is_only_advice(env: Env) -> None:
    """With the journal on, apply_group asks the replica for the old contents while it verifies the batches
    (from extent tables not verified yet): a good group journals them and is written; a batch whose table
    reaches past the replica is rejected as before, and asking for its ranges changed nothing."""
    import asyncio
    from types import SimpleNamespace

    from standby.mastertarget.diskstate import ReplicaState
    from standby.mastertarget.journal import DiskJournal, apply_undo
    from standby.mastertarget.worker import DiskWorker
    from standby.proto.messages import Ack, Reject

    st = ReplicaState(DISK, "m", "d", "u", SIZE, "raw", str(env.replica_path), 1, GEN, "UpToDate")
    journal = DiskJournal(env.root / "retention", DISK, KEY, UID)
    assert journal.open() is None
    worker = DiskWorker(SimpleNamespace(disks_dir=env.root), st, env.applier, journal)  # type: ignore[arg-type]
    sent: list[object] = []

    class Link:
        async def send(self, msg: object) -> None:
            sent.append(msg)

    asyncio.run(worker.apply_group(Link(), [_wire(env.batch_b(2))]))  # type: ignore[arg-type]
    assert sent == [Ack(DISK, 2, GEN)]
    assert env.replica_bytes() == env.image_b[:B_LENGTH] + env.image_a[B_LENGTH:]
    g = list(journal.groups)[-1]
    rec = journal.read_undo(g)
    assert rec is not None
    old = bytearray(env.replica_bytes())

    def put(off: int, data: bytes | None, n: int) -> None:
        old[off : off + n] = data if data is not None else bytes(n)

    apply_undo(rec, put)
    assert bytes(old) == env.image_a
    big = env.root / "big.img"
    big.write_bytes(random.Random(1).randbytes(SIZE + 2 * GRAIN))
    beyond = BatchBuilder(str(big), DISK, KEY, UID, 3).initial_batch(GEN, 3, SIZE - 2 * GRAIN, 4 * GRAIN)
    asyncio.run(worker.apply_group(Link(), [_wire(beyond)]))  # type: ignore[arg-type]
    assert isinstance(sent[-1], Reject) and sent[-1].sequence == 3
    assert env.replica_bytes() == env.image_b[:B_LENGTH] + env.image_a[B_LENGTH:]
    assert [x.last for x in journal.groups] == [2]
    journal.close()
