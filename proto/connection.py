"""Sans-I/O connection: bytes in, typed messages out; messages in, bytes out. No sockets here.

Theory of operation
-------------------
Every connection starts with a handshake. The side that dialled (CLIENT) sends HELLO with the versions
it speaks and its role; the listening side (SERVER) answers WELCOME with the chosen version, or GOODBYE
with a reason. After that the connection is OPEN and both sides may send any operational message
(REQUEST, REPLY, BATCH, MARKER, ACK, BUSY, REJECT). GOODBYE, sent or received, ends it (CLOSED), as does
the peer closing its end (EOF → `Closed`).

The transition table below is the only place that decides what may be sent or received in which state.
An illegal *send* raises LocalProtocolError and leaves the state unchanged; an illegal *receive* raises
RemoteProtocolError, after which the owner sends GOODBYE with `exc.code` and closes.

Buffer limit: a frame's header is checked (including its announced length, at most MAX_PAYLOAD) as soon
as 36 bytes are buffered, so a peer cannot announce more than ~32 MiB. `receive_data` itself appends
whatever it is given: the owner must drain `next_event()` after every chunk it feeds (the asyncio
adapter feeds at most 1 MiB at a time), which bounds the buffer to one frame plus one chunk.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Final

from .enums import GoodbyeCode
from .errors import LocalProtocolError, RemoteProtocolError
from .frames import HEADER_SIZE, SUPPORTED_VERSIONS, FrameHeader, check_payload, decode_header
from .messages import (
    Ack,
    Batch,
    Busy,
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
)


class Role(Enum):
    CLIENT = auto()
    SERVER = auto()


class State(Enum):
    START = auto()
    HELLO_SENT = auto()  # client, waiting for WELCOME
    HELLO_RECEIVED = auto()  # server, must answer WELCOME or GOODBYE
    OPEN = auto()
    CLOSED = auto()


class NeedData:
    """Returned by next_event() when a whole frame is not buffered yet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


class Closed:
    """Returned by next_event() after the peer closed its end (receive_data(b""))."""

    def __repr__(self) -> str:
        return "CLOSED"


NEED_DATA: Final = NeedData()
CLOSED: Final = Closed()

_OPERATIONAL = (Request, Reply, Batch, Marker, Ack, Busy, Reject)

# (role, state, direction, message class) -> next state. direction: "send" or "recv".
_TABLE: dict[tuple[Role, State, str, type], State] = {
    (Role.CLIENT, State.START, "send", Hello): State.HELLO_SENT,
    (Role.CLIENT, State.HELLO_SENT, "recv", Welcome): State.OPEN,
    (Role.SERVER, State.START, "recv", Hello): State.HELLO_RECEIVED,
    (Role.SERVER, State.HELLO_RECEIVED, "send", Welcome): State.OPEN,
}
for _role in Role:
    for _st in (State.START, State.HELLO_SENT, State.HELLO_RECEIVED, State.OPEN):
        for _dir in ("send", "recv"):
            _TABLE[(_role, _st, _dir, Goodbye)] = State.CLOSED
    for _cls in _OPERATIONAL:
        for _dir in ("send", "recv"):
            _TABLE[(_role, State.OPEN, _dir, _cls)] = State.OPEN


def choose_version(hello: Hello) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(hello.versions) & set(SUPPORTED_VERSIONS)
    return max(common) if common else None


class Connection:
    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.START
        self.version: int | None = None
        self._buf = bytearray()
        self._header: FrameHeader | None = None
        self._eof = False
        # The verified bytes of the last message next_event() returned: a process server stores and forwards
        # BATCH and MARKER frames byte for byte instead of encoding them again. Never mutated afterwards.
        self.last_frame: bytearray = bytearray()

    # -- outgoing ---------------------------------------------------------------------------------
    def send(self, msg: Message) -> bytes:
        nxt = _TABLE.get((self.role, self.state, "send", type(msg)))
        if nxt is None:
            raise LocalProtocolError(
                GoodbyeCode.ILLEGAL_SEND,
                f"cannot send {type(msg).__name__} in state {self.state.name} as {self.role.name}",
            )
        data = encode(msg)
        if isinstance(msg, Welcome):
            self.version = msg.version
        self.state = nxt
        return data

    # -- incoming ---------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError(GoodbyeCode.AFTER_EOF, "receive_data after end of stream")
        if not data:
            self._eof = True
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_event(self) -> Message | NeedData | Closed:
        if self.state is State.CLOSED:
            return CLOSED
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return self._end_or_need()
            self._header = decode_header(self._buf[:HEADER_SIZE])
        h = self._header
        end = HEADER_SIZE + h.length
        if len(self._buf) < end:
            return self._end_or_need()
        if len(self._buf) - end < end:
            # Copy the smaller part: take the buffer as the frame and copy only what follows it (the start
            # of the next frames, at most about one read) into a new buffer, so a large frame is never
            # copied. (Deleting from a bytearray's front costs nothing, so small frames are cut off.)
            frame, rest = self._buf, memoryview(self._buf)[end:]
            self._buf = bytearray(rest)
            rest.release()
            del frame[end:]
        else:
            frame = self._buf[:end]
            del self._buf[:end]
        self._header = None
        payload = memoryview(frame)[HEADER_SIZE:]
        check_payload(h, payload)
        msg = decode_message(h, payload)
        nxt = _TABLE.get((self.role, self.state, "recv", type(msg)))
        if nxt is None:
            raise RemoteProtocolError(
                GoodbyeCode.UNEXPECTED_MESSAGE, f"peer sent {type(msg).__name__} in state {self.state.name}"
            )
        if isinstance(msg, Hello) and choose_version(msg) is None:
            raise RemoteProtocolError(
                GoodbyeCode.BAD_VERSION,
                f"peer speaks versions {list(msg.versions)}, we speak {list(SUPPORTED_VERSIONS)}",
            )
        if isinstance(msg, Welcome):
            if msg.version not in SUPPORTED_VERSIONS:
                raise RemoteProtocolError(GoodbyeCode.BAD_VERSION, f"server chose unsupported version {msg.version}")
            self.version = msg.version
        self.state = nxt
        self.last_frame = frame
        return msg

    def _end_or_need(self) -> NeedData | Closed:
        if self._eof:
            if self._buf:
                raise RemoteProtocolError(
                    GoodbyeCode.TRUNCATED, f"connection closed inside a frame ({len(self._buf)} bytes)"
                )
            self.state = State.CLOSED
            return CLOSED
        return NEED_DATA
