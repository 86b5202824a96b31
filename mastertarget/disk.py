"""The narrow interface the operations and the retention upkeep see of an open disk (and of the master
target that holds the open disks), so that they depend on what they use and not on the daemon.

`worker.DiskWorker` is the one real `Disk` and `daemon.MasterTarget` the one real `Disks`; tests pass
small stand-ins. Every call on a `Disk` that reads or writes its replica or journal is made under its
`lock` (applying, resync hashing and the operations never overlap), in a worker thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .diskstate import ReplicaState
from .journal import DiskJournal
from .replicas import Replica
from .retention import Policy


@dataclass
class RetentionMarks:
    """What the retention upkeep notes about one disk between two rounds."""

    space_cap: int | None = None  # a tighter space cap for its history, set under retention-volume pressure
    alert: str = ""  # the last space-pressure alert (status shows it a while after pruning fixed it)
    alert_at: float = 0.0  # when it was raised (wall clock)


@dataclass
class ApplyStats:
    """What applying a disk has done since the master target started (its metrics: mastertarget.metrics).
    Kept by the daemon across the disk's workers, so the counters only grow."""

    records: int = 0
    bytes: int = 0  # logical bytes of the batches applied (zeros counted)
    groups: int = 0  # groups applied: each one verify, write, sync, journal, ack
    seconds: float = 0.0  # spent applying those groups, from verifying to acknowledging

    def applied(self, records: int, nbytes: int, seconds: float) -> None:
        self.records += records
        self.bytes += nbytes
        self.groups += 1
        self.seconds += seconds


class Disk(Protocol):
    """One open disk: its replica, its retention journal, its durable state and its lock."""

    state: ReplicaState
    journal: DiskJournal
    lock: asyncio.Lock
    halted: bool  # failed over: records are no longer applied
    pins: int  # test failovers reading the journal: no pruning meanwhile
    failover_problem: str | None  # why the last failover move broke off
    retention: RetentionMarks

    @property
    def replica(self) -> Replica: ...

    def halt(self) -> None:
        """Stop applying (failover); what is queued stays unacknowledged in the process server."""


class NotOpen(Exception):
    """The disk is not open on this master target (the message says why)."""


class Disks(Protocol):
    """The master target as the operations see it: its open disks, where their state files live and the
    retention policy."""

    @property
    def disks_dir(self) -> Path: ...

    @property
    def policy(self) -> Policy: ...

    def disk(self, disk: int) -> Disk:
        """The open disk, or NotOpen."""
        ...
