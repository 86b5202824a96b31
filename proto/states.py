"""The state of a protected disk: two axes with exact names, one transition table, one line per move.

Theory of operation
-------------------
Each protected disk has a state on two axes (DRBD's habit: separate axes, exact names), kept by the
configuration service and shown by `standby status` in these words:

- **disk** — what the replica holds:
  `Inconsistent` — not yet a copy of the source at any one instant (before and during initial replication
  and resync); `UpToDate` — a copy of the source at its last applied recovery point (or, failed over, at
  the point chosen).
- **replication** — what the pipeline does for the disk:
  `Off` — not protected; `Initial` — initial replication (a copy, or a checksum comparison against a seed
  replica); `Delta` — continuous replication of changed blocks; `Resync` — a checksum resync, started for
  a stated reason (tracking lost, unclean stop, disk resized, sequence gap, operator); `FailedOver` — the
  replica was failed over to a recovery point and nothing more is applied; `Committed` — the failover was
  committed: the replica is the machine now.

Reprotect (replication the other way, from the failed-over machine back to the original site) needs no
replication state of its own: it is a new protection — of the recovered machine's disks, into the original
disks — whose disks take the same states. What spans the two protections is the machine's **round trip**
(`Direction`, `Phase`, `PHASE_MOVES` below), kept by the configuration service.

The disk axis follows from the replication axis (`disk_state`), so only replication moves are in the
table. `TRANSITIONS` lists every legal move with what causes it. `move()` checks one and returns the new
state, or raises `IllegalTransition` and the caller keeps the old state (h11's rule: an illegal move
changes nothing). `describe()` is the one log line a move gets:
`disk web01/sda: replication Delta -> Resync, disk UpToDate -> Inconsistent (reason: tracking lost)`.

Pause is not a replication state: pausing holds the *applying* of a disk at its next recovery point
while replication goes on into the cache; status shows it as `applying: paused`.

No I/O here: the daemons log the line and store the state.
"""

from __future__ import annotations

from enum import StrEnum

from .enums import GoodbyeCode
from .errors import LocalProtocolError


class DiskState(StrEnum):
    INCONSISTENT = "Inconsistent"
    UP_TO_DATE = "UpToDate"


class Replication(StrEnum):
    OFF = "Off"
    INITIAL = "Initial"
    DELTA = "Delta"
    RESYNC = "Resync"
    FAILED_OVER = "FailedOver"
    COMMITTED = "Committed"


R, D = Replication, DiskState

# (old, new) -> what causes the move. A move to the same state is no move (nothing is logged).
TRANSITIONS: dict[tuple[Replication, Replication], str] = {
    (R.OFF, R.INITIAL): "protect",
    (R.INITIAL, R.DELTA): "initial replication complete",
    (R.DELTA, R.RESYNC): "a resync began",
    # The initial copy's last record was received (so the agent's next copy is a resync) but is not yet
    # applied: the replica was never up to date.
    (R.INITIAL, R.RESYNC): "a resync began",
    (R.RESYNC, R.DELTA): "resync complete",
    # A machine fails over as a whole: a disk still in initial replication or resync fails over too, to the
    # last point its journal holds (with none to offer, the failover is refused before anything moves).
    (R.INITIAL, R.FAILED_OVER): "failover",
    (R.DELTA, R.FAILED_OVER): "failover",
    (R.RESYNC, R.FAILED_OVER): "failover",
    (R.FAILED_OVER, R.COMMITTED): "failover committed",
}

# Where replication has stopped: no record is applied to the disk, no resync starts, no point is made.
FAILED_OVER = frozenset({R.FAILED_OVER, R.COMMITTED})


class IllegalTransition(LocalProtocolError):
    """A move the table does not allow: a bug or a race in the caller, which keeps the old state."""


def disk_state(replication: Replication) -> DiskState:
    """The disk axis follows from the replication axis: the replica is a copy of the source at one instant
    except while none exists yet or one is being made (initial replication, resync)."""
    return D.INCONSISTENT if replication in (R.OFF, R.INITIAL, R.RESYNC) else D.UP_TO_DATE


def move(old: Replication, new: Replication) -> Replication:
    """`new` if the table allows `old -> new` (or they are equal); else IllegalTransition."""
    if old == new or (old, new) in TRANSITIONS:
        return new
    raise IllegalTransition(GoodbyeCode.ILLEGAL_TRANSITION, f"replication {old} -> {new} is not a legal move")


def describe(disk: str, old: Replication, new: Replication, reason: str) -> str:
    """The one log line of a move, naming the disk axis too when it changes:
    `disk web01/sda: replication Delta -> Resync, disk UpToDate -> Inconsistent (reason: tracking lost)`."""
    line = f"disk {disk}: replication {old} -> {new}"
    if disk_state(old) != disk_state(new):
        line += f", disk {disk_state(old)} -> {disk_state(new)}"
    return f"{line} (reason: {reason})"


class Direction(StrEnum):
    """Which way a machine replicates: from its original site to the recovery site, or back."""

    FORWARD = "forward"  # the original machine's disks -> the replicas at the recovery site
    REVERSE = "reverse"  # the recovered machine's disks -> the original disks (or new ones) at the original site


class Phase(StrEnum):
    """The step of a machine's round trip that the operator's commands moved it to. Progress inside a step
    (reprotecting 43 %, ready to fail back, synchronising) comes from the disks' replication states."""

    PROTECTED = "protected"  # forward replication (the first protection, or after reverse replication)
    REPROTECTING = "reprotecting"  # reverse replication: seeding, then delta (then it is ready to fail back)
    SYNCHRONISING = "synchronising"  # failback asked for: catching up while the recovered machine runs
    SHUTTING_DOWN = "shutting-down"  # the recovered machine's shutdown step: workload stopped, final point
    FINAL_SYNC = "final-sync"  # the final point travels and the original disks are moved to it
    FAILED_BACK = "failed-back"  # failed over at the original site to the final point: commit, then reverse
    REVERSING = "reversing"  # reverse replication: the original machine protected again into the replicas


P = Phase
# (old, new) -> the command that makes the move. Failover and commit in either direction are disk moves
# (the table above); the round trip only moves at these commands.
PHASE_MOVES: dict[tuple[Phase, Phase], str] = {
    (P.PROTECTED, P.REPROTECTING): "reprotect",
    (P.REVERSING, P.REPROTECTING): "reprotect",
    (P.REPROTECTING, P.SYNCHRONISING): "failback",
    (P.SYNCHRONISING, P.REPROTECTING): "failback --cancel",
    (P.REPROTECTING, P.SHUTTING_DOWN): "failback --sync full (stop first, then copy every block)",
    (P.SYNCHRONISING, P.SHUTTING_DOWN): "failback --complete",
    (P.SHUTTING_DOWN, P.FINAL_SYNC): "the final point was cut",
    (P.SHUTTING_DOWN, P.SYNCHRONISING): "the shutdown step ended without a final point (or began a full copy)",
    (P.FINAL_SYNC, P.SYNCHRONISING): "the final sync failed",
    (P.FINAL_SYNC, P.FAILED_BACK): "failed over to the final point",
    (P.FAILED_BACK, P.REVERSING): "reverse",
}


def phase_move(old: Phase, new: Phase) -> Phase:
    """`new` if the round-trip table allows `old -> new` (or they are equal); else IllegalTransition."""
    if old == new or (old, new) in PHASE_MOVES:
        return new
    raise IllegalTransition(GoodbyeCode.ILLEGAL_TRANSITION, f"round trip {old} -> {new} is not a legal move")
