"""The one failure of a process-server request, shared by every session (agent, master target, admin).

`plumbing.serve` answers it with its `code`, which the client maps to an exit code; it lives down here,
below the sessions, so that none of them imports another to raise it.
"""

from __future__ import annotations


class Failure(Exception):
    """A request failed with a reason code the client maps to an exit code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
