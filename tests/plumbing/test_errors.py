"""Exit codes (plumbing.errors): every reply code maps to the exit code its meaning documents, every code
a command can exit with is in EXIT_CODES, and README's "Exit codes" table is EXIT_CODES, word for word."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import standby
from standby.plumbing import errors
from standby.plumbing.errors import (
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_CONNECTED,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    RequestFailed,
    StandbyError,
    run_main,
)
from standby.proto.enums import ErrorCode

ROOT = Path(__file__).resolve().parents[2]

# Every reply code, and the exit code the CLI gives it. A new ErrorCode must be placed here (and in
# REPLY_CODES when it is not a plain failure).
EXPECTED = {
    ErrorCode.BAD_INPUT: EXIT_BAD_INPUT,
    ErrorCode.UNKNOWN_REQUEST: EXIT_BAD_INPUT,
    ErrorCode.UNKNOWN_MACHINE: EXIT_BAD_INPUT,
    ErrorCode.UNKNOWN_DISK: EXIT_BAD_INPUT,
    ErrorCode.UNKNOWN_POINT: EXIT_BAD_INPUT,
    ErrorCode.REPLICA_EXISTS: EXIT_BAD_INPUT,
    ErrorCode.SIZE_MISMATCH: EXIT_BAD_INPUT,
    ErrorCode.MISSING: EXIT_BAD_INPUT,
    ErrorCode.IN_USE: EXIT_FAILED,
    ErrorCode.FORBIDDEN: EXIT_REFUSED,
    ErrorCode.NOT_ENROLLED: EXIT_REFUSED,
    ErrorCode.BAD_PASSPHRASE: EXIT_REFUSED,
    ErrorCode.RATE_LIMITED: EXIT_REFUSED,
    ErrorCode.UNREACHABLE: EXIT_NOT_CONNECTED,  # the PS answered: the daemon that must do it is away
    ErrorCode.REFUSED: EXIT_FAILED,
    ErrorCode.BUSY: EXIT_FAILED,
    ErrorCode.FAILED: EXIT_FAILED,
    ErrorCode.BAD_REPLY: EXIT_FAILED,
    ErrorCode.BAD_MARKER: EXIT_FAILED,
}


def test_every_reply_code_has_its_exit_code():
    assert set(EXPECTED) == set(ErrorCode)
    for code, exit_code in EXPECTED.items():
        assert RequestFailed(code, "m").exit_code == exit_code, code
        assert RequestFailed(str(code), "m").exit_code == exit_code, code  # as it arrives off the wire
    assert RequestFailed("no-such-code", "m").exit_code == EXIT_FAILED


def test_the_process_server_away_and_a_daemon_away_are_told_apart():
    assert errors.Unreachable("x").exit_code == EXIT_UNREACHABLE == 3
    assert RequestFailed(ErrorCode.UNREACHABLE, "master target 'mt1' is not connected").exit_code == 6


def test_run_main_exits_with_the_error_s_code_and_says_why(capsys):
    def fail() -> int:
        raise RequestFailed(ErrorCode.UNREACHABLE, "master target 'mt1' is not connected: start it and retry")

    assert run_main(fail, "standby") == EXIT_NOT_CONNECTED
    assert capsys.readouterr().err == "standby: error: master target 'mt1' is not connected: start it and retry\n"

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_main(interrupted, "standby") == EXIT_INTERRUPTED


def codes_in_use() -> set[int]:
    """Every exit code a command can end with: each StandbyError class's, the EXIT_* constants, argparse's 2
    (a usage error) and the literal codes the command modules return or exit with."""
    for mod in pkgutil.walk_packages(standby.__path__, "standby."):
        importlib.import_module(mod.name)
    used = {EXIT_BAD_INPUT}  # argparse: usage errors exit 2
    todo: list[type[StandbyError]] = [StandbyError]
    while todo:
        cls = todo.pop()
        used.add(cls.exit_code)
        todo.extend(cls.__subclasses__())
    used |= {v for k, v in vars(errors).items() if k.startswith("EXIT_") and isinstance(v, int)}
    for cli in ROOT.glob("*/cli.py"):
        used |= {int(n) for n in re.findall(r"(?:return|SystemExit\()\s*(\d+)\b", cli.read_text())}
    return used


def test_every_code_in_use_is_documented():
    assert codes_in_use() <= set(EXIT_CODES)
    assert set(EXIT_CODES) <= codes_in_use()  # and nothing documented is dead


def readme_exit_codes() -> dict[int, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("Exit codes of every command", 1)[1]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", section.split("\n\n", 2)[1], re.M)
    return {int(code): meaning for code, meaning in rows}


def test_the_readme_table_is_exit_codes():
    assert readme_exit_codes() == EXIT_CODES


def test_the_admin_client_calls_a_lost_connection_or_no_answer_unreachable(monkeypatch):
    from standby.admin import client as client_mod
    from standby.plumbing.link import LinkClosed

    class FakeLink:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        async def call(self, op, timeout, **args):
            raise self.exc

        async def close(self) -> None:
            pass

    c = object.__new__(client_mod.AdminClient)
    c.identity, c.host, c.port = None, "ps.example.net", 9443
    c.local, c.where = None, "ps.example.net:9443"
    monkeypatch.setattr(client_mod, "client_context", lambda identity: None)
    for exc, words in ((TimeoutError(), "did not answer status within 60 s"),
                       (LinkClosed("connection reset"), "closed the connection during status: connection reset")):
        async def dial(*a, exc=exc, **k):
            return FakeLink(exc)

        monkeypatch.setattr(client_mod, "dial", dial)
        with pytest.raises(errors.Unreachable, match=f"the process server at ps.example.net:9443 {words}"):
            asyncio.run(c.acall("status", 60.0))
