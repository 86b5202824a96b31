"""Payload envelope (`standby.proto.envelope`): xxh3 -> zstd -> AES-256-GCM, bound to its slot.

Threat model under test: whoever holds only ciphertext (the process server, the network) can neither alter
an extent nor move/replay it to another disk, generation, sequence, offset or length, nor rewrite a batch's
extent table (turn data into zeros, drop or move an extent) without the master target noticing.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.proto.envelope import (
    FLAG_ZSTD,
    KEY_SIZE,
    NONCE_SIZE,
    OVERHEAD,
    SKIP_AFTER,
    SKIP_COUNT,
    SMALL_EXTENT,
    TAG_SIZE,
    Opener,
    Sealer,
    extent_ad,
    seal_pieces,
)
from standby.proto.errors import EnvelopeError, LocalProtocolError
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

FAST = settings(max_examples=40, deadline=None)
NOISE = random.Random(20240601).randbytes(8192)  # fixed "random" data: same parameters in every run

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
UID = b"disk-uid-0000001"
OTHER_UID = b"disk-uid-0000002"
MAX_EXTENT = 1 << 20
GEN, SEQ, OFF = 3, 41, 8 * SECTOR

incompressible = st.binary(min_size=1, max_size=4096)
compressible = st.builds(
    lambda unit, n: (unit * n)[: max(len(unit) * n, 1)], st.binary(min_size=1, max_size=8), st.integers(64, 600)
)
plaintexts = incompressible | compressible


@pytest.fixture(scope="module")
def sealer() -> Sealer:
    return Sealer(KEY, UID)


@pytest.fixture(scope="module")
def opener() -> Opener:
    return Opener(KEY, UID, MAX_EXTENT)


# ---- extents ------------------------------------------------------------------------------------------


@FAST
@given(
    plain=plaintexts,
    generation=st.integers(0, 2**32 - 1),
    sequence=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**40).map(lambda n: n * SECTOR),
)
def test_seal_open_round_trip(plain: bytes, generation: int, sequence: int, offset: int) -> None:
    sealer, opener = Sealer(KEY, UID), Opener(KEY, UID, MAX_EXTENT)
    sealed = sealer.seal(generation, sequence, offset, plain)
    assert opener.open(generation, sequence, offset, len(plain), sealed) == plain
    assert opener.open(generation, sequence, offset, len(plain), memoryview(sealed)) == plain
    if sealed[0] & FLAG_ZSTD:
        assert len(sealed) < len(plain) + OVERHEAD
    else:
        assert len(sealed) == len(plain) + OVERHEAD


def test_compressible_data_is_compressed_and_random_data_is_not(sealer: Sealer, opener: Opener) -> None:
    zeros = bytes(64 * 1024)
    sealed = sealer.seal(GEN, SEQ, OFF, zeros)
    assert sealed[0] == FLAG_ZSTD and len(sealed) < 1024
    assert opener.open(GEN, SEQ, OFF, len(zeros), sealed) == zeros
    noise = os.urandom(4096)
    sealed = sealer.seal(GEN, SEQ, OFF, noise)
    assert sealed[0] == 0 and len(sealed) == len(noise) + OVERHEAD
    assert noise not in sealed  # and it is encrypted, not stored in clear


def test_small_incompressible_extents_stop_trying_zstd_for_a_while(opener: Opener) -> None:
    """After SKIP_AFTER small extents in a row that did not shrink, the next SKIP_COUNT small ones are sent
    raw without trying (even compressible ones), then zstd is tried again; a large extent is always tried.
    Every extent opens to its plaintext."""
    sealer = Sealer(KEY, UID)  # a fresh one: the skipping is state of the sealer
    text = b"the quick brown fox jumps over the lazy dog\n" * 100
    small_text, small_random = text[:4096], [os.urandom(4096) for _ in range(SKIP_AFTER)]
    sealed = [(p, sealer.seal(1, 1, i * 4096, p)) for i, p in enumerate(small_random)]
    assert all(s[0] == 0 for _, s in sealed)
    skipped = [sealer.seal(1, 1, 0, small_text) for _ in range(SKIP_COUNT)]
    assert all(s[0] == 0 for s in skipped), "compressible small extents go raw while zstd is skipped"
    big = (text * 30)[: SMALL_EXTENT + 4096]
    assert sealer.seal(1, 1, 0, big)[0] & FLAG_ZSTD, "a large extent is always tried"
    assert sealer.seal(1, 1, 0, small_text)[0] & FLAG_ZSTD, "zstd is tried again after the skipped ones"
    for i, (p, s) in enumerate(sealed):
        assert opener.open(1, 1, i * 4096, 4096, s) == p
    assert opener.open(1, 1, 0, 4096, skipped[-1]) == small_text


def test_same_plaintext_seals_differently(sealer: Sealer) -> None:
    a, b = sealer.seal(GEN, SEQ, OFF, b"x" * 512), sealer.seal(GEN, SEQ, OFF, b"x" * 512)
    assert a != b and a[1 : 1 + NONCE_SIZE] != b[1 : 1 + NONCE_SIZE]


@FAST
@given(plain=plaintexts, data=st.data())
def test_tampering_any_byte_after_the_flags_is_detected(plain: bytes, data: st.DataObject) -> None:
    sealed = bytearray(Sealer(KEY, UID).seal(GEN, SEQ, OFF, plain))
    i = data.draw(st.integers(1, len(sealed) - 1))
    sealed[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(EnvelopeError):
        Opener(KEY, UID, MAX_EXTENT).open(GEN, SEQ, OFF, len(plain), bytes(sealed))


@pytest.mark.parametrize("plain, flags", [(bytes(4096), FLAG_ZSTD), (NOISE[:4096], 0)], ids=["zstd", "raw"])
def test_flipping_the_compression_flag_is_detected(sealer: Sealer, opener: Opener, plain: bytes, flags: int) -> None:
    sealed = bytearray(sealer.seal(GEN, SEQ, OFF, plain))
    assert sealed[0] == flags
    sealed[0] ^= FLAG_ZSTD
    with pytest.raises(EnvelopeError):
        opener.open(GEN, SEQ, OFF, len(plain), bytes(sealed))


@pytest.mark.parametrize("bit", range(1, 8))
def test_tampering_reserved_flag_bits_is_detected(sealer: Sealer, opener: Opener, bit: int) -> None:
    sealed = bytearray(sealer.seal(GEN, SEQ, OFF, bytes(4096)))
    sealed[0] ^= 1 << bit
    with pytest.raises(EnvelopeError):
        opener.open(GEN, SEQ, OFF, 4096, bytes(sealed))


@FAST
@given(plain=plaintexts, data=st.data())
def test_truncated_or_extended_extent_is_detected(plain: bytes, data: st.DataObject) -> None:
    sealed = Sealer(KEY, UID).seal(GEN, SEQ, OFF, plain)
    opener = Opener(KEY, UID, MAX_EXTENT)
    cut = data.draw(st.integers(0, len(sealed) - 1))
    with pytest.raises(EnvelopeError):
        opener.open(GEN, SEQ, OFF, len(plain), sealed[:cut])
    with pytest.raises(EnvelopeError):
        opener.open(GEN, SEQ, OFF, len(plain), sealed + data.draw(st.binary(min_size=1, max_size=16)))


@pytest.mark.parametrize(
    "opener_args, open_args",
    [
        pytest.param((KEY, OTHER_UID), (GEN, SEQ, OFF, 4096), id="other-disk"),
        pytest.param((OTHER_KEY, UID), (GEN, SEQ, OFF, 4096), id="other-key"),
        pytest.param((KEY, UID), (GEN + 1, SEQ, OFF, 4096), id="other-generation"),
        pytest.param((KEY, UID), (GEN, SEQ + 1, OFF, 4096), id="replayed-later"),
        pytest.param((KEY, UID), (GEN, SEQ - 1, OFF, 4096), id="replayed-earlier"),
        pytest.param((KEY, UID), (GEN, SEQ, OFF + SECTOR, 4096), id="moved-offset"),
        pytest.param((KEY, UID), (GEN, SEQ, OFF, 4096 - SECTOR), id="shorter-length"),
        pytest.param((KEY, UID), (GEN, SEQ, OFF, 4096 + SECTOR), id="longer-length"),
    ],
)
@pytest.mark.parametrize("plain", [bytes(4096), NOISE[:4096]], ids=["zstd", "raw"])
def test_extent_cannot_be_moved_or_replayed(
    opener_args: tuple[bytes, bytes], open_args: tuple[int, int, int, int], plain: bytes
) -> None:
    sealed = Sealer(KEY, UID).seal(GEN, SEQ, OFF, plain)
    with pytest.raises(EnvelopeError, match="failed authentication"):
        Opener(*opener_args, MAX_EXTENT).open(*open_args, sealed)


def test_extents_cannot_be_swapped_within_a_batch(sealer: Sealer, opener: Opener) -> None:
    a = sealer.seal(GEN, SEQ, 0, b"a" * 512)
    b = sealer.seal(GEN, SEQ, 512, b"b" * 512)
    with pytest.raises(EnvelopeError):
        opener.open(GEN, SEQ, 0, 512, b)
    with pytest.raises(EnvelopeError):
        opener.open(GEN, SEQ, 512, 512, a)


def test_opener_refuses_an_extent_longer_than_its_maximum(sealer: Sealer) -> None:
    sealed = sealer.seal(GEN, SEQ, OFF, bytes(64 * 1024))
    with pytest.raises(EnvelopeError):
        Opener(KEY, UID, 4096).open(GEN, SEQ, OFF, 64 * 1024, sealed)


# ---- keys and disk ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_wrong_key_size_is_a_local_error(size: int) -> None:
    assert KEY_SIZE == 32
    with pytest.raises(LocalProtocolError) as exc:
        Sealer(bytes(size), UID)
    assert exc.value.code == "bad-key"
    with pytest.raises(LocalProtocolError) as exc:
        Opener(bytes(size), UID, MAX_EXTENT)
    assert exc.value.code == "bad-key"


@pytest.mark.parametrize("size", [0, 15, 17])
def test_wrong_disk_uid_size_is_a_local_error_when_sealing_extents(size: int) -> None:
    with pytest.raises(LocalProtocolError) as exc:
        Sealer(KEY, bytes(size))
    assert exc.value.code == "bad-disk-uid"
    with pytest.raises(LocalProtocolError):
        Opener(KEY, bytes(size), MAX_EXTENT)


@pytest.mark.parametrize("size", [15, 17])
def test_wrong_disk_uid_size_is_a_local_error_when_sealing_batches(size: int) -> None:
    with pytest.raises(LocalProtocolError):
        Sealer(KEY, bytes(size)).seal_batch(1, 1, b"table")


def test_extent_ad_binds_every_field() -> None:
    base = extent_ad(UID, 1, 2, 512, 1024, 1)
    variants = [
        extent_ad(OTHER_UID, 1, 2, 512, 1024, 1),
        extent_ad(UID, 2, 2, 512, 1024, 1),
        extent_ad(UID, 1, 3, 512, 1024, 1),
        extent_ad(UID, 1, 2, 1024, 1024, 1),
        extent_ad(UID, 1, 2, 512, 512, 1),
        extent_ad(UID, 1, 2, 512, 1024, 0),
    ]
    assert len({base, *variants}) == 7


# ---- batches: the sealed extent table -------------------------------------------------------------------

SEAL_SIZE = NONCE_SIZE + TAG_SIZE


def make_batch(
    sealer: Sealer, layout: list[tuple[ExtentKind, int, bytes | int]], *, sequence: int = SEQ, generation: int = GEN
) -> tuple[Batch, dict[int, bytes]]:
    """Build a sealed batch the way the agent does. layout: (kind, offset, plaintext or zero length)."""
    extents = []
    plains = {}
    for kind, offset, what in layout:
        if kind == ExtentKind.DATA:
            assert isinstance(what, bytes)
            plains[offset] = what
            extents.append(Extent(kind, offset, len(what), sealer.seal(generation, sequence, offset, what)))
        else:
            assert isinstance(what, int)
            extents.append(Extent(kind, offset, what))
    unsealed = Batch(7, sequence, generation, BatchKind.DELTA, 0, tuple(extents), bytes(SEAL_SIZE))
    seal = sealer.seal_batch(generation, sequence, unsealed.table_bytes())
    return dataclasses.replace(unsealed, seal=seal), plains


LAYOUT: list[tuple[ExtentKind, int, bytes | int]] = [
    (ExtentKind.DATA, 0, b"A" * 1024),
    (ExtentKind.ZERO, 1024, 4096),
    (ExtentKind.DATA, 8192, NOISE[:512]),
    (ExtentKind.ZERO, 16384, 512),
]


def verify(opener: Opener, batch: Batch) -> dict[int, bytes]:
    """What the master target does before applying anything: check the table, then open every extent."""
    opener.check_batch(batch.generation, batch.sequence, batch.table_bytes(), batch.seal)
    return {
        e.offset: opener.open(batch.generation, batch.sequence, e.offset, e.length, e.payload)
        for e in batch.extents
        if e.kind == ExtentKind.DATA
    }


def test_batch_round_trip_through_the_wire(sealer: Sealer, opener: Opener) -> None:
    batch, plains = make_batch(sealer, LAYOUT)
    frame = batch.encode()
    back = decode_message(decode_header(frame), memoryview(frame)[HEADER_SIZE:])
    assert isinstance(back, Batch)
    assert verify(opener, back) == plains


def _replace_extent(batch: Batch, i: int, **changes: object) -> Batch:
    extents = list(batch.extents)
    extents[i] = dataclasses.replace(extents[i], **changes)
    return dataclasses.replace(batch, extents=tuple(extents))


def _tampered_batches(batch: Batch) -> dict[str, Batch]:
    e = batch.extents
    return {
        "data-turned-to-zero": _replace_extent(batch, 2, kind=ExtentKind.ZERO, payload=b""),
        "zero-extent-dropped": dataclasses.replace(batch, extents=e[:3]),
        "data-extent-dropped": dataclasses.replace(batch, extents=(e[0], e[1], e[3])),
        "zero-extent-moved": _replace_extent(batch, 3, offset=16384 + SECTOR),
        "zero-extent-lengthened": _replace_extent(batch, 1, length=4096 + SECTOR),
        "zero-extent-shortened": _replace_extent(batch, 1, length=4096 - SECTOR),
        "zero-extent-added": dataclasses.replace(batch, extents=(*e, Extent(ExtentKind.ZERO, 65536, 512))),
        "generation-changed": dataclasses.replace(batch, generation=GEN + 1),
        "kind-changed": dataclasses.replace(batch, kind=BatchKind.RESYNC),
        "cursor-changed": dataclasses.replace(batch, cursor=4096),
        "flags-changed": dataclasses.replace(batch, flags=1),
        "replayed-to-next-sequence": dataclasses.replace(batch, sequence=SEQ + 1),
        "replayed-to-earlier-sequence": dataclasses.replace(batch, sequence=SEQ - 1),
    }


@pytest.mark.parametrize("name", sorted(_tampered_batches(make_batch(Sealer(KEY, UID), LAYOUT)[0])))
def test_check_batch_detects_a_changed_table_or_slot(sealer: Sealer, opener: Opener, name: str) -> None:
    batch, _ = make_batch(sealer, LAYOUT)
    verify(opener, batch)
    bad = _tampered_batches(batch)[name]
    with pytest.raises(EnvelopeError, match="failed authentication"):
        opener.check_batch(bad.generation, bad.sequence, bad.table_bytes(), bad.seal)


def test_whole_batch_replayed_to_another_sequence_fails(sealer: Sealer, opener: Opener) -> None:
    # Even with a valid table and valid extents, the seals name the sequence they were made for.
    batch, _ = make_batch(sealer, LAYOUT)
    replay = dataclasses.replace(batch, sequence=SEQ + 10)
    with pytest.raises(EnvelopeError):
        verify(opener, replay)
    # ... and so does the extent check on its own.
    e = batch.extents[0]
    with pytest.raises(EnvelopeError):
        opener.open(GEN, SEQ + 10, e.offset, e.length, e.payload)


def test_batch_seal_from_another_disk_fails(sealer: Sealer) -> None:
    batch, _ = make_batch(sealer, LAYOUT)
    with pytest.raises(EnvelopeError):
        Opener(KEY, OTHER_UID, MAX_EXTENT).check_batch(GEN, SEQ, batch.table_bytes(), batch.seal)


def test_batch_seal_of_another_batch_fails(sealer: Sealer, opener: Opener) -> None:
    a, _ = make_batch(sealer, LAYOUT)
    b, _ = make_batch(sealer, LAYOUT)  # same table, same slot, different nonce
    # The table seal binds the table and slot only; each extent's own seal binds its bytes.
    opener.check_batch(GEN, SEQ, a.table_bytes(), b.seal)
    other, _ = make_batch(sealer, LAYOUT[:2])
    with pytest.raises(EnvelopeError):
        opener.check_batch(GEN, SEQ, a.table_bytes(), other.seal)


@FAST
@given(data=st.data())
def test_any_byte_of_table_or_seal_tampered_is_detected(data: st.DataObject) -> None:
    sealer, opener = Sealer(KEY, UID), Opener(KEY, UID, MAX_EXTENT)
    batch, _ = make_batch(sealer, LAYOUT)
    table, seal = bytearray(batch.table_bytes()), bytearray(batch.seal)
    target = data.draw(st.sampled_from(["table", "seal"]))
    buf = table if target == "table" else seal
    buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    with pytest.raises(EnvelopeError):
        opener.check_batch(GEN, SEQ, bytes(table), bytes(seal))


@pytest.mark.parametrize("size", [0, SEAL_SIZE - 1, SEAL_SIZE + 1])
def test_batch_seal_of_wrong_size(opener: Opener, size: int) -> None:
    with pytest.raises(EnvelopeError, match="wrong size"):
        opener.check_batch(GEN, SEQ, b"table", bytes(size))


def test_batch_and_extent_domains_are_separate(sealer: Sealer, opener: Opener) -> None:
    # A batch tag over some bytes is not an extent seal for an empty extent at offset 0, nor vice versa.
    tag = sealer.seal_batch(GEN, SEQ, b"")
    with pytest.raises(EnvelopeError):
        opener.open(GEN, SEQ, 0, 0, b"\0" + tag + bytes(16))
    with pytest.raises(EnvelopeError):
        opener.check_batch(GEN, SEQ, b"", sealer.seal(GEN, SEQ, 0, b"x")[1 : 1 + SEAL_SIZE])


# ---- markers --------------------------------------------------------------------------------------------


def test_marker_seal_covers_its_meta(sealer: Sealer, opener: Opener) -> None:
    meta = {"generation": GEN, "kind": "initial-complete"}
    marker = Marker(7, SEQ, meta, sealer.seal_batch(GEN, SEQ, meta_bytes(meta)))
    frame = marker.encode()
    back = decode_message(decode_header(frame), memoryview(frame)[HEADER_SIZE:])
    assert isinstance(back, Marker)
    opener.check_batch(back.generation, back.sequence, back.meta_bytes(), back.seal)
    for changed in ({**meta, "kind": "recovery-point"}, {**meta, "generation": GEN + 1}, {**meta, "x": 1}):
        with pytest.raises(EnvelopeError):
            opener.check_batch(GEN, SEQ, meta_bytes(changed), back.seal)
    with pytest.raises(EnvelopeError):
        opener.check_batch(GEN, SEQ + 1, back.meta_bytes(), back.seal)


def test_one_opener_serves_many_threads_at_once() -> None:
    """The master target verifies several batches in parallel with one Opener per disk."""
    from concurrent.futures import ThreadPoolExecutor

    sealer = Sealer(KEY, UID)
    blocks = [(b"text %d " % i) * 40_000 for i in range(16)]
    sealed = [sealer.seal(1, i, 0, b) for i, b in enumerate(blocks)]
    opener = Opener(KEY, UID, MAX_EXTENT)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            out = list(pool.map(lambda i: opener.open(1, i, 0, len(blocks[i]), sealed[i]), range(16)))
            assert out == blocks


def test_one_sealer_seals_in_a_pool_as_it_does_alone() -> None:
    """The master target seals a group's old contents in a pool of threads with the disk's one Sealer,
    from a generator that reads them: the same runs, in the same order, each opening to its plaintext."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(9)
    disk = bytearray()
    for i in range(48):
        n = rng.randint(1, 48) * 4096
        disk += bytes(n) if i % 3 == 0 else rng.randbytes(n) if i % 3 == 1 else ((b"line %d " % i) * n)[:n]
    cuts = sorted(rng.sample(range(1, len(disk) // 4096), 30))
    spans = [(a * 4096, b * 4096) for a, b in zip([0, *cuts], [*cuts, len(disk) // 4096], strict=True)]
    pieces = [(a, memoryview(disk)[a:b]) for a, b in spans[::2]]  # every other span: gaps between pieces
    sealer = Sealer(KEY, UID, 1)
    opener = Opener(KEY, UID, MAX_EXTENT)
    alone = seal_pieces(sealer, GEN, SEQ, pieces)
    with ThreadPoolExecutor(4) as pool:
        pooled = seal_pieces(sealer, GEN, SEQ, (p for p in pieces), pool)
    assert [r[:3] for r in pooled] == [r[:3] for r in alone]
    assert sum(n for _, _, n, _ in pooled) == sum(len(d) for _, d in pieces)
    for zero, off, n, sealed in pooled:
        want = bytes(disk[off : off + n])
        assert (want == bytes(n)) if zero else opener.open(GEN, SEQ, off, n, sealed) == want


def test_threads_sealing_with_one_sealer_never_share_a_nonce() -> None:
    """The master target seals undo records with one Sealer from a pool of threads: each thread draws its
    nonces from its own pool, so no two seals get the same nonce (GCM's one rule)."""
    import threading

    sealer = Sealer(KEY, UID)
    nonces: list[bytes] = []
    lock = threading.Lock()

    def seal_many() -> None:
        mine = [sealer.seal(GEN, SEQ, OFF, b"x" * 512)[1 : 1 + NONCE_SIZE] for _ in range(3000)]
        with lock:
            nonces.extend(mine)

    threads = [threading.Thread(target=seal_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(nonces) == 12000 and len(set(nonces)) == 12000
