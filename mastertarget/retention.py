"""Retention planning: which recovery points to keep (DESIGN §7, issue 4). A pure function — no I/O.

The journal holds undo records per batch. Going back to a point means applying, newest first, the undo
records of every batch after it, so:

- dropping the **oldest** point frees the undo records between it and the next point kept (its
  `segment_bytes`): that is the only way space comes back;
- dropping a point in the **middle** (thinning) frees nothing by itself — the undo records are still
  needed to reach older points — but it lets the journal merge the segments on both sides later (only
  the oldest content of a block matters), and it keeps the list short for people.

Rules, in this order:
1. The newest point is always kept (it is "latest-processed").
2. Points older than the window go, oldest first — but if none is inside the window, the newest is kept;
   the oldest point inside the window is kept too (thinning never shortens the reachable window).
3. Tiered thinning by age: each tier (up to `age` seconds old) keeps at most one point per `every`
   seconds (the newest in each bucket); `every` 0 keeps all. App-consistent points are kept in
   preference to crash-consistent ones of the same bucket.
4. Space: while the kept points' undo bytes exceed the cap, the oldest kept point goes (never the
   newest), and the plan carries an alert saying how many points space pressure removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from standby.proto import point as recovery


@dataclass(frozen=True, slots=True)
class Span:
    """Planning's input: a recovery point (proto.point.Point) and the undo bytes of the batches from it up to
    the next newer point — the space that goes when it goes as the oldest. The bytes are the journal's
    figure, not the point's: they change as neighbours are dropped (a plan's `keep` spans up to the next
    *kept* point), so they travel beside the point rather than in it."""

    point: recovery.Point
    segment_bytes: int = 0

    @property
    def sequence(self) -> int:
        return self.point.sequence

    @property
    def time(self) -> float:
        return self.point.time


@dataclass(frozen=True, slots=True)
class Tier:
    age: float  # applies to points up to this many seconds old
    every: float  # keep one point per this many seconds (0: all)


@dataclass(frozen=True, slots=True)
class Policy:
    """The seeds' failback policy: retention 24 h, RPO threshold 15 min, app-consistent every 60 min."""

    window: float = 24 * 3600.0
    space_cap: int | None = None  # bytes of undo records, None: no cap
    tiers: tuple[Tier, ...] = (Tier(3600.0, 0.0), Tier(6 * 3600.0, 300.0), Tier(24 * 3600.0, 3600.0))
    rpo_threshold: float = 15 * 60.0
    app_every: float = 3600.0

    def __post_init__(self) -> None:
        if self.window <= 0:
            raise ValueError("the retention window must be positive")
        if self.space_cap is not None and self.space_cap < 0:
            raise ValueError("the space cap cannot be negative")
        ages = [t.age for t in self.tiers]
        if ages != sorted(ages) or any(t.every < 0 or t.age <= 0 for t in self.tiers):
            raise ValueError("tiers must have growing ages and non-negative intervals")


@dataclass(slots=True)
class Plan:
    keep: list[Span] = field(default_factory=list)
    drop: list[Span] = field(default_factory=list)
    alert: str = ""

    @property
    def kept_bytes(self) -> int:
        """Undo bytes the kept points need (in `keep`, segment_bytes spans up to the next kept point)."""
        return sum(p.segment_bytes for p in self.keep)


def plan(points: list[Span], now: float, policy: Policy) -> Plan:
    """Decide which of `points` (any order; sequences unique) to keep at time `now`. In the plan,
    `keep[i].segment_bytes` is the span up to the next kept point: what dropping it as the oldest frees."""
    pts = sorted(points, key=lambda p: p.sequence)
    if not pts:
        return Plan()
    newest = pts[-1]
    keep: set[int] = {newest.sequence}
    candidates = [p for p in pts[:-1] if now - p.time <= policy.window]
    buckets: dict[tuple[int, int], Span] = {}
    for p in candidates:
        age = max(now - p.time, 0.0)
        tier = next((i for i, t in enumerate(policy.tiers) if age <= t.age), None)
        if tier is None:
            keep.add(p.sequence)  # beyond the last tier but inside the window: no thinning asked for
            continue
        every = policy.tiers[tier].every
        if every <= 0:
            keep.add(p.sequence)
            continue
        key = (tier, int(p.time // every))
        best = buckets.get(key)
        # The newest of each bucket, an app-consistent one before any crash-consistent one.
        if best is None or (p.point.is_app, p.sequence) > (best.point.is_app, best.sequence):
            buckets[key] = p
    keep.update(p.sequence for p in buckets.values())
    if candidates:
        keep.add(candidates[0].sequence)  # the oldest point inside the window: thinning never takes it
    kept = [p for p in pts if p.sequence in keep]
    # Segments belong to the span up to the next point: a dropped middle point's segment is still needed
    # to reach older kept points, so count spans between kept points.
    spans = _spans(pts, kept)
    alert = ""
    if policy.space_cap is not None:
        pruned = 0
        while len(kept) > 1 and sum(spans[p.sequence] for p in kept) > policy.space_cap:
            gone = kept.pop(0)
            spans.pop(gone.sequence)
            pruned += 1
        if pruned:
            alert = (
                f"retention space pressure: removed the {pruned} oldest point(s) to stay under "
                f"{policy.space_cap} bytes of history"
            )
        if sum(spans[p.sequence] for p in kept) > policy.space_cap:
            alert = (alert + "; " if alert else "") + "the newest point alone needs more than the space cap"
    kept_ids = {p.sequence for p in kept}
    return Plan(
        keep=[Span(p.point, spans[p.sequence]) for p in kept],
        drop=[p for p in pts if p.sequence not in kept_ids],
        alert=alert,
    )


def _spans(pts: list[Span], kept: list[Span]) -> dict[int, int]:
    """For each kept point, the undo bytes from it up to the next kept point (the segments of the dropped
    points in between included): what dropping it as the oldest would free."""
    kept_ids = {p.sequence for p in kept}
    out: dict[int, int] = {}
    current: int | None = None
    for p in pts:
        if p.sequence in kept_ids:
            current = p.sequence
            out[current] = 0
        if current is not None:
            out[current] += p.segment_bytes
    return out
