"""Checksum trees (leaf hashes, levels, coarse-to-fine comparison) and the sealed resync hash answers."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.proto import hashtree
from standby.proto.envelope import open_hashes, seal_hashes
from standby.proto.errors import EnvelopeError
from standby.proto.hashtree import FAN, HASH, LEAF, READ_CHUNK

Reader = Callable[[int, int], bytes | memoryview]


def reader(buf: bytes, calls: list[tuple[int, int]] | None = None, *, view: bool = False) -> Reader:
    def read(pos: int, n: int) -> bytes | memoryview:
        assert 0 <= pos and n > 0 and pos + n <= len(buf), (pos, n)
        if calls is not None:
            calls.append((pos, n))
        return memoryview(buf)[pos : pos + n] if view else buf[pos : pos + n]

    return read


def brute_leaves(buf: bytes, leaf: int = LEAF) -> bytes:
    return b"".join(xxhash.xxh3_128_digest(buf[i : i + leaf]) for i in range(0, len(buf), leaf))


def pattern(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


# -- leaf_hashes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 100, LEAF - 1, LEAF, LEAF + 1, 3 * LEAF + 17, 64 * LEAF, 300_001])
def test_leaf_hashes_small(size: int) -> None:
    buf = pattern(size)
    out = hashtree.leaf_hashes(reader(buf), size)
    assert len(out) == -(-size // LEAF) * HASH
    assert bytes(out) == brute_leaves(buf)
    # the last leaf is hashed short, not padded
    assert out[-HASH:] == xxhash.xxh3_128_digest(buf[(size - 1) // LEAF * LEAF :])


def test_leaf_hashes_empty_disk_reads_nothing() -> None:
    calls: list[tuple[int, int]] = []
    assert hashtree.leaf_hashes(reader(b"", calls), 0) == b""
    assert calls == []


@pytest.mark.parametrize(
    "size", [READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1, READ_CHUNK + LEAF, 2 * READ_CHUNK, 2 * READ_CHUNK + 5]
)
def test_leaf_hashes_read_chunk_boundaries(size: int) -> None:
    buf = pattern(size, size)
    calls: list[tuple[int, int]] = []
    progress: list[int] = []
    out = hashtree.leaf_hashes(reader(buf, calls, view=True), size, progress=progress.append)
    assert bytes(out) == brute_leaves(buf)
    # reads are consecutive, at most READ_CHUNK, and cover the disk exactly; progress follows them
    assert [pos for pos, _ in calls] == list(range(0, size, READ_CHUNK))
    assert all(n <= READ_CHUNK for _, n in calls)
    assert sum(n for _, n in calls) == size
    assert progress == [pos + n for pos, n in calls]
    assert progress[-1] == size


@pytest.mark.parametrize("leaf", [512, 3000, 4095, 65536])
def test_leaf_hashes_other_leaf_sizes_stay_leaf_aligned_across_chunks(leaf: int) -> None:
    size = READ_CHUNK + 3 * leaf + 7
    buf = pattern(size, leaf)
    calls: list[tuple[int, int]] = []
    out = hashtree.leaf_hashes(reader(buf, calls), size, leaf)
    assert bytes(out) == brute_leaves(buf, leaf)
    assert all(pos % leaf == 0 for pos, _ in calls)


def test_leaf_hashes_small_read_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    # many chunks, one of which ends exactly at the disk's end
    monkeypatch.setattr(hashtree, "READ_CHUNK", 4 * LEAF)
    size = 12 * LEAF
    buf = pattern(size)
    calls: list[tuple[int, int]] = []
    assert bytes(hashtree.leaf_hashes(reader(buf, calls), size)) == brute_leaves(buf)
    assert calls == [(0, 4 * LEAF), (4 * LEAF, 4 * LEAF), (8 * LEAF, 4 * LEAF)]


def test_leaf_hashes_short_read_is_an_error() -> None:
    buf = pattern(3 * LEAF)

    def short(pos: int, n: int) -> bytes:
        return buf[pos : pos + n - 1]

    with pytest.raises(OSError, match="short read"):
        hashtree.leaf_hashes(short, len(buf))


# -- levels ------------------------------------------------------------------------------------------------


def expected_counts(n: int) -> list[int]:
    counts = [n]
    while counts[-1] > 1:
        counts.append(-(-counts[-1] // FAN))
    return counts


@pytest.mark.parametrize("n", [1, 2, FAN - 1, FAN, FAN + 1, FAN * FAN, FAN * FAN + 1, 3 * FAN * FAN + 5])
def test_build_levels(n: int) -> None:
    leaves = pattern(n * HASH, n)
    levels = hashtree.build(leaves)
    assert [hashtree.count(level) for level in levels] == expected_counts(n)
    assert all(len(level) % HASH == 0 for level in levels)
    assert levels[0] == leaves and hashtree.count(levels[-1]) == 1
    for below, above in zip(levels, levels[1:], strict=False):
        # every parent is the hash of its (up to FAN) children's hashes, concatenated
        for p in range(hashtree.count(above)):
            kids = hashtree.children([p], hashtree.count(below))
            assert hashtree.pick(above, [p]) == xxhash.xxh3_128_digest(hashtree.pick(below, kids))


def test_build_empty_is_one_empty_level() -> None:
    assert hashtree.build(b"") == [b""]


def test_children() -> None:
    assert hashtree.children([], 100) == []
    assert hashtree.children([0], 100) == list(range(FAN))
    assert hashtree.children([1], 100) == list(range(FAN, 100))  # the last parent has fewer children
    assert hashtree.children([0], 3) == [0, 1, 2]
    assert hashtree.children([2, 0], 3 * FAN) == list(range(2 * FAN, 3 * FAN)) + list(range(FAN))


def test_pick() -> None:
    level = b"".join(bytes([i]) * HASH for i in range(10))
    assert hashtree.pick(level, []) == b""
    assert hashtree.pick(level, [3]) == bytes([3]) * HASH
    assert hashtree.pick(level, [9, 0, 9]) == bytes([9]) * HASH + bytes([0]) * HASH + bytes([9]) * HASH
    assert hashtree.pick(bytearray(level), [1]) == bytes([1]) * HASH


def test_differing() -> None:
    a = b"".join(bytes([i]) * HASH for i in range(4))
    b = bytearray(a)
    b[HASH * 2] ^= 1  # index 7's hash (third in the list)
    b[-1] ^= 0x80  # index 9's hash (last)
    assert hashtree.differing([5, 6, 7, 9], a, bytes(b)) == [7, 9]
    assert hashtree.differing([5, 6, 7, 9], a, a) == []
    assert hashtree.differing([], b"", b"") == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 199), max_size=300), st.randoms(use_true_random=False))
def test_pick_and_differing_agree_with_one_by_one(indexes: list[int], rng: random.Random) -> None:
    """pick takes runs of consecutive indexes at once, differing screens several hashes at once: the same
    answers as one hash at a time, wherever the runs and the differences fall."""
    level = rng.randbytes(200 * HASH)
    assert hashtree.pick(level, indexes) == b"".join(level[i * HASH : (i + 1) * HASH] for i in indexes)
    ours = rng.randbytes(len(indexes) * HASH)
    theirs = bytearray(ours)
    flipped = sorted(rng.sample(range(len(indexes)), rng.randint(0, len(indexes))))
    for k in flipped:
        theirs[k * HASH + rng.randrange(HASH)] ^= 1 << rng.randrange(8)
    assert hashtree.differing(indexes, ours, bytes(theirs)) == [indexes[k] for k in flipped]


@pytest.mark.parametrize(
    ("indexes", "ours", "theirs"),
    [
        ([0, 1], bytes(2 * HASH), bytes(2 * HASH - 1)),  # theirs short
        ([0, 1], bytes(2 * HASH + 1), bytes(2 * HASH)),  # ours long
        ([0, 1], bytes(HASH), bytes(HASH)),  # both agree but too few for the indexes
        ([0], bytes(2 * HASH), bytes(2 * HASH)),  # too many
        ([], bytes(HASH), bytes(HASH)),
    ],
)
def test_differing_rejects_mismatched_lengths(indexes: list[int], ours: bytes, theirs: bytes) -> None:
    with pytest.raises(ValueError):
        hashtree.differing(indexes, ours, theirs)


def test_leaf_extents() -> None:
    size = 10 * LEAF + 100
    assert hashtree.leaf_extents([], size) == []
    assert hashtree.leaf_extents([0], size) == [(0, LEAF)]
    assert hashtree.leaf_extents([1, 2, 3, 7], size) == [(LEAF, 3 * LEAF), (7 * LEAF, LEAF)]
    assert hashtree.leaf_extents([10], size) == [(10 * LEAF, 100)]  # the short last leaf
    assert hashtree.leaf_extents([8, 9, 10], size) == [(8 * LEAF, 2 * LEAF + 100)]
    assert hashtree.leaf_extents([0, 2], 1200, leaf=500) == [(0, 500), (1000, 200)]
    assert hashtree.leaf_extents([0, 1], 700, leaf=500) == [(0, 700)]


# -- coarse to fine ----------------------------------------------------------------------------------------


def compare(a: bytes, b: bytes, leaf: int) -> tuple[list[int], int, int]:
    """Walk both trees from the top down, as resync does: (differing leaves, levels visited, hashes compared)."""
    size = len(a)
    ta = hashtree.build(hashtree.leaf_hashes(reader(a), size, leaf))
    tb = hashtree.build(hashtree.leaf_hashes(reader(b), size, leaf))
    assert len(ta) == len(tb)
    level = len(ta) - 1
    indexes = list(range(hashtree.count(ta[level])))
    visited = compared = 0
    while True:
        visited += 1
        compared += len(indexes)
        diff = hashtree.differing(indexes, hashtree.pick(ta[level], indexes), hashtree.pick(tb[level], indexes))
        if level == 0 or not diff:
            return (diff if level == 0 else []), visited, compared
        level -= 1
        indexes = hashtree.children(diff, hashtree.count(ta[level]))


def brute_differing(a: bytes, b: bytes, leaf: int) -> list[int]:
    return [i // leaf for i in range(0, len(a), leaf) if a[i : i + leaf] != b[i : i + leaf]]


@st.composite
def buffer_pairs(draw: st.DrawFn) -> tuple[bytes, bytes, int, set[int]]:
    leaf = draw(st.sampled_from([64, 100, LEAF]))
    # up to a little over FAN**2 (+1) leaves with the small leaves: three or four levels
    n_leaves = draw(st.one_of(st.integers(1, 3 * FAN), st.integers(FAN * FAN - 2, FAN * FAN + 70)))
    if leaf == LEAF:
        n_leaves = min(n_leaves, 300)
    size = max(1, n_leaves * leaf - draw(st.integers(0, leaf - 1)))
    a = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    positions = set(draw(st.lists(st.integers(0, size - 1), max_size=8)))
    b = bytearray(a)
    for p in positions:
        b[p] ^= draw(st.integers(1, 255))
    return a, bytes(b), leaf, positions


@settings(max_examples=80, deadline=None)
@given(buffer_pairs())
def test_coarse_to_fine_finds_exactly_the_differing_leaves(case: tuple[bytes, bytes, int, set[int]]) -> None:
    a, b, leaf, positions = case
    leaves, visited, compared = compare(a, b, leaf)
    expected = brute_differing(a, b, leaf)
    assert leaves == expected
    assert sorted({p // leaf for p in positions}) == expected
    levels = len(hashtree.build(hashtree.leaf_hashes(reader(a), len(a), leaf)))
    if not positions:
        assert visited == 1 and compared == 1  # equal disks: only the single top node is compared
    else:
        assert visited == levels
        assert compared <= 1 + (levels - 1) * len(positions) * FAN  # never the whole tree
    # the extents to ship cover every differing byte and nothing but differing leaves
    extents = hashtree.leaf_extents(leaves, len(a), leaf)
    for p in positions:
        assert any(off <= p < off + n for off, n in extents)
    assert sum(n for _, n in extents) == sum(min(leaf, len(a) - ix * leaf) for ix in leaves)


def test_coarse_to_fine_default_leaf_multi_level() -> None:
    size = FAN * LEAF * 3 + 1234  # 193 leaves: levels 193, 4, 1
    a = pattern(size, 7)
    b = bytearray(a)
    b[0] ^= 1
    b[FAN * LEAF + 5] ^= 1
    b[size - 1] ^= 1
    leaves, visited, _ = compare(a, bytes(b), LEAF)
    assert leaves == [0, FAN, size // LEAF]
    assert visited == 3
    assert compare(a, a, LEAF)[1:] == (1, 1)


# -- sealed hash answers -----------------------------------------------------------------------------------

KEY = bytes(range(32))
UID = uuid.UUID(int=0x1234).bytes
QUERY = b"query:" + bytes(16)


def test_seal_hashes_round_trip() -> None:
    hashes = os.urandom(HASH * 50)
    sealed = seal_hashes(KEY, UID, 3, QUERY, hashes)
    assert hashes not in sealed
    assert open_hashes(KEY, UID, 3, QUERY, sealed) == hashes
    assert open_hashes(KEY, UID, 3, b"", seal_hashes(KEY, UID, 3, b"", b"")) == b""
    # random nonces: sealing twice gives different answers
    assert seal_hashes(KEY, UID, 3, QUERY, hashes) != sealed


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


SEALED = seal_hashes(KEY, UID, 3, QUERY, bytes(range(64)))


@pytest.mark.parametrize(
    ("key", "uid", "generation", "query", "sealed"),
    [
        (bytes(32), UID, 3, QUERY, SEALED),  # wrong key
        (KEY, uuid.UUID(int=0x1235).bytes, 3, QUERY, SEALED),  # another disk
        (KEY, UID, 4, QUERY, SEALED),  # another generation
        (KEY, UID, 3, QUERY[:-1] + b"\x01", SEALED),  # another query
        (KEY, UID, 3, QUERY + b"\x00", SEALED),  # a longer query
        (KEY, UID, 3, b"", SEALED),
        (KEY, UID, 3, QUERY, SEALED[:-1]),  # truncated
        (KEY, UID, 3, QUERY, SEALED + b"\x00"),  # extended
        (KEY, UID, 3, QUERY, b""),
        (KEY, UID, 3, QUERY, SEALED[:5]),  # shorter than a nonce
    ],
)
def test_open_hashes_rejects(key: bytes, uid: bytes, generation: int, query: bytes, sealed: bytes) -> None:
    with pytest.raises(EnvelopeError):
        open_hashes(key, uid, generation, query, sealed)


def test_open_hashes_rejects_every_flipped_bit() -> None:
    for bit in range(len(SEALED) * 8):  # nonce, ciphertext and tag
        with pytest.raises(EnvelopeError):
            open_hashes(KEY, UID, 3, QUERY, _flip(SEALED, bit))


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("size", [100, 3 * 4096 + 512, 8 << 20, 4 * (8 << 20) + 5 * 4096 + 512, 40 << 20])
def test_parallel_leaf_hashes_equal_sequential(size: int, threads: int) -> None:
    data = random.Random(size).randbytes(size)
    seen: list[int] = []

    def read(pos: int, n: int) -> memoryview:
        return memoryview(data)[pos : pos + n]

    assert hashtree.leaf_hashes(read, size, threads=threads, progress=seen.append) == hashtree.leaf_hashes(read, size)
    assert seen and max(seen) == size
