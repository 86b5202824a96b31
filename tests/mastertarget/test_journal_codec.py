"""Retention-journal records: round trip, authentication (and its domain), torn and corrupted tails."""

from __future__ import annotations

import json
import os
import random

import pytest

from standby.mastertarget.journal_codec import (
    GROUP_END_TYPE,
    UNDO_TYPE,
    JournalError,
    decode_group_end,
    decode_undo,
    encode_group_end,
    encode_undo,
    scan,
    undo_opener,
    undo_sealer,
)
from standby.proto.envelope import Opener, Sealer
from standby.proto.errors import EnvelopeError
from standby.proto.frames import HEADER_SIZE
from standby.proto.messages import MAX_BATCH_LOGICAL

KEY, UID = os.urandom(32), os.urandom(16)


def old_contents(seed: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    return [
        (0, rng.randbytes(4096)),
        (1 << 20, bytes(128 * 1024) + rng.randbytes(8192)),  # zeros become a zero extent
        (5 << 20, b"log line\n" * 7000 + bytes(4096 - (63000 % 4096))),
    ]


def test_undo_round_trip_with_zero_runs() -> None:
    pieces = old_contents(1)
    rec = encode_undo(3, 42, 2, pieces, undo_sealer(KEY, UID))
    s = scan(rec)
    assert s.problem is None and not s.torn and len(s.records) == 1
    ftype, disk, seq, payload = s.records[0]
    assert (ftype, disk, seq) == (UNDO_TYPE, 3, 42)
    u = decode_undo(disk, seq, payload, undo_opener(KEY, UID))
    assert u.generation == 2
    rebuilt: dict[int, bytes] = {}
    for (off, data), n in zip(u.extents, u.lengths, strict=True):
        rebuilt[off] = data if data is not None else bytes(n)
    for off, data in pieces:
        got = b"".join(rebuilt[o] for o in sorted(rebuilt) if off <= o < off + len(data))
        assert got == data
    assert any(d is None for _, d in u.extents)


def test_undo_needs_its_key_sequence_and_domain() -> None:
    rec = encode_undo(3, 42, 2, old_contents(2), undo_sealer(KEY, UID))
    _, disk, seq, payload = scan(rec).records[0]
    with pytest.raises(JournalError):
        decode_undo(disk, seq + 1, payload, undo_opener(KEY, UID))  # moved to another batch
    with pytest.raises(JournalError):
        decode_undo(disk, seq, payload, undo_opener(os.urandom(32), UID))
    with pytest.raises(JournalError):  # a wire opener (batch domain) refuses undo ciphertext
        decode_undo(disk, seq, payload, Opener(KEY, UID, MAX_BATCH_LOGICAL))
    flipped = bytearray(payload)
    flipped[-5] ^= 1
    with pytest.raises(JournalError):
        decode_undo(disk, seq, flipped, undo_opener(KEY, UID))


def test_undo_opened_only_where_wanted() -> None:
    """A rollback opens only the extents it writes: those meeting `wanted`, whole and authenticated; the
    others are left out unopened, so damage there cannot matter (the table itself is still checked)."""
    pieces = [(i << 20, os.urandom(4096)) for i in range(4)]  # four separate extents, 1 MiB apart
    rec = encode_undo(3, 42, 2, pieces, undo_sealer(KEY, UID))
    _, disk, seq, payload = scan(rec).records[0]
    opener = undo_opener(KEY, UID)
    u = decode_undo(disk, seq, payload, opener, [((1 << 20) + 4000, (1 << 20) + 4001), (3 << 20, (3 << 20) + 1)])
    assert u.extents == ((1 << 20, pieces[1][1]), (3 << 20, pieces[3][1])) and u.lengths == (4096, 4096)
    assert decode_undo(disk, seq, payload, opener, [(4096, 1 << 20)]).extents == ()  # between extents
    assert len(decode_undo(disk, seq, payload, opener, [(0, 4 << 20)]).extents) == 4
    damaged = bytearray(payload)
    damaged[-5] ^= 1  # inside the last extent's ciphertext
    assert len(decode_undo(disk, seq, damaged, opener, [(0, 4096)]).extents) == 1
    with pytest.raises(JournalError):
        decode_undo(disk, seq, damaged, opener, [(3 << 20, (3 << 20) + 4096)])
    table = bytearray(payload)
    table[8] ^= 1  # the extent table: refused whatever is wanted
    with pytest.raises(JournalError):
        decode_undo(disk, seq, table, opener, [])


def test_wire_extents_do_not_open_as_undo_and_back() -> None:
    data = os.urandom(4096)
    wire = Sealer(KEY, UID).seal(2, 42, 0, data)
    undo = undo_sealer(KEY, UID).seal(2, 42, 0, data)
    with pytest.raises(EnvelopeError):
        undo_opener(KEY, UID).open(2, 42, 0, 4096, wire)
    with pytest.raises(EnvelopeError):
        Opener(KEY, UID, MAX_BATCH_LOGICAL).open(2, 42, 0, 4096, undo)


def test_group_end_round_trip_and_validation() -> None:
    meta = {"generation": 2, "kind": "point", "time": 1.8e9, "consistency": "crash-consistent", "tag": "t"}
    s = scan(encode_group_end(3, 43, meta))
    ftype, disk, seq, payload = s.records[0]
    assert ftype == GROUP_END_TYPE and decode_group_end(disk, seq, payload).meta == meta
    with pytest.raises(JournalError):
        encode_group_end(3, 43, {"kind": "point"})
    with pytest.raises(JournalError):
        decode_group_end(3, 43, b"{not json")


@pytest.mark.parametrize(
    "damage, field",
    [
        ({"time": "soon"}, "time"),
        ({"time": 1.5}, "time"),  # not a wall-clock time
        ({"consistency": "mostly"}, "consistency"),
        ({"consistency": None}, "point needs"),
        ({"kind": "later"}, "kind"),
        ({"generation": True}, "generation"),
        ({"first": -1}, "first"),
    ],
)
def test_a_group_end_whose_meta_names_no_point_is_refused_on_read(damage: dict[str, object], field: str) -> None:
    """Behind a valid checksum (a crafted or mis-written file) the meta is checked again, as the agent's marker
    was: the journal refuses to open rather than list a point it cannot name (promise 9)."""
    meta = {"generation": 2, "kind": "point", "time": 1.8e9, "consistency": "crash-consistent", **damage}
    with pytest.raises(JournalError, match=f"group end 43: .*{field}"):
        decode_group_end(3, 43, json.dumps(meta).encode())
    with pytest.raises(JournalError, match="beyond"):
        decode_group_end(3, 2**63, json.dumps({"generation": 1, "kind": "batch"}).encode())


def segment() -> bytes:
    sealer = undo_sealer(KEY, UID)
    out = b""
    for seq in range(1, 4):
        out += encode_undo(1, seq, 1, old_contents(seq), sealer)
        out += encode_group_end(1, seq, {"generation": 1, "kind": "batch"})
    return out


def test_every_cut_of_the_last_record_is_a_torn_tail() -> None:
    full = segment()
    last = encode_group_end(1, 4, {"generation": 1, "kind": "batch"})
    whole = full + last
    for cut in range(len(full) + 1, len(whole)):
        s = scan(whole[:cut])
        assert s.torn and s.problem is None and s.good_end == len(full), cut
        assert len(s.records) == 6


def test_damage_before_the_tail_is_corruption_not_a_tear() -> None:
    full = bytearray(segment())
    first_len = len(encode_undo(1, 1, 1, old_contents(1), undo_sealer(KEY, UID)))
    full[first_len + HEADER_SIZE + 3] ^= 0xFF  # inside the second record's payload, records follow it
    s = scan(bytes(full))
    assert not s.torn and s.problem and len(s.records) == 1
