"""The two ways a protocol exchange can fail.

`LocalProtocolError`: *we* tried to do something the protocol forbids (a bug on our side, or a caller
passing an invalid message). `RemoteProtocolError`: the *peer* sent something invalid. Both carry a short
reason code a daemon can put in its goodbye frame. Any other exception escaping `standby.proto` is a bug.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: `code` is a stable machine-readable reason, `str(exc)` the human explanation."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We broke the protocol (invalid message or illegal state transition on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (malformed, truncated, oversized, corrupted or out-of-order frame)."""


class EnvelopeError(Exception):
    """A payload failed authentication or its checksum: it was altered, moved or replayed.

    Raised by the master target's verification; the whole batch is rejected and nothing is written.
    """
