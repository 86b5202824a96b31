"""What `standby status` says of a machine's round trip: its direction, the phase in words with the progress
inside it (reprotecting 43 %, ready to fail back, synchronising, ...), the policy of the direction it
replicates in, the failback's final points, and the history of phases with times and bytes."""

from __future__ import annotations

import time
from typing import Any

from standby.proto.states import Direction, Phase, Replication

from .hub import Hub
from .trips import Trip

# Caught up enough to shut down: the final sync then ships at most this many records of the last seconds.
CAUGHT_UP_RECORDS = 64
HISTORY_SHOWN = 30  # phases of a round trip in status: the last five round trips


def _progress(disks: list[dict[str, Any]]) -> float:
    """How far the copy or comparison of the direction's disks is, 0..1 (1: every disk in delta replication)."""
    parts = []
    for d in disks:
        if d["replication"] == "Delta":
            parts.append(1.0)
        elif d["replication"] in ("Resync", "Initial") and d.get("resync"):
            # A reprotect or reverse into existing disks is an Initial with a checksum resync: its progress
            # is the resync's (the applied cursor stays at 0 there, which read "0 %" to the end).
            parts.append(float(d["resync"].get("progress") or 0.0))
        else:
            parts.append(float(d.get("progress") or 0.0))
    return sum(parts) / len(parts) if parts else 0.0


FRESH_REPORT = 30.0  # seconds: an older agent report is not believed (as status.continuous)


def written_late(ps: Hub, trip: Trip) -> int:
    """Bytes the recovered machine's agent holds as written and not shipped, by its reports made after the
    failback completed (a report from before may still count what the final batch shipped)."""
    since = (trip.data.get("final") or {}).get("completed_at", 0.0)
    now, late = time.time(), 0
    for row in ps.registry.disks(machine=trip.active):
        st = ps.streams.get(row.id)
        if st is not None and st.agent_report_at > since and now - st.agent_report_at < FRESH_REPORT:
            late += int(st.agent_report.get("dirty_bytes") or 0)
    return late


def state_words(trip: Trip, disks: list[dict[str, Any]], ready: str, late: int = 0) -> str:
    """The phase as the operator reads it, from the stored phase and the direction's disks now."""
    reps = {d["replication"] for d in disks}
    pct = f"{100 * _progress(disks):.0f} %"
    if "Committed" in reps:
        return {Phase.FAILED_BACK: "failed back (committed): ready for reverse replication"}.get(
            trip.phase, "failed over (committed): ready to reprotect")
    if "FailedOver" in reps:
        if trip.phase is not Phase.FAILED_BACK:
            return "failed over, pending commit"
        # The recovered machine's agent still tracks its disks: a write after the final point is refused
        # (nothing applies any more) and stays in its dirty map, and would be lost at commit (written_late).
        if late:
            return (f"failed back, pending commit; WRITTEN AFTER THE FINAL POINT: {late} bytes on the recovered "
                    "machine that the original disks do not have (do not commit: start the failback again)")
        return "failed back, pending commit"
    syncing = bool(reps & {"Initial", "Resync"}) or not disks
    if trip.phase is Phase.REPROTECTING:
        return f"reprotecting {pct}" if syncing else "ready to fail back"
    if trip.phase is Phase.SYNCHRONISING:
        if syncing:
            return f"synchronising {pct}" + (" (full download)" if trip.data.get("sync") == "full" else "")
        return "synchronising" + (f": {ready}" if ready else ": ready to complete")
    if trip.phase in (Phase.REVERSING, Phase.PROTECTED):
        return f"reverse replication {pct}" if syncing else "protected"
    return str(trip.phase)


def failback_ready(ps: Hub, trip: Trip) -> str:
    """Why a failback cannot complete now ("" when it can): the recovered machine's agent connected (the
    shutdown step is its), every disk in delta replication, caught up."""
    if trip.active not in ps.agent_sessions:
        # After a restart of either daemon the agent comes back within its reconnect backoff (10 s); status
        # must not say ready while `--complete` would be refused at the shutdown step.
        return f"the recovered machine's agent {trip.active} is not connected (start it, or wait for it to reconnect)"
    for d in ps.registry.disks(machine=trip.active):
        if d.mt is None:
            continue
        if d.mt not in ps.mt_sessions:
            return f"master target {d.mt} (the original site) is not connected: start it"
        if d.replication is not Replication.DELTA:
            return f"disk {d.name} is {d.replication} (synchronising)"
        if d.resync_request:  # asked (a full download), not begun yet: still in delta, but not caught up
            return f"disk {d.name} is to be copied again (its resync has not begun yet)"
        st = ps.streams.get(d.id)
        if st is not None and st.backlog_records > CAUGHT_UP_RECORDS:
            return f"disk {d.name} has {st.backlog_records} records still to apply"
    return ""


def trips_status(ps: Hub, disks: list[dict[str, Any]], machine: str | None) -> list[dict[str, Any]]:
    """One entry per round trip (of `machine` only, when given)."""
    out = []
    for trip in ps.trips.all():
        if machine is not None and machine not in (trip.name, trip.recovered):
            continue
        mine = [d for d in disks if d["machine"] == trip.active and d["mt"]]
        policy = trip.data.get("policy") if trip.direction is Direction.REVERSE else None
        out.append({
            "name": trip.name,
            "direction": trip.direction.value,
            "phase": trip.phase.value,
            "state": state_words(trip, mine, failback_ready(ps, trip) if trip.phase is Phase.SYNCHRONISING else "",
                                 written_late(ps, trip) if trip.phase is Phase.FAILED_BACK else 0),
            "active": trip.active,
            "recovered": trip.recovered,
            "home_mt": trip.data.get("home_mt"),
            "location": trip.data.get("location"),
            "round_trips": trip.trips,
            "policy": policy,
            "final": trip.data.get("final"),
            "history": ps.trips.history(trip.name, HISTORY_SHOWN),
        })
    return out
