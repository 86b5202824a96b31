"""Per-disk runtime state of the process server: the cache, sequence positions, throughput.

A `DiskStream` is the one object both sides of a disk meet at: the agent session appends to it, the
master-target session reads from it, and status reads its counters.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from .cache import DiskCache, RecordInfo
from .health import Health


@dataclass
class Rate:
    """Bytes per second over a sliding window (default 10 s): what status shows as the rate."""

    window: float = 10.0
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, n: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples.append((now, n))
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()

    def value(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()
        if not self.samples:
            return 0.0
        span = max(now - self.samples[0][0], 1.0)
        return sum(n for _, n in self.samples) / span


class DiskStream:
    def __init__(self, disk_id: int, machine: str, cache: DiskCache, name: str = "") -> None:
        self.id = disk_id
        self.machine = machine
        self.health = Health(f"{machine}/{name or disk_id}")
        self.cache = cache
        self.received_seq = 0
        self.applied_seq = 0
        self.cursor = 0
        self.generation = 1
        self.records: dict[int, RecordInfo] = {}  # cached, not yet applied
        self.new_data = asyncio.Event()
        self.append_lock = asyncio.Lock()
        self.receive_rate = Rate()
        self.apply_rate = Rate()
        # Progress watchdog: when applying last advanced, or the backlog began (monotonic clock).
        self.progress_at = time.monotonic()
        # A record the master target refused as not authentic: the disk is quarantined from it until the
        # operator's resync sets the cached records aside (None: not quarantined).
        self.quarantined_from: int | None = None
        # Sequences received but lost (damaged cache) and passed over, whose resync was asked for.
        self.lost: tuple[int, int] | None = None
        self.initial_complete = False  # an initial-complete marker is in the cache or applied
        # Recovery points the master target has applied (promise 4: only what it holds counts for RPO; the
        # newest is in the registry row).
        self.point_times: deque[float] = deque(maxlen=10000)  # wall times of recent applied points
        self.agent_report: dict[str, object] = {}
        self.agent_report_at = 0.0
        # Pause (operator): the sender stops after the next point it forwards; `paused_at` is that point's
        # sequence. `resumed` wakes the sender.
        self.pause = False
        self.paused_at = 0
        self.resumed = asyncio.Event()
        self.mt_report: dict[str, object] = {}  # the master target's word on this disk's history (points, bytes)
        self.failed_over = False  # replication stopped by a failover: the agent's records are refused (BUSY)
        self.refusing = False  # the agent's records are being refused (BUSY): logged once per episode
        self.refused_records = 0  # records refused so far (back-pressure, status)
        # The newest sequence received that carried data (not a MARKER), since this process started: a
        # planned failback checks that no data came after the final point (processserver.roundtrip).
        self.last_data_seq = 0

    def points_since(self, t: float) -> int:
        return sum(1 for x in self.point_times if x >= t)

    @property
    def backlog_records(self) -> int:
        return max(self.received_seq - self.applied_seq, 0)
