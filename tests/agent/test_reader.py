"""Initial-replication reading: zero runs become payload-free extents; data is sealed and opens back."""

from __future__ import annotations

import os
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from standby.agent.reader import ZERO_GRAIN, BatchBuilder, runs
from standby.proto.envelope import Opener
from standby.proto.frames import HEADER_SIZE, decode_header
from standby.proto.messages import MAX_BATCH_LOGICAL, ExtentKind, decode_message


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_runs_alternate_and_cover_everything(pattern):
    buf = b"".join(bytes(ZERO_GRAIN) if z else b"\x01" * ZERO_GRAIN for z in pattern)
    out = runs(memoryview(buf))
    assert out[0][1] == 0 and out[-1][2] == len(buf)
    for (z1, _, e1), (z2, s2, _) in zip(out, out[1:], strict=False):
        assert e1 == s2 and z1 != z2
    for z, a, b in out:
        assert (buf[a:b] == bytes(b - a)) == z


def test_initial_batch_round_trip(tmp_path):
    size = 3 * 1024 * 1024
    img = tmp_path / "disk.img"
    data = bytearray(size)
    data[100_000:300_000] = os.urandom(200_000)
    data[2_000_000:2_100_000] = b"text " * 20_000
    img.write_bytes(bytes(data))
    key, uid = os.urandom(32), uuid.uuid4().bytes
    b = BatchBuilder(str(img), 7, key, uid, 3).initial_batch(1, 5, 0, size)
    frame = b.encode()
    again = decode_message(decode_header(frame[:HEADER_SIZE]), memoryview(frame[HEADER_SIZE:]))
    assert again.cursor == size and again.disk == 7 and again.sequence == 5
    opener = Opener(key, uid, MAX_BATCH_LOGICAL)
    opener.check_batch(1, 5, again.table_bytes(), again.seal)
    rebuilt = bytearray(size)
    zero_bytes = 0
    for e in again.extents:
        if e.kind == ExtentKind.DATA:
            rebuilt[e.offset : e.offset + e.length] = opener.open(1, 5, e.offset, e.length, e.payload)
        else:
            zero_bytes += e.length
    assert rebuilt == data
    assert zero_bytes >= size - 2 * 1024 * 1024  # most of the disk went as zero extents, with no bytes
    assert again.stored_bytes < 300_000 + 100_000  # random data incompressible, text compressed
