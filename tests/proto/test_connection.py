"""Sans-I/O connection (`standby.proto.connection`): two in-memory peers joined by a fake link.

The transition table is driven directly (every role x state x message class, both directions) against an
independent statement of the rules from the module's theory of operation.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.proto.connection import (
    CLOSED,
    NEED_DATA,
    Closed,
    Connection,
    NeedData,
    Role,
    State,
    choose_version,
)
from standby.proto.errors import LocalProtocolError, RemoteProtocolError
from standby.proto.frames import HEADER_SIZE, MAGIC, MAX_PAYLOAD, encode_frame
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
    Message,
    Reject,
    Reply,
    Request,
    Welcome,
    encode,
)

FAST = settings(max_examples=40, deadline=None)

SEAL = b"s" * 28
Event = Message | NeedData | Closed

# One example of every message class.
SAMPLES: dict[type, Message] = {
    Hello: Hello("agent"),
    Welcome: Welcome(1, "ps1", "agent"),
    Goodbye: Goodbye("shutdown", "bye"),
    Request: Request(1, "open-disk", {"disk": "a"}),
    Reply: Reply(1, True, {"stream": 3}),
    Batch: Batch(
        3,
        1,
        1,
        BatchKind.DELTA,
        0,
        (Extent(ExtentKind.DATA, 0, 512, b"x" * 40), Extent(ExtentKind.ZERO, 512, 4096)),
        SEAL,
    ),
    Marker: Marker(3, 2, {"generation": 1, "kind": "initial-complete"}, SEAL),
    Ack: Ack(3, 1, 1),
    Busy: Busy(3, 1, 2.5, "cache over quota"),
    Reject: Reject(3, 1, "bad-seal", "failed verification"),
}
OPERATIONAL = (Request, Reply, Batch, Marker, Ack, Busy, Reject)


# ---- the fake link --------------------------------------------------------------------------------------


def feed(dst: Connection, data: bytes, chunks: list[int] | None = None) -> None:
    """Move `data` into `dst`, split at the given chunk sizes (the rest in one piece)."""
    pos = 0
    for size in chunks or []:
        if pos >= len(data):
            break
        dst.receive_data(data[pos : pos + max(size, 1)])
        pos += max(size, 1)
    if pos < len(data):
        dst.receive_data(data[pos:])


def drain(conn: Connection) -> list[Event]:
    """All events until the connection needs data or is closed (the last one included)."""
    out: list[Event] = []
    while True:
        ev = conn.next_event()
        out.append(ev)
        if ev is NEED_DATA or ev is CLOSED:
            return out


def deliver(src_bytes: bytes, dst: Connection, chunks: list[int] | None = None) -> list[Event]:
    """Feed chunk by chunk, draining after each chunk as a real daemon would; return the events."""
    events: list[Event] = []
    pos = 0
    for size in [*(chunks or []), len(src_bytes)]:
        if pos >= len(src_bytes):
            break
        size = max(size, 1)
        dst.receive_data(src_bytes[pos : pos + size])
        pos += size
        events += [e for e in drain(dst) if e is not NEED_DATA]
    return events


def handshake(client: Connection | None = None, server: Connection | None = None) -> tuple[Connection, Connection]:
    client = client or Connection(Role.CLIENT)
    server = server or Connection(Role.SERVER)
    assert deliver(client.send(Hello("agent")), server) == [Hello("agent")]
    assert deliver(server.send(Welcome(1, "ps1", "agent")), client) == [Welcome(1, "ps1", "agent")]
    return client, server


# ---- handshake and negotiation --------------------------------------------------------------------------


def test_handshake() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    assert client.state is State.START and server.state is State.START
    hello = client.send(Hello("agent", (1,)))
    assert client.state is State.HELLO_SENT
    assert server.next_event() is NEED_DATA
    server.receive_data(hello)
    assert server.next_event() == Hello("agent", (1,))
    assert server.state is State.HELLO_RECEIVED
    assert server.next_event() is NEED_DATA
    client.receive_data(server.send(Welcome(1, "ps1", "agent")))
    assert server.state is State.OPEN and server.version == 1
    assert client.next_event() == Welcome(1, "ps1", "agent")
    assert client.state is State.OPEN and client.version == 1


def test_choose_version() -> None:
    assert choose_version(Hello("agent", (1,))) == 1
    assert choose_version(Hello("agent", (9, 1, 7))) == 1
    assert choose_version(Hello("agent", (9,))) is None


def test_client_speaking_only_an_unknown_version_is_refused() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(Hello("agent", (9,))))
    with pytest.raises(RemoteProtocolError) as exc:
        server.next_event()
    assert exc.value.code == "bad-version"
    assert server.state is State.START and server.version is None
    # The owner answers with a goodbye carrying the code, then closes.
    client.receive_data(server.send(Goodbye(exc.value.code, str(exc.value))))
    assert server.state is State.CLOSED
    ev = client.next_event()
    assert isinstance(ev, Goodbye) and ev.code == "bad-version"
    assert client.state is State.CLOSED


def test_server_choosing_an_unsupported_version_is_refused_by_the_client() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    deliver(client.send(Hello("agent", (1, 9))), server)
    client.receive_data(server.send(Welcome(9, "ps1", "agent")))
    with pytest.raises(RemoteProtocolError) as exc:
        client.next_event()
    assert exc.value.code == "bad-version"
    assert client.state is State.HELLO_SENT and client.version is None


def test_server_may_refuse_with_goodbye() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    deliver(client.send(Hello("agent")), server)
    assert deliver(server.send(Goodbye("not-enrolled", "who are you")), client) == [
        Goodbye("not-enrolled", "who are you"),
        CLOSED,
    ]
    assert server.state is State.CLOSED and client.state is State.CLOSED


# ---- a whole conversation, and chunking -----------------------------------------------------------------

AGENT_SENDS = [SAMPLES[Request], SAMPLES[Batch], SAMPLES[Marker], SAMPLES[Batch]]
SERVER_SENDS = [SAMPLES[Reply], SAMPLES[Ack], SAMPLES[Busy], SAMPLES[Reject]]


def test_conversation_in_both_directions() -> None:
    client, server = handshake()
    for a, b in zip(AGENT_SENDS, SERVER_SENDS, strict=True):
        assert deliver(client.send(a), server) == [a]
        assert deliver(server.send(b), client) == [b]
    assert deliver(client.send(Goodbye("done", "")), server) == [Goodbye("done", ""), CLOSED]
    assert client.state is State.CLOSED and server.state is State.CLOSED


def test_pipelined_frames_in_one_chunk() -> None:
    client, server = handshake()
    wire = b"".join(client.send(m) for m in AGENT_SENDS)
    server.receive_data(wire)
    assert server.buffered == len(wire)
    assert drain(server) == [*AGENT_SENDS, NEED_DATA]
    assert server.buffered == 0


Chunker = Callable[[int], list[int]]


def run_session(chunker: Chunker, *, drain_each_chunk: bool = True) -> tuple[list[Event], list[Event]]:
    """A whole session between two live peers; every delivery is split by `chunker(len(bytes))`.

    Several frames are sent before each delivery, so chunk boundaries also fall across frames.
    Returns (events seen by the server, events seen by the client).
    """
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    by_server: list[Event] = []
    by_client: list[Event] = []

    def move(wire: bytes, dst: Connection, seen: list[Event]) -> None:
        if drain_each_chunk:
            seen += deliver(wire, dst, chunker(len(wire)))
        else:
            feed(dst, wire, chunker(len(wire)))
            seen += [e for e in drain(dst) if e is not NEED_DATA]

    move(client.send(Hello("agent", (1, 2))), server, by_server)
    move(server.send(Welcome(1, "ps1", "agent")), client, by_client)
    move(b"".join(server.send(m) for m in SERVER_SENDS), client, by_client)
    move(b"".join(client.send(m) for m in AGENT_SENDS) + client.send(Goodbye("done", "bye")), server, by_server)
    return by_server, by_client


EXPECTED_BY_SERVER = [Hello("agent", (1, 2)), *AGENT_SENDS, Goodbye("done", "bye"), CLOSED]
EXPECTED_BY_CLIENT = [Welcome(1, "ps1", "agent"), *SERVER_SENDS]


def test_session_in_one_piece() -> None:
    assert run_session(lambda n: []) == (EXPECTED_BY_SERVER, EXPECTED_BY_CLIENT)


@FAST
@given(data=st.data())
def test_chunking_never_changes_the_events(data: st.DataObject) -> None:
    def chunker(n: int) -> list[int]:
        return data.draw(st.lists(st.integers(1, max(n // 3, 1)), max_size=40))

    assert run_session(chunker) == (EXPECTED_BY_SERVER, EXPECTED_BY_CLIENT)


@FAST
@given(seed=st.integers(0, 2**32))
def test_random_splits_with_late_draining_agree(seed: int) -> None:
    rng = random.Random(seed)

    def chunker(n: int) -> list[int]:
        return [rng.randint(1, 64) for _ in range(n)]

    assert run_session(chunker, drain_each_chunk=False) == (EXPECTED_BY_SERVER, EXPECTED_BY_CLIENT)


def test_byte_by_byte() -> None:
    assert run_session(lambda n: [1] * n) == (EXPECTED_BY_SERVER, EXPECTED_BY_CLIENT)


# ---- the transition table, driven directly --------------------------------------------------------------


def legal_send(role: Role, state: State, cls: type) -> State | None:
    if state is State.CLOSED:
        return None
    if cls is Goodbye:
        return State.CLOSED
    if cls is Hello:
        return State.HELLO_SENT if (role, state) == (Role.CLIENT, State.START) else None
    if cls is Welcome:
        return State.OPEN if (role, state) == (Role.SERVER, State.HELLO_RECEIVED) else None
    return State.OPEN if state is State.OPEN else None


def legal_recv(role: Role, state: State, cls: type) -> State | None:
    if state is State.CLOSED:
        return None
    if cls is Goodbye:
        return State.CLOSED
    if cls is Hello:
        return State.HELLO_RECEIVED if (role, state) == (Role.SERVER, State.START) else None
    if cls is Welcome:
        return State.OPEN if (role, state) == (Role.CLIENT, State.HELLO_SENT) else None
    return State.OPEN if state is State.OPEN else None


CASES = [(r, s, c) for r in Role for s in State for c in SAMPLES]


def _ids(case: tuple[Role, State, type]) -> str:
    r, s, c = case
    return f"{r.name}-{s.name}-{c.__name__}"


def _at(role: Role, state: State) -> Connection:
    conn = Connection(role)
    conn.state = state
    return conn


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_send_table(case: tuple[Role, State, type]) -> None:
    role, state, cls = case
    conn = _at(role, state)
    expected = legal_send(role, state, cls)
    if expected is None:
        with pytest.raises(LocalProtocolError) as exc:
            conn.send(SAMPLES[cls])
        assert exc.value.code == "illegal-send"
        assert conn.state is state and conn.version is None
    else:
        assert conn.send(SAMPLES[cls]) == encode(SAMPLES[cls])
        assert conn.state is expected


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_receive_table(case: tuple[Role, State, type]) -> None:
    role, state, cls = case
    conn = _at(role, state)
    conn.receive_data(encode(SAMPLES[cls]))
    if state is State.CLOSED:
        assert conn.next_event() is CLOSED
        assert conn.state is State.CLOSED
        return
    expected = legal_recv(role, state, cls)
    if expected is None:
        with pytest.raises(RemoteProtocolError) as exc:
            conn.next_event()
        assert exc.value.code == "unexpected-message"
        assert conn.state is state
        assert conn.buffered == 0  # the offending frame was consumed, nothing else is left behind
    else:
        assert conn.next_event() == SAMPLES[cls]
        assert conn.state is expected


@pytest.mark.parametrize(
    "role, msg",
    [
        (Role.CLIENT, SAMPLES[Batch]),
        (Role.CLIENT, SAMPLES[Welcome]),
        (Role.CLIENT, SAMPLES[Request]),
        (Role.SERVER, SAMPLES[Hello]),
        (Role.SERVER, SAMPLES[Welcome]),  # must receive HELLO first
        (Role.SERVER, SAMPLES[Ack]),
    ],
    ids=lambda v: v.name if isinstance(v, Role) else type(v).__name__,
)
def test_illegal_first_send_leaves_a_usable_connection(role: Role, msg: Message) -> None:
    conn = Connection(role)
    with pytest.raises(LocalProtocolError):
        conn.send(msg)
    assert conn.state is State.START
    if role is Role.CLIENT:  # still able to do the right thing afterwards
        _, server = handshake(client=conn)
        assert conn.state is State.OPEN and server.state is State.OPEN


def test_welcome_from_a_client_is_illegal_in_every_state() -> None:
    for state in State:
        conn = _at(Role.CLIENT, state)
        with pytest.raises(LocalProtocolError):
            conn.send(SAMPLES[Welcome])
        assert conn.state is state


def test_failed_encode_leaves_state_unchanged() -> None:
    client, _ = handshake()
    with pytest.raises(LocalProtocolError) as exc:
        client.send(Reply(1, False, {}, "x", "y" * (2 * 1024 * 1024)))
    assert exc.value.code == "oversized"
    assert client.state is State.OPEN


@pytest.mark.parametrize(
    "receiver, msg",
    [
        (Role.SERVER, SAMPLES[Batch]),  # batch before hello
        (Role.SERVER, SAMPLES[Welcome]),
        (Role.CLIENT, SAMPLES[Hello]),
        (Role.CLIENT, SAMPLES[Request]),  # request before welcome
    ],
    ids=lambda v: v.name if isinstance(v, Role) else type(v).__name__,
)
def test_unexpected_first_message_is_remote_error(receiver: Role, msg: Message) -> None:
    conn = Connection(receiver)
    conn.receive_data(encode(msg))
    with pytest.raises(RemoteProtocolError) as exc:
        conn.next_event()
    assert exc.value.code == "unexpected-message"
    assert conn.state is State.START


def test_second_hello_is_unexpected() -> None:
    _, server = handshake()
    server.receive_data(encode(Hello("agent")))
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    assert server.state is State.OPEN


# ---- corruption, limits and end of stream ---------------------------------------------------------------


@FAST
@given(data=st.data())
def test_corrupted_wire_is_only_ever_a_remote_error(data: st.DataObject) -> None:
    client, server = handshake()
    wire = bytearray(client.send(SAMPLES[Batch]))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    server.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError) as exc:
        server.next_event()
    assert exc.value.code in {"bad-magic", "bad-version", "bad-header-checksum", "bad-payload-checksum"}
    assert server.state is State.OPEN


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    head = struct.pack(">4sBBHIQIQ", MAGIC, 1, 6, 0, 1, 1, MAX_PAYLOAD + 1, 0)
    header = head + struct.pack(">I", xxhash.xxh32_intdigest(head))
    server = Connection(Role.SERVER)
    server.receive_data(header)
    with pytest.raises(RemoteProtocolError) as exc:
        server.next_event()
    assert exc.value.code == "oversized"
    assert server.buffered == HEADER_SIZE  # nothing was waited for or read beyond the header


def test_partial_frame_needs_data() -> None:
    frame = encode(Hello("agent"))
    server = Connection(Role.SERVER)
    for i, byte in enumerate(frame[:-1]):
        server.receive_data(bytes([byte]))
        assert server.next_event() is NEED_DATA
        assert server.buffered == i + 1
    server.receive_data(frame[-1:])
    assert server.next_event() == Hello("agent")


@FAST
@given(data=st.data())
def test_eof_inside_a_frame_is_truncated(data: st.DataObject) -> None:
    client, server = handshake()
    frame = client.send(SAMPLES[Batch])
    cut = data.draw(st.integers(1, len(frame) - 1))
    server.receive_data(frame[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as exc:
        server.next_event()
    assert exc.value.code == "truncated"


def test_eof_between_frames_closes() -> None:
    client, server = handshake()
    server.receive_data(client.send(SAMPLES[Ack]))
    server.receive_data(b"")
    assert drain(server) == [SAMPLES[Ack], CLOSED]
    assert server.state is State.CLOSED
    assert server.next_event() is CLOSED
    with pytest.raises(LocalProtocolError):
        server.send(SAMPLES[Ack])


def test_eof_before_anything_closes() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    assert conn.state is State.CLOSED


def test_receive_after_eof_is_a_local_error() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError) as exc:
        conn.receive_data(b"more")
    assert exc.value.code == "after-eof"


@pytest.mark.parametrize("closer", ["client", "server"])
def test_goodbye_closes_both_ends(closer: str) -> None:
    client, server = handshake()
    sender, receiver = (client, server) if closer == "client" else (server, client)
    wire = sender.send(Goodbye("shutdown", "bye"))
    assert sender.state is State.CLOSED
    receiver.receive_data(wire + receiver_extra())
    assert receiver.next_event() == Goodbye("shutdown", "bye")
    assert receiver.state is State.CLOSED
    assert receiver.next_event() is CLOSED  # whatever follows a goodbye is ignored
    for msg in (Goodbye("x", "y"), SAMPLES[Ack]):
        with pytest.raises(LocalProtocolError):
            sender.send(msg)
        with pytest.raises(LocalProtocolError):
            receiver.send(msg)


def receiver_extra() -> bytes:
    return encode_frame(8, 1, 1, b'{"generation":1}')


def test_sentinels() -> None:
    assert repr(NEED_DATA) == "NEED_DATA" and repr(CLOSED) == "CLOSED"
    assert isinstance(NEED_DATA, NeedData) and isinstance(CLOSED, Closed)


def test_operational_messages_all_listed() -> None:
    assert set(OPERATIONAL) | {Hello, Welcome, Goodbye} == set(SAMPLES)
