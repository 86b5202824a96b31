"""User-facing errors and exit codes, and the one top-level handler every command runs under.

Exit codes are stable, for scripts: EXIT_CODES below says what each means (README "Exit codes" is the
same table, checked by tests/plumbing/test_errors.py). 3 and 6 differ in who is away: with 3 the command
itself could not talk to the process server; with 6 the process server answered, but the daemon that
must do the work (a master target or an agent) is not connected to it or did not answer it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from standby.proto.enums import ErrorCode

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_NOT_STARTED = 5
EXIT_NOT_CONNECTED = 6
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_FAILED: "failed, or not possible in the current state (failed over, committed, already running, disk in use): "
    "the message says why",
    EXIT_BAD_INPUT: "bad input: bad arguments, unknown machine, disk or point, replica exists, size mismatch, "
    "disk missing",
    EXIT_UNREACHABLE: "the process server cannot be reached, or the connection to it was lost",
    EXIT_REFUSED: "not enrolled, or refused by the process server (certificate, permission, passphrase, rate "
    "limit)",
    EXIT_NOT_STARTED: "a daemon's `run` could not start (bad config, port in use, not enrolled)",
    EXIT_NOT_CONNECTED: "the process server answered, but what must do it (a master target, an agent, or a vCenter) "
    "is not connected to it or did not answer",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class StandbyError(Exception):
    """An operation failed; the message says what and, where we know, what to do."""

    exit_code = EXIT_FAILED


class BadInput(StandbyError):
    exit_code = EXIT_BAD_INPUT


class Unreachable(StandbyError):
    exit_code = EXIT_UNREACHABLE


class Refused(StandbyError):
    exit_code = EXIT_REFUSED


class NotConnected(StandbyError):
    """The process server cannot reach the daemon that must do the work (ErrorCode.UNREACHABLE)."""

    exit_code = EXIT_NOT_CONNECTED


class NotStarted(StandbyError):
    exit_code = EXIT_NOT_STARTED


# Error codes in replies from the server, mapped to the exception the CLI raises for them.
REPLY_CODES: dict[str, type[StandbyError]] = {
    ErrorCode.BAD_INPUT: BadInput,
    ErrorCode.UNKNOWN_MACHINE: BadInput,
    ErrorCode.UNKNOWN_DISK: BadInput,
    ErrorCode.UNKNOWN_POINT: BadInput,
    ErrorCode.REPLICA_EXISTS: BadInput,
    ErrorCode.SIZE_MISMATCH: BadInput,
    ErrorCode.MISSING: BadInput,
    ErrorCode.UNKNOWN_REQUEST: BadInput,
    ErrorCode.FORBIDDEN: Refused,
    ErrorCode.NOT_ENROLLED: Refused,
    ErrorCode.BAD_PASSPHRASE: Refused,
    ErrorCode.RATE_LIMITED: Refused,
    ErrorCode.UNREACHABLE: NotConnected,
}  # every other code (refused, busy, failed, bad-reply, bad-marker) is EXIT_FAILED


class RequestFailed(StandbyError):
    """The one failure of a request, on both ends: a daemon's handler raises it with a reason code
    (proto.enums.ErrorCode) and a message; plumbing.serve answers the request with both; the requester's
    Link.request raises it again from the reply, with the exit code its code maps to (REPLY_CODES)."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = REPLY_CODES.get(code, StandbyError).exit_code


def run_main(fn: Callable[[], int | None], prog: str) -> int:
    """Run a command: map our exceptions to their message and exit code, never a traceback."""
    try:
        return fn() or EXIT_OK
    except StandbyError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILED
    except Exception:
        logging.getLogger(prog).exception("unexpected error (a bug: please report it with this trace)")
        return EXIT_FAILED
