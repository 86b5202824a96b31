"""`Point`, a recovery point: the one shape the master target, the process server and the CLI speak of.

A recovery point is where a disk's replica equalled the source disk at one instant (DESIGN promise 4):
after applying the MARKER record of `sequence` (kind `point`) of `generation`, at `time` (the wall clock of
the agent's cut), with what the instant promises (`consistency`) and the operator's `tag` of an
app-consistent point made on demand.

It is born from a MARKER's meta (the agent's, `from_marker`; or the journal's copy of it, `from_group`) and
travels as:
- `mastertarget.diskstate.ReplicaState.last_point`: `to_wire()` of the newest point applied;
- retention planning (`mastertarget.retention.Span`): the point and the undo bytes up to the next one;
- the `points` reply (`proto.mt_requests.PointInfo`): its wire form, with the history bytes going back
  to it costs and without its generation (the JSON peers and scripts read is unchanged).
"""

from __future__ import annotations

from typing import Any, Protocol

from .enums import Consistency
from .fields import MAX_POINT_TIME, consistency, generation, optional, point_time, record_sequence, tag
from .messages import Marker
from .wire import Check, Invalid, Wire, checked, message


class Committed(Protocol):
    """A group of the master target's retention journal (mastertarget.segments.Group): the sequence of its
    MARKER record and the meta that record keeps."""

    @property
    def last(self) -> int: ...

    @property
    def meta(self) -> dict[str, Any]: ...


@message("recovery point")
class Point(Wire):
    # The MARKER's sequence: identifies the point on its disk. As wide as the frame header's (a damaged journal
    # may hold one beyond what a request carries: listing the point, PointInfo, refuses it).
    sequence: int = checked(record_sequence)
    # The fields below take their "unknown" value (0, 0.0, None, "") where a journal record's meta does not
    # give a valid one (see from_meta): None is never a consistency a point can be listed with.
    generation: int = checked(generation)
    time: float = checked(point_time)
    consistency: Consistency | None = checked(optional(consistency))
    tag: str = checked(tag, "")

    @property
    def is_app(self) -> bool:
        return self.consistency is Consistency.APP

    @classmethod
    def from_meta(cls, seq: int, meta: dict[str, Any]) -> Point:
        """The point of a MARKER meta of kind `point`: the agent's (checked by proto.marker_meta.MarkerMeta
        before it is applied) or the journal's copy (which adds `first`).

        Never refuses: the journal's copy is read back from the retention volume, where only the JSON and an
        integer generation are checked (mastertarget.journal_codec.decode_group_end), and a damaged record must
        not stop the disk from opening. A field whose value does not check takes its unknown value instead:
        generation 0, time 0.0 (see meta_time), consistency None (so the point cannot be listed: a listed
        point names its consistency), tag ""."""
        return cls(
            seq,
            _or(generation, meta.get("generation"), 0),
            meta_time(meta),
            _or(consistency, meta.get("consistency"), None),
            _or(tag, meta.get("tag"), ""),
        )

    @classmethod
    def from_marker(cls, c: Marker) -> Point:
        return cls.from_meta(c.sequence, c.meta)

    @classmethod
    def from_group(cls, g: Committed) -> Point:
        """The point a journal group ends at (the group must be one: `g.is_point`)."""
        return cls.from_meta(g.last, g.meta)


def _or(check: Check, v: Any, unknown: Any) -> Any:
    try:
        return check(v)
    except Invalid:
        return unknown


def meta_time(meta: dict[str, Any]) -> float:
    """A marker's `time`, or 0.0 when it is not a plausible wall-clock time (a peer's value: validated)."""
    t = meta.get("time")
    if isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t < MAX_POINT_TIME:
        return float(t)
    return 0.0
