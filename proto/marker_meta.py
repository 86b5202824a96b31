"""The JSON meta of a MARKER record, checked: what the agent writes and the master target's journal keeps.
"""

from __future__ import annotations

from typing import Any

from .enums import Consistency, ErrorCode, MarkerKind
from .fields import (
    consistency,
    count,
    generation,
    marker_kind,
    optional,
    resync_mode,
    seconds,
    sequence,
    tag,
    text,
    time_,
)
from .wire import Invalid, Wire, checked, message


@message("marker meta")
class MarkerMeta(Wire):
    """The JSON meta of a MARKER record (proto.messages.Marker.meta), as the agent writes it (kind
    initial-complete: time; resync-complete: mode, reason, bytes_differing, time; point: consistency, time,
    and tag and freeze_seconds for an app point) and as the master target's journal keeps it (kind batch,
    and `first`, the group's first sequence).

    `to_wire()` leaves out what is None. The seal of a received MARKER covers its original bytes: verify
    and store those, never a re-encoding of this object."""

    OMIT_NONE = frozenset(
        {"time", "consistency", "tag", "freeze_seconds", "mode", "reason", "bytes_differing", "first"}
    )
    generation: int = checked(generation)
    kind: MarkerKind = checked(marker_kind)
    time: float | None = checked(optional(time_), None)
    consistency: Consistency | None = checked(optional(consistency), None)
    tag: str | None = checked(optional(tag), None)
    freeze_seconds: float | None = checked(optional(seconds), None)
    mode: str | None = checked(optional(resync_mode), None)
    reason: str | None = checked(optional(text), None)
    bytes_differing: int | None = checked(optional(count), None)
    first: int | None = checked(optional(sequence), None)

    def _check(self) -> None:
        if self.kind == MarkerKind.POINT and (self.time is None or self.consistency is None):
            raise Invalid("a point needs a time and a consistency")

    @classmethod
    def from_marker(cls, meta: Any) -> MarkerMeta:
        """A peer's MARKER meta; BadRequest("bad-marker") if invalid."""
        return cls.from_wire(meta, ErrorCode.BAD_MARKER)
