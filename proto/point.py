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

from .enums import Consistency, ErrorCode, MarkerKind
from .fields import MAX_POINT_TIME, consistency, generation, sequence, tag, time_
from .marker_meta import MarkerMeta
from .messages import Marker
from .wire import BadRequest, Wire, checked, message


class Ended(Protocol):
    """A group of the master target's retention journal (mastertarget.segments.Group): the sequence of its
    END record and the meta that record keeps (checked when it was read: mastertarget.journal_codec)."""

    @property
    def last(self) -> int: ...

    @property
    def meta(self) -> dict[str, Any]: ...


@message("recovery point")
class Point(Wire):
    sequence: int = checked(sequence)  # the MARKER's sequence: identifies the point on its disk
    generation: int = checked(generation)
    time: float = checked(time_)
    consistency: Consistency = checked(consistency)
    tag: str = checked(tag, "")

    @property
    def is_app(self) -> bool:
        return self.consistency is Consistency.APP

    @classmethod
    def from_meta(cls, seq: int, meta: dict[str, Any]) -> Point:
        """The point of a MARKER meta of kind `point`, checked before: the agent's (proto.marker_meta.MarkerMeta,
        before it is applied) or the journal's copy, which adds `first` (checked when the journal is read).
        BadRequest if it is not one: a bug, never a peer's value."""
        m = MarkerMeta.from_wire(meta, what="recovery point")
        if m.kind != MarkerKind.POINT:
            raise BadRequest(ErrorCode.BAD_INPUT, f"recovery point: a marker of kind {m.kind} is not one")
        assert m.time is not None and m.consistency is not None  # MarkerMeta._check: a point has both
        return cls(seq, m.generation, m.time, m.consistency, m.tag or "")

    @classmethod
    def from_marker(cls, c: Marker) -> Point:
        return cls.from_meta(c.sequence, c.meta)

    @classmethod
    def from_group(cls, g: Ended) -> Point:
        """The point a journal group ends at (the group must be one: `g.is_point`)."""
        return cls.from_meta(g.last, g.meta)


def meta_time(meta: dict[str, Any]) -> float:
    """A marker's `time`, or 0.0 when it is not a plausible wall-clock time (a peer's value: validated)."""
    t = meta.get("time")
    if isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t < MAX_POINT_TIME:
        return float(t)
    return 0.0
