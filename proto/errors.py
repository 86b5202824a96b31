"""The two ways a protocol exchange can fail.

`LocalProtocolError`: *we* tried to do something the protocol forbids (a bug on our side, or a caller
passing an invalid message). `RemoteProtocolError`: the *peer* sent something invalid. Both carry a short
reason code, a proto.enums.GoodbyeCode (an ErrorCode for a request's: proto.wire's BadRequest and
InvalidMessage); a daemon sends a RemoteProtocolError's in the GOODBYE that ends the connection. Any other
exception escaping `standby.proto` is a bug.
"""

from __future__ import annotations

from .enums import ErrorCode, GoodbyeCode


class ProtocolError(Exception):
    """Base class: `code` is a stable machine-readable reason, `str(exc)` the human explanation."""

    def __init__(self, code: GoodbyeCode | ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We broke the protocol (invalid message or illegal state transition on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (malformed, truncated, oversized, corrupted or out-of-order frame)."""

    @property
    def goodbye_code(self) -> GoodbyeCode:
        """The code of the GOODBYE that ends the connection over this error: its own word. A BadRequest's
        code is an ErrorCode, and every word one carries is a GoodbyeCode word too (proto.enums); were one
        not, the goodbye says `bad-message` rather than the closing fail."""
        try:
            return GoodbyeCode(self.code)
        except ValueError:
            return GoodbyeCode.BAD_MESSAGE


class EnvelopeError(Exception):
    """A payload failed authentication or its checksum: it was altered, moved or replayed.

    Raised by the master target's verification; the whole batch is rejected and nothing is written.
    """
