"""Typed messages (`standby.proto.messages`): round trips, constructor validation, hostile payloads.

Rule under test: an invalid message cannot be built (LocalProtocolError), and nothing a peer sends can make
`decode_message` raise anything but RemoteProtocolError.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.proto.errors import LocalProtocolError, RemoteProtocolError
from standby.proto.frames import HEADER_SIZE, MAX_CONTROL_PAYLOAD, MAX_DISK, MAX_SEQUENCE, decode_header, encode_frame
from standby.proto.messages import (
    MAX_BATCH_LOGICAL,
    MAX_EXTENTS,
    ROLES,
    SEAL_SIZE,
    SECTOR,
    Ack,
    Batch,
    BatchKind,
    Busy,
    Extent,
    ExtentKind,
    FrameType,
    Goodbye,
    Hello,
    Marker,
    Message,
    Reject,
    Reply,
    Request,
    Welcome,
    decode_message,
    encode,
    meta_bytes,
)

FAST = settings(max_examples=50, deadline=None)
FUZZ = settings(max_examples=200, deadline=None)

SEAL = bytes(range(SEAL_SIZE))
ALL_TYPES: tuple[type, ...] = (Hello, Welcome, Goodbye, Request, Reply, Batch, Marker, Ack, Busy, Reject)


def decode(frame: bytes) -> Message:
    h = decode_header(frame)
    return decode_message(h, memoryview(frame)[HEADER_SIZE:])


def decode_payload(ftype: int, payload: bytes, disk: int = 5, sequence: int = 9) -> Message:
    """decode_message for `payload` under a valid header of type `ftype`."""
    return decode(encode_frame(ftype, disk, sequence, payload))


def assert_remote_error(ftype: int, payload: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as exc:
        decode_payload(ftype, payload)
    return exc.value


def zero(offset: int, length: int = SECTOR) -> Extent:
    return Extent(ExtentKind.ZERO, offset, length)


def data(offset: int, payload: bytes = b"p", length: int = SECTOR) -> Extent:
    return Extent(ExtentKind.DATA, offset, length, payload)


# ---- strategies ---------------------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
text = st.text(max_size=20)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8
)
json_objects = st.dictionaries(text, json_values, max_size=4)


@st.composite
def extents(draw: st.DrawFn) -> tuple[Extent, ...]:
    n = draw(st.integers(1, 8))
    out = []
    pos = draw(st.integers(0, 2**20)) * SECTOR
    for _ in range(n):
        pos += draw(st.integers(0, 4)) * SECTOR  # gap; 0 makes adjacent extents, which are legal
        length = draw(st.integers(1, 64)) * SECTOR
        if draw(st.booleans()):
            out.append(Extent(ExtentKind.DATA, pos, length, draw(st.binary(min_size=1, max_size=80))))
        else:
            out.append(Extent(ExtentKind.ZERO, pos, length))
        pos += length
    return tuple(out)


batches = st.builds(
    Batch,
    disk=u32,
    sequence=u64,
    generation=u32,
    kind=st.sampled_from(BatchKind),
    cursor=u64,
    extents=extents(),
    seal=st.binary(min_size=SEAL_SIZE, max_size=SEAL_SIZE),
    flags=st.integers(0, 255),
)
markers = st.builds(
    Marker,
    disk=u32,
    sequence=u64,
    meta=st.builds(lambda extra, g, k: {**extra, "generation": g, "kind": k}, json_objects, u32, text),
    seal=st.binary(min_size=SEAL_SIZE, max_size=SEAL_SIZE),
)
controls = st.one_of(
    st.builds(
        Hello,
        role=st.sampled_from(ROLES),
        versions=st.lists(st.integers(0, 2**31), min_size=1, max_size=4).map(tuple),
        software=text,
    ),
    st.builds(Welcome, version=st.integers(0, 255), name=text, role=text),
    st.builds(Goodbye, code=text, reason=text),
    st.builds(Request, id=st.integers(0, 2**63), op=text.filter(bool), args=json_objects),
    st.builds(Reply, id=st.integers(0, 2**63), ok=st.booleans(), result=json_objects, code=text, message=text),
    st.builds(Ack, disk=u32, sequence=u64, generation=u32),
    st.builds(
        Busy, disk=u32, sequence=u64, retry_after=st.floats(0, 3600, allow_nan=False, allow_infinity=False), reason=text
    ),
    st.builds(Reject, disk=u32, sequence=u64, code=text, reason=text),
)
messages = st.one_of(controls, batches, markers)


# ---- round trips ----------------------------------------------------------------------------------------


@FUZZ
@given(msg=messages)
def test_every_message_round_trips(msg: Message) -> None:
    frame = encode(msg)
    h = decode_header(frame)
    assert h.type == _frame_type(msg)
    back = decode_message(h, memoryview(frame)[HEADER_SIZE:])
    assert type(back) is type(msg)
    assert back == msg
    assert encode(back) == frame


def _frame_type(msg: Message) -> FrameType:
    return FrameType[type(msg).__name__.upper()]


def test_every_message_type_is_covered_by_the_strategies() -> None:
    assert {t.__name__.upper() for t in ALL_TYPES} == {t.name for t in FrameType}


@FAST
@given(batch=batches)
def test_batch_round_trip_details(batch: Batch) -> None:
    frame = batch.encode()
    h = decode_header(frame)
    assert (h.type, h.disk, h.sequence) == (FrameType.BATCH, batch.disk, batch.sequence)
    back = decode_message(h, memoryview(frame)[HEADER_SIZE:])
    assert isinstance(back, Batch)
    assert back.table_bytes() == batch.table_bytes()
    assert [(e.kind, e.offset, e.length, bytes(e.payload)) for e in back.extents] == [
        (e.kind, e.offset, e.length, bytes(e.payload)) for e in batch.extents
    ]
    assert (back.data_bytes, back.logical_bytes, back.stored_bytes) == (
        batch.data_bytes,
        batch.logical_bytes,
        batch.stored_bytes,
    )
    assert len(frame) == HEADER_SIZE + 20 + 20 * len(batch.extents) + SEAL_SIZE + batch.stored_bytes


def test_mixed_batch_accounting() -> None:
    b = Batch(1, 2, 3, BatchKind.DELTA, 0, (data(0, b"abc"), zero(512, 4096), data(8192, b"zz", 1024)), SEAL)
    assert b.data_bytes == 512 + 1024
    assert b.logical_bytes == 512 + 4096 + 1024
    assert b.stored_bytes == 5
    back = decode(b.encode())
    assert back == b
    assert [e.kind for e in back.extents] == [ExtentKind.DATA, ExtentKind.ZERO, ExtentKind.DATA]


def test_marker_round_trip_and_canonical_meta() -> None:
    c = Marker(3, 10, {"kind": "initial-complete", "generation": 4, "note": [1, 2]}, SEAL)
    back = decode(c.encode())
    assert back == c and isinstance(back, Marker)
    assert back.generation == 4
    assert c.meta_bytes() == meta_bytes(c.meta) == b'{"generation":4,"kind":"initial-complete","note":[1,2]}'


def test_header_fields_are_not_repeated_in_json() -> None:
    frame = encode(Ack(7, 99, 3))
    h = decode_header(frame)
    assert (h.disk, h.sequence) == (7, 99)
    assert json.loads(frame[HEADER_SIZE:]) == {"generation": 3}


def test_control_messages_without_a_disk_use_stream_zero() -> None:
    h = decode_header(encode(Hello("agent")))
    assert (h.disk, h.sequence) == (0, 0)


def test_encode_refuses_a_non_message() -> None:
    with pytest.raises(LocalProtocolError) as exc:
        encode(zero(0))  # type: ignore[arg-type]
    assert exc.value.code == "bad-message"


def test_encode_refuses_an_oversized_control_message() -> None:
    with pytest.raises(LocalProtocolError) as exc:
        encode(Goodbye("x", "y" * MAX_CONTROL_PAYLOAD))
    assert exc.value.code == "oversized"


def test_encode_refuses_a_disk_id_out_of_range() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Ack(MAX_DISK + 1, 0, 0))
    with pytest.raises(LocalProtocolError):
        encode(Ack(0, MAX_SEQUENCE + 1, 0))


# ---- constructor validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: zero(1), id="unaligned-offset"),
        pytest.param(lambda: zero(-512), id="negative-offset"),
        pytest.param(lambda: zero(0, 100), id="unaligned-length"),
        pytest.param(lambda: zero(0, 0), id="zero-length"),
        pytest.param(lambda: zero(0, -512), id="negative-length"),
        pytest.param(lambda: zero(0, 2**32), id="length-over-4GiB"),
        pytest.param(lambda: Extent(ExtentKind.ZERO, 0, SECTOR, b"x"), id="zero-with-payload"),
        pytest.param(lambda: Extent(ExtentKind.DATA, 0, SECTOR, b""), id="data-without-payload"),
        pytest.param(lambda: data(0, b"x", MAX_BATCH_LOGICAL + SECTOR), id="data-extent-too-long"),
    ],
)
def test_invalid_extent(make: Any) -> None:
    with pytest.raises(LocalProtocolError) as exc:
        make()
    assert exc.value.code == "bad-extent"


def _batch(extents: tuple[Extent, ...], seal: bytes = SEAL) -> Batch:
    return Batch(1, 1, 1, BatchKind.DELTA, 0, extents, seal)


@pytest.mark.parametrize(
    "extents, seal",
    [
        pytest.param((), SEAL, id="no-extents"),
        pytest.param((zero(1024), zero(0)), SEAL, id="unsorted"),
        pytest.param((zero(0, 1024), zero(512)), SEAL, id="overlapping"),
        pytest.param((zero(0), zero(0)), SEAL, id="duplicate"),
        pytest.param((data(0, b"x", MAX_BATCH_LOGICAL), data(MAX_BATCH_LOGICAL, b"x")), SEAL, id="too-much-data"),
        pytest.param((zero(0),), SEAL[:-1], id="short-seal"),
        pytest.param((zero(0),), SEAL + b"x", id="long-seal"),
        pytest.param((zero(0),), b"", id="empty-seal"),
    ],
)
def test_invalid_batch(extents: tuple[Extent, ...], seal: bytes) -> None:
    with pytest.raises(LocalProtocolError) as exc:
        _batch(extents, seal)
    assert exc.value.code == "bad-batch"


def test_too_many_extents() -> None:
    many = tuple(zero(i * SECTOR) for i in range(MAX_EXTENTS + 1))
    with pytest.raises(LocalProtocolError):
        _batch(many)
    assert len(_batch(many[:-1]).extents) == MAX_EXTENTS


def test_batch_limits_that_are_legal() -> None:
    _batch((zero(0), zero(512)))  # adjacent
    _batch((data(0, b"x", MAX_BATCH_LOGICAL), zero(MAX_BATCH_LOGICAL, 2**32 - SECTOR)))  # zero extents are free


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Batch(1, 1, 2**32, BatchKind.DELTA, 0, (zero(0),), SEAL), id="generation"),
        pytest.param(lambda: Batch(1, 1, 1, BatchKind.DELTA, 2**64, (zero(0),), SEAL), id="cursor"),
        pytest.param(lambda: Batch(1, 1, 1, BatchKind.DELTA, 0, (zero(0),), SEAL, flags=256), id="flags"),
        pytest.param(lambda: Batch(1, 1, 1, BatchKind.DELTA, 0, (zero(2**64),), SEAL), id="extent-offset"),
    ],
)
def test_out_of_range_batch_fields_are_local_errors(make: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make().encode()


@pytest.mark.parametrize(
    "meta, seal",
    [
        pytest.param({"kind": "x"}, SEAL, id="no-generation"),
        pytest.param({"generation": "1", "kind": "x"}, SEAL, id="string-generation"),
        pytest.param({"generation": 1.0, "kind": "x"}, SEAL, id="float-generation"),
        pytest.param({"generation": 1}, SEAL, id="no-kind"),
        pytest.param({"generation": 1, "kind": 5}, SEAL, id="int-kind"),
        pytest.param({"generation": 1, "kind": "x"}, SEAL[:27], id="short-seal"),
    ],
)
def test_invalid_marker(meta: dict[str, Any], seal: bytes) -> None:
    with pytest.raises(LocalProtocolError) as exc:
        Marker(1, 1, meta, seal)
    assert exc.value.code == "bad-marker"


def test_marker_rejects_bool_generation() -> None:
    with pytest.raises(LocalProtocolError):
        Marker(1, 1, {"generation": True, "kind": "x"}, SEAL)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Hello("nobody"), id="hello-bad-role"),
        pytest.param(lambda: Hello("agent", ()), id="hello-no-versions"),
        pytest.param(lambda: Request(1, ""), id="request-no-op"),
        pytest.param(lambda: Request(-1, "op"), id="request-negative-id"),
        pytest.param(lambda: Request(1, "op", [1]), id="request-list-args"),  # type: ignore[arg-type]
    ],
)
def test_invalid_control_message(make: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make()


def test_messages_are_frozen() -> None:
    msg = Ack(1, 2, 3)
    with pytest.raises(AttributeError):
        msg.generation = 4  # type: ignore[misc]


# ---- malformed payloads: JSON control messages ----------------------------------------------------------

VALID_BODIES: dict[FrameType, dict[str, Any]] = {
    FrameType.HELLO: {"role": "agent", "versions": [1], "software": "standby"},
    FrameType.WELCOME: {"version": 1, "name": "ps1", "role": "agent"},
    FrameType.GOODBYE: {"code": "x", "reason": "y"},
    FrameType.REQUEST: {"id": 1, "op": "enroll", "args": {}},
    FrameType.REPLY: {"id": 1, "ok": True, "result": {}, "code": "", "message": ""},
    FrameType.ACK: {"generation": 1},
    FrameType.BUSY: {"retry_after": 1.5, "reason": "full"},
    FrameType.REJECT: {"code": "x", "reason": "y"},
}
JSON_TYPES = list(VALID_BODIES)

# Wrong values per declared field type: what a hostile or buggy peer might send.
WRONG: dict[str, list[Any]] = {
    "int": ["1", True, False, 1.5, None, [1], {}],
    "str": [1, None, [], {}, True],
    "bool": [1, 0, "true", None],
    "float": ["1.0", None, [], {}],
    "dict": [[], "x", 1, None],
    "versions": ["1", [True], ["1"], [1.5], 1, None, {"a": 1}],
}
FIELD_KIND = {
    "role": "str",
    "versions": "versions",
    "software": "str",
    "version": "int",
    "name": "str",
    "code": "str",
    "reason": "str",
    "id": "int",
    "op": "str",
    "args": "dict",
    "ok": "bool",
    "result": "dict",
    "message": "str",
    "generation": "int",
    "retry_after": "float",
}


def _wrong_type_cases() -> list[Any]:
    cases = []
    for ftype, body in VALID_BODIES.items():
        for field_name in body:
            for value in WRONG[FIELD_KIND[field_name]]:
                cases.append(pytest.param(ftype, field_name, value, id=f"{ftype.name}-{field_name}-{value!r}"))
    return cases


def test_valid_bodies_decode() -> None:
    for ftype, body in VALID_BODIES.items():
        msg = decode_payload(ftype, json.dumps(body).encode())
        assert _frame_type(msg) == ftype


@pytest.mark.parametrize("ftype, field_name, value", _wrong_type_cases())
def test_wrong_field_type_is_remote_error(ftype: FrameType, field_name: str, value: Any) -> None:
    body = {**VALID_BODIES[ftype], field_name: value}
    assert assert_remote_error(ftype, json.dumps(body).encode()).code == "bad-message"


def test_busy_retry_after_bool_is_remote_error() -> None:
    body = {**VALID_BODIES[FrameType.BUSY], "retry_after": True}
    assert_remote_error(FrameType.BUSY, json.dumps(body).encode())


@pytest.mark.parametrize("ftype", JSON_TYPES, ids=lambda t: t.name)
def test_missing_field_is_remote_error(ftype: FrameType) -> None:
    body = VALID_BODIES[ftype]
    required = {
        FrameType.HELLO: ["role"],
        FrameType.WELCOME: ["version", "name", "role"],
        FrameType.GOODBYE: ["code", "reason"],
        FrameType.REQUEST: ["id", "op"],
        FrameType.REPLY: ["id", "ok"],
        FrameType.ACK: ["generation"],
        FrameType.BUSY: ["retry_after", "reason"],
        FrameType.REJECT: ["code", "reason"],
    }[ftype]
    for name in required:
        partial = {k: v for k, v in body.items() if k != name}
        assert assert_remote_error(ftype, json.dumps(partial).encode()).code == "bad-message", name


def test_hello_without_versions_is_remote_error() -> None:
    assert_remote_error(FrameType.HELLO, b'{"role":"agent"}')


@pytest.mark.parametrize("ftype", JSON_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("payload", [b"", b"{", b"\xff\xfe", b"[]", b"1", b'"s"', b"null", b"true", b"{}", b"{}{}"])
def test_garbage_and_non_object_json_is_remote_error(ftype: FrameType, payload: bytes) -> None:
    assert assert_remote_error(ftype, payload).code == "bad-message"


@pytest.mark.parametrize("ftype", JSON_TYPES, ids=lambda t: t.name)
def test_extra_field_is_remote_error(ftype: FrameType) -> None:
    body = {**VALID_BODIES[ftype], "surprise": 1}
    assert assert_remote_error(ftype, json.dumps(body).encode()).code == "bad-message"


def test_oversized_control_payload_is_remote_error() -> None:
    payload = b'{"code":"x","reason":"' + b"y" * MAX_CONTROL_PAYLOAD + b'"}'
    assert assert_remote_error(FrameType.GOODBYE, payload).code == "oversized"


@pytest.mark.parametrize("ftype", [0, 11, 99, 255])
def test_unknown_frame_type_is_remote_error(ftype: int) -> None:
    assert assert_remote_error(ftype, b"{}").code == "bad-type"


def test_disk_and_sequence_come_from_the_header_not_the_json() -> None:
    msg = decode_payload(FrameType.ACK, b'{"generation":1,"disk":77,"sequence":88}', disk=5, sequence=9)
    assert msg == Ack(5, 9, 1)


@pytest.mark.parametrize("ftype", [FrameType.REQUEST, FrameType.HELLO], ids=lambda t: t.name)
def test_deeply_nested_json_is_remote_error(ftype: FrameType) -> None:
    payload = b'{"args":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    assert len(payload) < MAX_CONTROL_PAYLOAD
    assert_remote_error(ftype, payload)


# ---- malformed payloads: BATCH --------------------------------------------------------------------------

_BATCH_HEAD = struct.Struct(">IBBxxIQ")
_EXTENT = struct.Struct(">BxxxQII")


def batch_payload(
    entries: list[tuple[int, int, int, int]],
    payloads: bytes = b"",
    *,
    count: int | None = None,
    kind: int = 1,
    seal: bytes = SEAL,
) -> bytes:
    """Build a BATCH payload by hand from the documented layout. entries: (kind, offset, length, stored)."""
    head = _BATCH_HEAD.pack(1, kind, 0, len(entries) if count is None else count, 0)
    return head + b"".join(_EXTENT.pack(*e) for e in entries) + seal + payloads


def test_hand_built_batch_matches_encoder() -> None:
    b = Batch(5, 9, 1, BatchKind.DELTA, 0, (data(0, b"abc"), zero(512)), SEAL)
    assert b.encode()[HEADER_SIZE:] == batch_payload([(1, 0, 512, 3), (2, 512, 512, 0)], b"abc")
    assert decode_payload(FrameType.BATCH, batch_payload([(1, 0, 512, 3), (2, 512, 512, 0)], b"abc")) == b


D, Z = ExtentKind.DATA, ExtentKind.ZERO


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\0" * 47, id="shorter-than-head-and-seal"),
        pytest.param(batch_payload([]), id="zero-extents"),
        pytest.param(batch_payload([(Z, 0, 512, 0)], count=MAX_EXTENTS + 1), id="too-many-extents"),
        pytest.param(batch_payload([(Z, 0, 512, 0)], count=2**32 - 1), id="count-u32-max"),
        pytest.param(batch_payload([(Z, 0, 512, 0)], kind=3), id="unknown-batch-kind"),
        pytest.param(batch_payload([(Z, 0, 512, 0)], count=5), id="table-truncated"),
        pytest.param(batch_payload([(D, 0, 512, 3)], b"ab"), id="stored-exceeds-payload"),
        pytest.param(batch_payload([(D, 0, 512, 3)], b"abcd"), id="trailing-byte"),
        pytest.param(batch_payload([(Z, 0, 512, 0)], b"x"), id="zero-extent-then-data"),
        pytest.param(batch_payload([(Z, 0, 512, 1)], b"x"), id="zero-extent-with-payload"),
        pytest.param(batch_payload([(D, 0, 512, 0)]), id="data-extent-without-payload"),
        pytest.param(batch_payload([(3, 0, 512, 0)]), id="unknown-extent-kind"),
        pytest.param(batch_payload([(0, 0, 512, 0)]), id="extent-kind-zero"),
        pytest.param(batch_payload([(Z, 1, 512, 0)]), id="unaligned-offset"),
        pytest.param(batch_payload([(Z, 0, 511, 0)]), id="unaligned-length"),
        pytest.param(batch_payload([(Z, 0, 0, 0)]), id="empty-extent"),
        pytest.param(batch_payload([(Z, 1024, 512, 0), (Z, 0, 512, 0)]), id="unsorted"),
        pytest.param(batch_payload([(Z, 0, 1024, 0), (Z, 512, 512, 0)]), id="overlapping"),
        pytest.param(
            batch_payload([(D, 0, MAX_BATCH_LOGICAL, 1), (D, MAX_BATCH_LOGICAL, 512, 1)], b"ab"), id="too-much-data"
        ),
        pytest.param(batch_payload([(D, 0, MAX_BATCH_LOGICAL + 512, 1)], b"a"), id="data-extent-too-long"),
        pytest.param(batch_payload([(Z, 0, 512, 2**32 - 1)]), id="stored-u32-max"),
    ],
)
def test_malformed_batch_is_remote_error(payload: bytes) -> None:
    assert assert_remote_error(FrameType.BATCH, payload).code == "bad-batch"


# ---- malformed payloads: MARKER -------------------------------------------------------------------------


def marker_payload(meta: bytes, *, n: int | None = None, seal: bytes = SEAL) -> bytes:
    return struct.pack(">I", len(meta) if n is None else n) + meta + seal


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\0" * 31, id="too-short"),
        pytest.param(marker_payload(b'{"generation":1,"kind":"x"}', n=100), id="length-too-big"),
        pytest.param(marker_payload(b'{"generation":1,"kind":"x"}', n=3), id="length-too-small"),
        pytest.param(marker_payload(b'{"generation":1,"kind":"x"}', n=2**32 - 1), id="length-u32-max"),
        pytest.param(marker_payload(b'{"generation":1,"kind":"x"}', seal=SEAL[:-1]), id="short-seal"),
        pytest.param(marker_payload(b"not json"), id="not-json"),
        pytest.param(marker_payload(b"\xff\xfe"), id="not-utf8"),
        pytest.param(marker_payload(b"[1,2]"), id="array"),
        pytest.param(marker_payload(b"null"), id="null"),
        pytest.param(marker_payload(b""), id="empty-meta"),
        pytest.param(marker_payload(b'{"kind":"x"}'), id="no-generation"),
        pytest.param(marker_payload(b'{"generation":"1","kind":"x"}'), id="string-generation"),
        pytest.param(marker_payload(b'{"generation":1}'), id="no-kind"),
        pytest.param(marker_payload(b'{"generation":1,"kind":null}'), id="null-kind"),
    ],
)
def test_malformed_marker_is_remote_error(payload: bytes) -> None:
    assert assert_remote_error(FrameType.MARKER, payload).code == "bad-marker"


def test_marker_with_bool_generation_is_remote_error() -> None:
    assert_remote_error(FrameType.MARKER, marker_payload(b'{"generation":true,"kind":"x"}'))


def test_marker_with_deeply_nested_meta_is_remote_error() -> None:
    assert_remote_error(FrameType.MARKER, marker_payload(b'{"x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"))


# ---- fuzzing: nothing but a message or RemoteProtocolError ----------------------------------------------


def _message_or_remote_error(ftype: int, payload: bytes, disk: int = 0, sequence: int = 0) -> None:
    try:
        msg = decode_payload(ftype, payload, disk, sequence)
    except RemoteProtocolError:
        return
    assert isinstance(msg, ALL_TYPES)
    # Whatever we accepted must be a valid message that we could send on ourselves.
    assert type(decode(encode(msg))) is type(msg)


@FUZZ
@given(ftype=st.integers(0, 255), payload=st.binary(max_size=200), disk=u32, sequence=u64)
def test_fuzz_random_bytes(ftype: int, payload: bytes, disk: int, sequence: int) -> None:
    _message_or_remote_error(ftype, payload, disk, sequence)


@FUZZ
@given(
    ftype=st.sampled_from(JSON_TYPES + [FrameType.MARKER]),
    body=st.dictionaries(
        st.sampled_from(sorted(FIELD_KIND) + ["disk", "sequence", "x"]), json_values | st.floats(), max_size=6
    )
    | json_values,
)
def test_fuzz_json_bodies(ftype: FrameType, body: Any) -> None:
    raw = json.dumps(body).encode()
    payload = marker_payload(raw) if ftype == FrameType.MARKER else raw
    _message_or_remote_error(ftype, payload)


@FUZZ
@given(batch=batches, data=st.data())
def test_fuzz_mutated_batches(batch: Batch, data: st.DataObject) -> None:
    payload = bytearray(batch.encode()[HEADER_SIZE:])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(len(payload) - 1, 0)))
        if op == "flip" and payload:
            payload[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and payload:
            payload[i] = data.draw(st.sampled_from([0, 1, 2, 3, 0x80, 0xFF]))
        elif op == "insert":
            payload[i:i] = data.draw(st.binary(min_size=1, max_size=24))
        elif op == "delete":
            del payload[i : i + data.draw(st.integers(1, 24))]
        else:
            del payload[i:]
    _message_or_remote_error(FrameType.BATCH, bytes(payload))
