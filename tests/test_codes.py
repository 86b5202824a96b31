"""GOODBYE and REJECT codes are closed sets (proto.enums GoodbyeCode, RejectCode), like REPLY codes.

Senders use the members, never a string written on the spot: an AST walk over the packages finds every
place a code is given (`Link.close`, `Goodbye`, `Reject`, the master target's `reject`, the protocol errors,
`LinkClosed`) and refuses a string literal there. The members' values are today's wire words: each goes
through the codec unchanged, and a code a newer peer may send (one this release does not know) is still
decoded, as text.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from standby.proto.enums import ErrorCode, GoodbyeCode, RejectCode
from standby.proto.errors import LocalProtocolError, RemoteProtocolError
from standby.proto.frames import HEADER_SIZE, decode_header
from standby.proto.messages import Goodbye, Message, Reject, decode_message, encode
from standby.proto.requests import BadRequest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("admin", "agent", "mastertarget", "plumbing", "processserver", "proto")

# Where the code is among a call's positional arguments, by the name called (a function, a class or a method).
CODE_ARGUMENT = {
    "close": 0,  # Link.close(code, reason); os.close(fd) passes a name, which is fine
    "Goodbye": 0,
    "Reject": 2,  # Reject(disk, sequence, code, reason)
    "reject": 2,  # mastertarget.worker DiskWorker.reject(link, sequence, code, reason)
    "ProtocolError": 0,
    "LocalProtocolError": 0,
    "RemoteProtocolError": 0,
    "IllegalTransition": 0,
    "BadRequest": 0,
    "LinkClosed": 1,  # LinkClosed(message, code)
}
ENUMS = {"GoodbyeCode": GoodbyeCode, "RejectCode": RejectCode, "ErrorCode": ErrorCode}


def _called_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _code_argument(call: ast.Call) -> ast.expr | None:
    name = _called_name(call)
    if name not in CODE_ARGUMENT:
        return None
    for kw in call.keywords:
        if kw.arg == "code":
            return kw.value
    i = CODE_ARGUMENT[name]
    return call.args[i] if len(call.args) > i else None


def _is_text(node: ast.expr) -> bool:
    """A string written on the spot: a literal, an f-string, or a conditional choosing between such."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.IfExp):
        return _is_text(node.body) or _is_text(node.orelse)
    return False


def free_string_codes(source: str, filename: str = "<source>") -> Iterator[tuple[int, str]]:
    """(line, call) of every call that gives a code as a string literal; and of every `GoodbyeCode.X`,
    `RejectCode.X` or `ErrorCode.X` naming no member (found only when that line runs, otherwise)."""
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            arg = _code_argument(node)
            if arg is not None and _is_text(arg):
                yield node.lineno, f"{_called_name(node)}({ast.unparse(arg)}, ...)"
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ENUMS
              and not node.attr.startswith("_") and node.attr not in ENUMS[node.value.id].__members__):
            yield node.lineno, f"{node.value.id}.{node.attr} is no member"


def _sources() -> Iterator[Path]:
    for top in PACKAGES:
        yield from (p for p in sorted((REPO / top).rglob("*.py")) if "__pycache__" not in p.parts)


def _code_calls() -> Iterator[tuple[Path, ast.Call]]:
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and _code_argument(node) is not None:
                yield path, node


def test_no_code_is_a_free_string():
    found = [f"{p.relative_to(REPO)}:{line}: {what}" for p in _sources()
             for line, what in free_string_codes(p.read_text(), str(p))]
    assert not found, "codes must be proto.enums members:\n" + "\n".join(found)


def test_the_walk_sees_the_senders():
    """Not a vacuous pass: the walk finds the known senders, each giving a member."""
    seen = {(p.relative_to(REPO).as_posix(), _called_name(c), ast.unparse(_code_argument(c)))  # type: ignore[arg-type]
            for p, c in _code_calls()}
    for expected in (
        ("processserver/diskwriter.py", "close", "GoodbyeCode.SEQUENCE_GAP"),
        ("processserver/server.py", "close", "GoodbyeCode.NOT_ENROLLED"),
        ("processserver/server.py", "close", "exc.goodbye_code"),
        ("plumbing/link.py", "Goodbye", "code"),
        ("mastertarget/worker.py", "reject", "RejectCode.WRITE_FAILED"),
        ("mastertarget/worker.py", "Reject", "code"),
        ("mastertarget/daemon.py", "Reject", "RejectCode.REPLICA_ERROR"),
        ("proto/frames.py", "RemoteProtocolError", "GoodbyeCode.BAD_MAGIC"),
        ("proto/states.py", "IllegalTransition", "GoodbyeCode.ILLEGAL_TRANSITION"),
    ):
        assert expected in seen, expected


@pytest.mark.parametrize("snippet", [
    'await link.close("sequence-gap", "expected 2")',
    'link.close(code="forbidden", reason="no")',
    'Goodbye("done", "bye")',
    'Reject(disk, 0, "replica-error", msg)',
    'await self.reject(link, seq, "write-failed", reason)',
    'raise RemoteProtocolError("bad-ack", "ack for 3")',
    'raise LocalProtocolError(f"bad-{what}", "x")',
    'raise LinkClosed("gone", "forbidden")',
    'Reject(d, s, "failed" if bug else RejectCode.WRITE_FAILED, why)',
    "x = GoodbyeCode.SEQUENCE_GAPP",
])
def test_the_check_catches_a_free_string(snippet):
    assert list(free_string_codes(snippet))


def test_the_check_lets_members_and_names_pass():
    ok = ("await link.close(GoodbyeCode.SEQUENCE_GAP, f'expected {n}')\nos.close(fd)\nlink.close()\n"
          "Reject(d, 0, RejectCode.REPLICA_ERROR, 'cannot open')\nraise RemoteProtocolError(exc.code, str(exc))\n")
    assert not list(free_string_codes(ok))


def _through_the_codec(msg: Message) -> Message:
    frame = encode(msg)
    return decode_message(decode_header(frame[:HEADER_SIZE]), memoryview(frame)[HEADER_SIZE:])


@pytest.mark.parametrize("code", list(GoodbyeCode), ids=str)
def test_a_goodbye_code_crosses_the_wire_unchanged(code):
    frame = encode(Goodbye(code, "why"))
    assert json.loads(frame[HEADER_SIZE:]) == {"code": code.value, "reason": "why"}
    got = _through_the_codec(Goodbye(code, "why"))
    assert got == Goodbye(code.value, "why") and type(got.code) is str  # text, as a peer's code stays


@pytest.mark.parametrize("code", list(RejectCode), ids=str)
def test_a_reject_code_crosses_the_wire_unchanged(code):
    frame = encode(Reject(7, 42, code, "why"))
    assert json.loads(frame[HEADER_SIZE:]) == {"code": code.value, "reason": "why"}
    got = _through_the_codec(Reject(7, 42, code, "why"))
    assert got == Reject(7, 42, code.value, "why") and type(got.code) is str


def test_a_code_this_release_does_not_know_is_still_decoded():
    assert _through_the_codec(Goodbye("from-the-future", "a newer peer")) == Goodbye("from-the-future", "a newer peer")
    assert _through_the_codec(Reject(1, 2, "from-the-future", "x")) == Reject(1, 2, "from-the-future", "x")


def test_the_values_are_the_wire_words_of_before():
    assert {c.value for c in RejectCode} == {"authentication-failed", "bad-marker", "write-failed", "failed",
                                            "replica-error"}
    assert {"sequence-gap", "internal-error", "timeout", "replaced", "not-protected", "bad-ack", "forbidden",
            "not-enrolled", "unexpected-message", "bad-version", "truncated"} <= {c.value for c in GoodbyeCode}
    assert len({c.value for c in GoodbyeCode}) == len(GoodbyeCode)  # no alias hides a second name


def test_words_shared_with_reply_codes_are_equal_strings():
    for name in ("FORBIDDEN", "NOT_ENROLLED", "BAD_MARKER", "BAD_REPLY", "BAD_INPUT", "UNKNOWN_REQUEST"):
        assert GoodbyeCode[name] == ErrorCode[name] == ErrorCode[name].value
    assert RejectCode.BAD_MARKER == ErrorCode.BAD_MARKER and RejectCode.FAILED == ErrorCode.FAILED


def test_a_protocol_error_says_goodbye_with_its_own_word():
    assert RemoteProtocolError(GoodbyeCode.BAD_ACK, "x").goodbye_code is GoodbyeCode.BAD_ACK
    # A BadRequest carries an ErrorCode; the words it is raised with are goodbye words too.
    for code in (ErrorCode.BAD_INPUT, ErrorCode.UNKNOWN_REQUEST, ErrorCode.FORBIDDEN, ErrorCode.BAD_REPLY,
                 ErrorCode.BAD_MARKER):
        bye = BadRequest(code, "x").goodbye_code
        assert type(bye) is GoodbyeCode and bye == code
    assert BadRequest(ErrorCode.UNKNOWN_DISK, "x").goodbye_code is GoodbyeCode.BAD_MESSAGE  # never closes badly
    assert LocalProtocolError(GoodbyeCode.ILLEGAL_SEND, "x").code is GoodbyeCode.ILLEGAL_SEND
