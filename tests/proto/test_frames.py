"""Frame and record codec (`standby.proto.frames`): round trips, truncation, corruption, limits, scanning.

The header layout is rebuilt here from the documented diagram (not from the module's private structs), so
these tests also pin the wire format.
"""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.proto.errors import LocalProtocolError, RemoteProtocolError
from standby.proto.frames import (
    HEADER_SIZE,
    MAGIC,
    MAX_DISK,
    MAX_PAYLOAD,
    MAX_SEQUENCE,
    VERSION,
    FrameHeader,
    check_payload,
    decode_header,
    encode_frame,
    iter_frames,
    scan_records,
)

FAST = settings(max_examples=60, deadline=None)

# magic 4s | version u8 | type u8 | flags u16 | disk u32 | sequence u64 | length u32 | payload xxh64 u64
_DOC_HEAD = struct.Struct(">4sBBHIQIQ")

HEADER_CODES = {"bad-magic", "bad-version", "bad-header-checksum", "oversized", "truncated"}

ftypes = st.integers(0, 255)
disks = st.integers(0, MAX_DISK)
sequences = st.integers(0, MAX_SEQUENCE)
flag_values = st.integers(0, 0xFFFF)
payloads = st.binary(max_size=300)
frame_args = st.tuples(ftypes, disks, sequences, payloads)


def raw_header(
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    ftype: int = 1,
    flags: int = 0,
    disk: int = 0,
    sequence: int = 0,
    length: int = 0,
    payload_hash: int | None = None,
    payload: bytes = b"",
) -> bytes:
    """A header with a *valid* header checksum over whatever fields we chose."""
    if payload_hash is None:
        payload_hash = xxhash.xxh64_intdigest(payload)
    head = _DOC_HEAD.pack(magic, version, ftype, flags, disk, sequence, length, payload_hash)
    return head + struct.pack(">I", xxhash.xxh32_intdigest(head))


def expected_code_for_flip(byte_index: int) -> str:
    """Which check catches a flipped bit, given the fixed parse order magic, version, checksum, payload."""
    if byte_index < 4:
        return "bad-magic"
    if byte_index == 4:
        return "bad-version"
    if byte_index < HEADER_SIZE:
        return "bad-header-checksum"
    return "bad-payload-checksum"


def strict_decode(frame: bytes) -> tuple[FrameHeader, bytes]:
    """Decode exactly one frame the way a reader would; raises RemoteProtocolError on any problem."""
    header = decode_header(frame)
    payload = frame[HEADER_SIZE:]
    if len(payload) != header.length:
        raise RemoteProtocolError("truncated", "payload length mismatch")
    check_payload(header, payload)
    return header, payload


# ---- layout and round trip ---------------------------------------------------------------------------


def test_header_is_36_bytes_and_matches_the_documented_layout() -> None:
    assert HEADER_SIZE == 36
    frame = encode_frame(6, 7, 8, b"hello", flags=3)
    assert frame == raw_header(ftype=6, flags=3, disk=7, sequence=8, length=5, payload=b"hello") + b"hello"
    assert frame[:4] == b"STBY"
    assert frame[4] == 1


@FAST
@given(ftype=ftypes, disk=disks, sequence=sequences, payload=payloads, flags=flag_values)
def test_round_trip(ftype: int, disk: int, sequence: int, payload: bytes, flags: int) -> None:
    frame = encode_frame(ftype, disk, sequence, payload, flags=flags)
    assert len(frame) == HEADER_SIZE + len(payload)
    h = decode_header(frame)
    assert (h.version, h.type, h.flags, h.disk, h.sequence, h.length) == (
        VERSION,
        ftype,
        flags,
        disk,
        sequence,
        len(payload),
    )
    check_payload(h, frame[HEADER_SIZE:])
    check_payload(h, memoryview(frame)[HEADER_SIZE:])


def test_decode_header_accepts_memoryview_and_ignores_what_follows() -> None:
    frame = encode_frame(2, 3, 4, b"xyz")
    h = decode_header(memoryview(frame + b"trailing garbage"))
    assert (h.type, h.disk, h.sequence, h.length) == (2, 3, 4, 3)


def test_encode_accepts_memoryview_payload() -> None:
    assert encode_frame(1, 0, 0, memoryview(b"abc")) == encode_frame(1, 0, 0, b"abc")


def test_extreme_field_values_round_trip() -> None:
    h = decode_header(encode_frame(255, MAX_DISK, MAX_SEQUENCE, b""))
    assert (h.type, h.disk, h.sequence, h.length) == (255, MAX_DISK, MAX_SEQUENCE, 0)


@pytest.mark.parametrize(
    "ftype, disk, sequence",
    [(-1, 0, 0), (256, 0, 0), (1, -1, 0), (1, MAX_DISK + 1, 0), (1, 0, -1), (1, 0, MAX_SEQUENCE + 1)],
)
def test_encode_rejects_out_of_range_header_fields(ftype: int, disk: int, sequence: int) -> None:
    with pytest.raises(LocalProtocolError) as exc:
        encode_frame(ftype, disk, sequence, b"")
    assert exc.value.code == "bad-header"


@pytest.mark.parametrize("flags", [-1, 0x10000])
def test_encode_rejects_out_of_range_flags(flags: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(1, 0, 0, b"", flags=flags)


def test_encode_rejects_oversized_payload() -> None:
    with pytest.raises(LocalProtocolError) as exc:
        encode_frame(6, 0, 0, memoryview(bytearray(MAX_PAYLOAD + 1)))
    assert exc.value.code == "oversized"


# ---- truncation ---------------------------------------------------------------------------------------


@FAST
@given(args=frame_args)
def test_every_truncation_is_rejected_never_a_wrong_frame(args: tuple[int, int, int, bytes]) -> None:
    frame = encode_frame(*args)
    for cut in range(len(frame)):
        part = frame[:cut]
        if cut < HEADER_SIZE:
            with pytest.raises(RemoteProtocolError) as exc:
                decode_header(part)
            assert exc.value.code == "truncated"
        else:
            # The header is complete and valid; it announces more than we have.
            assert decode_header(part).length > cut - HEADER_SIZE
        records, good_end, problem = scan_records(part)
        assert records == []
        assert good_end == 0
        assert (problem is None) == (cut == 0)
        if cut:
            assert "torn" in problem


# ---- corruption ---------------------------------------------------------------------------------------


def _flip(frame: bytes, bit: int) -> bytes:
    b = bytearray(frame)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def test_every_single_bit_flip_of_one_frame_is_detected_by_the_right_check() -> None:
    frame = encode_frame(6, 12345, 678, bytes(range(40)), flags=1)
    for bit in range(len(frame) * 8):
        with pytest.raises(RemoteProtocolError) as exc:
            strict_decode(_flip(frame, bit))
        assert exc.value.code == expected_code_for_flip(bit // 8), bit


@FAST
@given(args=frame_args, data=st.data())
def test_any_bit_flip_is_a_remote_protocol_error(args: tuple[int, int, int, bytes], data: st.DataObject) -> None:
    frame = encode_frame(*args)
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    bad = _flip(frame, bit)
    with pytest.raises(RemoteProtocolError) as exc:
        strict_decode(bad)
    assert exc.value.code == expected_code_for_flip(bit // 8)
    records, good_end, problem = scan_records(bad)
    assert records == [] and good_end == 0
    assert problem is not None and "offset 0" in problem


@pytest.mark.parametrize("version", [0, 2, 9, 255])
def test_wrong_version_is_bad_version(version: int) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        decode_header(raw_header(version=version))
    assert exc.value.code == "bad-version"
    assert str(version) in str(exc.value)


def test_magic_is_checked_before_version() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        decode_header(raw_header(magic=b"XXXX", version=9))
    assert exc.value.code == "bad-magic"


def test_version_is_checked_before_the_header_checksum() -> None:
    head = bytearray(raw_header(version=9))
    head[-1] ^= 0xFF
    with pytest.raises(RemoteProtocolError) as exc:
        decode_header(bytes(head))
    assert exc.value.code == "bad-version"


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 2**32 - 1])
def test_oversized_length_is_rejected_from_the_header_alone(length: int) -> None:
    # Only the 36 header bytes exist: the reader must refuse without waiting for (or buffering) the payload.
    with pytest.raises(RemoteProtocolError) as exc:
        decode_header(raw_header(length=length))
    assert exc.value.code == "oversized"
    records, good_end, problem = scan_records(raw_header(length=length))
    assert (records, good_end) == ([], 0)
    assert problem is not None and problem.startswith("bad record at offset 0") and "limit" in problem


def test_max_payload_length_is_accepted_in_a_header() -> None:
    assert decode_header(raw_header(length=MAX_PAYLOAD)).length == MAX_PAYLOAD


def test_corrupted_length_is_caught_by_the_header_checksum() -> None:
    frame = bytearray(encode_frame(1, 0, 0, b"abc"))
    frame[20:24] = struct.pack(">I", 2**31)
    with pytest.raises(RemoteProtocolError) as exc:
        decode_header(bytes(frame))
    assert exc.value.code == "bad-header-checksum"


def test_check_payload_rejects_a_different_payload() -> None:
    h = decode_header(encode_frame(1, 0, 0, b"abc"))
    with pytest.raises(RemoteProtocolError) as exc:
        check_payload(h, b"abd")
    assert exc.value.code == "bad-payload-checksum"


# ---- scan_records -------------------------------------------------------------------------------------

frame_lists = st.lists(frame_args, min_size=1, max_size=6)


def _concat(items: list[tuple[int, int, int, bytes]]) -> tuple[bytes, list[int]]:
    frames = [encode_frame(*a) for a in items]
    offsets = [0]
    for f in frames:
        offsets.append(offsets[-1] + len(f))
    return b"".join(frames), offsets


def _assert_records(records, items, offsets) -> None:  # type: ignore[no-untyped-def]
    assert len(records) == len(items)
    for i, (r, (ftype, disk, sequence, payload)) in enumerate(zip(records, items, strict=True)):
        assert (r.offset, r.end) == (offsets[i], offsets[i + 1])
        assert (r.header.type, r.header.disk, r.header.sequence) == (ftype, disk, sequence)
        assert bytes(r.payload) == payload


@FAST
@given(items=frame_lists)
def test_scan_returns_every_record(items: list[tuple[int, int, int, bytes]]) -> None:
    buf, offsets = _concat(items)
    records, good_end, problem = scan_records(buf)
    _assert_records(records, items, offsets)
    assert good_end == len(buf) and problem is None
    assert [(h.type, bytes(p)) for h, p in iter_frames(buf)] == [(a[0], a[3]) for a in items]


@FAST
@given(items=frame_lists, tail=frame_args, data=st.data())
def test_scan_torn_tail_keeps_the_good_prefix(
    items: list[tuple[int, int, int, bytes]], tail: tuple[int, int, int, bytes], data: st.DataObject
) -> None:
    buf, offsets = _concat(items)
    torn = encode_frame(*tail)
    cut = data.draw(st.integers(1, len(torn) - 1))
    records, good_end, problem = scan_records(buf + torn[:cut])
    _assert_records(records, items, offsets)
    assert good_end == len(buf)
    assert problem is not None and "torn" in problem and f"offset {len(buf)}" in problem


@FAST
@given(items=st.lists(frame_args, min_size=2, max_size=6), data=st.data())
def test_scan_corrupted_middle_record_stops_before_it(
    items: list[tuple[int, int, int, bytes]], data: st.DataObject
) -> None:
    buf, offsets = _concat(items)
    victim = data.draw(st.integers(0, len(items) - 1))
    bit = data.draw(st.integers(offsets[victim] * 8, offsets[victim + 1] * 8 - 1))
    bad = _flip(buf, bit)
    records, good_end, problem = scan_records(bad)
    _assert_records(records, items[:victim], offsets)
    assert good_end == offsets[victim]
    assert problem is not None and f"offset {offsets[victim]}" in problem
    with pytest.raises(RemoteProtocolError) as exc:
        list(iter_frames(bad))
    assert exc.value.code == "bad-record"


def test_scan_empty_buffer() -> None:
    assert scan_records(b"") == ([], 0, None)


def test_scan_from_a_start_offset() -> None:
    a, b = encode_frame(1, 0, 0, b"a"), encode_frame(2, 0, 1, b"bb")
    records, good_end, problem = scan_records(a + b, start=len(a))
    assert [r.header.type for r in records] == [2]
    assert records[0].offset == len(a) and good_end == len(a + b) and problem is None


def test_scan_torn_header_tail() -> None:
    a = encode_frame(1, 0, 0, b"a")
    records, good_end, problem = scan_records(a + b"STBY\x01")
    assert len(records) == 1 and good_end == len(a)
    assert problem == f"torn record header at offset {len(a)}"


def test_scan_garbage_after_records_is_reported_as_bad() -> None:
    a = encode_frame(1, 0, 0, b"a")
    records, good_end, problem = scan_records(a + b"\0" * HEADER_SIZE)
    assert len(records) == 1 and good_end == len(a)
    assert problem is not None and problem.startswith(f"bad record at offset {len(a)}") and "magic" in problem


def test_iter_frames_yields_the_good_prefix_before_raising() -> None:
    a = encode_frame(1, 0, 0, b"a")
    seen = []
    with pytest.raises(RemoteProtocolError):
        for h, _ in iter_frames(a + a[:10]):
            seen.append(h.type)
    assert seen == [1]
