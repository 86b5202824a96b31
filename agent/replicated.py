"""One protected disk as the agent replicates it: the state that outlives a connection (its change
tracking, delta statistics, the resync it needs and the progress of the one running, its last failure)
and what its workers need from the agent (configuration, batch builder, marker sealing, and the wakeup
that makes the agent report at once).

The workers get this object, never the Agent: initial replication (agent.initial), delta shipping
(agent.delta), resync (agent.resync) and app-consistent points (agent.appoint) each see what concerns
their disk, and only the agent (agent.daemon) sees every disk and the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from standby.proto.envelope import Sealer
from standby.proto.messages import Marker, meta_bytes

from . import cleanstop
from .config import AgentConfig
from .cuts import AppCut, CutOrder
from .disk import LocalDisk
from .reader import BatchBuilder, disk_size
from .tracker import TrackingLost, make_tracker
from .tracking import Tracking

log = logging.getLogger("standby.agent.replicated")


@dataclass
class DeltaStats:
    epochs: int = 0
    points: int = 0
    inconsistent: int = 0
    bytes_shipped: int = 0
    last_inconsistent_reason: str = ""
    app_points: int = 0
    last_app_point: dict[str, Any] | None = None  # {time, freeze_seconds, tag}


class Progress:
    """What status shows while a resync runs."""

    def __init__(self, mode: str, reason: str, size: int) -> None:
        self.mode = mode
        self.reason = reason
        self.phase = "waiting"
        self.total = size
        self.done = 0
        self.bytes_differing = 0
        self.bytes_shipped = 0
        self.hash_bytes = 0  # hash bytes received from the master target
        self.started = time.time()
        self.finished: float | None = None

    def report(self) -> dict[str, object]:
        el = (self.finished or time.time()) - self.started
        rate = self.done / el if el > 0 else 0.0
        return {
            "mode": self.mode,
            "reason": self.reason,
            "phase": self.phase,
            "progress": self.done / self.total if self.total else 1.0,
            "eta_seconds": (self.total - self.done) / rate if rate > 0 else None,
            "bytes_differing": self.bytes_differing,
            "bytes_shipped": self.bytes_shipped,
            "hash_bytes": self.hash_bytes,
            "elapsed": el,
        }


class Cutter(Protocol):
    """A disk in delta replication, as the app-point coordinator sees it (agent.delta.Shipper)."""

    def order_cut(self, app: AppCut | None = None, lesser: str = "") -> CutOrder: ...


@dataclass(eq=False)
class ReplicatedDisk:
    """Everything the agent keeps about one protected disk across connections."""

    disk: LocalDisk
    cfg: AgentConfig
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)  # the agent's: set it to report now
    tracking: Tracking | None = None
    stats: DeltaStats = field(default_factory=DeltaStats)
    resync_wanted: tuple[str, str] | None = None  # (mode, reason) of the resync this disk needs
    resync_progress: Progress | None = None  # of the last resync started
    unproven: str | None = None  # why this agent run cannot vouch for the writes made before it
    error: str | None = None  # why its replication failed (until it works again)
    shipper: Cutter | None = None  # while it is in delta replication (agent.delta.Shipper.run sets it)
    announced: bool = False  # its delta replication was announced in the log
    copying: bool = False  # its initial replication is running

    @property
    def name(self) -> str:
        return self.disk.cfg.name

    def want_resync(self, mode: str, reason: str) -> None:
        """Ask for a resync, unless one is wanted already (its reason stays: it came first)."""
        if self.resync_wanted is None:
            self.resync_wanted = (mode, reason)

    def builder(self) -> BatchBuilder:
        """Seals this disk's batches (the full-scan tracker learns what is shipped through it)."""
        d = self.disk
        tracker = self.tracking.tracker if self.tracking is not None else None
        return BatchBuilder(str(d.cfg.path), d.id, d.key, d.uid.bytes, self.cfg.compression_level, tracker)

    def make_marker(self, seq: int, meta: dict[str, Any]) -> Marker:
        d = self.disk
        sealer = Sealer(d.key, d.uid.bytes)
        return Marker(d.id, seq, meta, sealer.seal_batch(int(meta["generation"]), seq, meta_bytes(meta)))

    # -- tracking -----------------------------------------------------------------------------------
    def start_tracking(self) -> Tracking | None:
        """Start the disk's tracker (before anything reads the disk) and decide whether the writes made
        before this agent run are accounted for."""
        d, cfg, name = self.disk, self.cfg, self.name
        try:
            size = disk_size(d.cfg.path)
            tracker = make_tracker(cfg.tracker, str(d.cfg.path), size, d.instance, cfg.trace_buffer >> 10)
            tracker.start()
        except (OSError, TrackingLost) as exc:
            log.error("disk %s: cannot track changes of %s: %s", name, d.cfg.path, exc)
            return None
        tr = self.tracking = Tracking(d, tracker, size)
        extents, why = cleanstop.load(cfg.disks_dir, name, str(d.cfg.path), size)
        if why:
            self.unproven = why
        else:
            tr.map.mark_extents(extents)
            log.info("disk %s: clean-stop record accepted (%d bytes dirty carried over)", name, tr.map.dirty_bytes)
        log.info("disk %s: tracking changes with the %s tracker", name, tracker.name)
        return tr

    def retire_tracking(self) -> None:
        """The disk changed size (a new tracking starts at the new size) or is no longer protected: this
        tracking ends, its poll loop too."""
        tr, self.tracking = self.tracking, None
        if tr is not None:
            tr.retired = True
            tr.tracker.close()

    def stop_tracking(self) -> None:
        """Clean stop: record the dirty map with the device's write counters, then stop tracking."""
        tr, self.tracking = self.tracking, None
        if tr is None:
            return
        d = self.disk
        try:
            counters = cleanstop.write_counters(str(d.cfg.path))
            tr.drain()
            if tr.lost is None and counters is not None:
                extents = tr.map.extents()
                cleanstop.save(self.cfg.disks_dir, self.name, str(d.cfg.path), tr.size, counters, extents)
        except OSError as exc:
            log.error("disk %s: cannot write the clean-stop record: %s", self.name, exc)
        finally:
            tr.tracker.close()

    # -- status -------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What only the agent knows, for the process server's status: bytes dirty, tracker health and
        cost, points made, resync progress, the last failure."""
        tr, st, prog = self.tracking, self.stats, self.resync_progress
        return {
            "tracker": tr.tracker.name if tr else None,
            "tracking_lost": tr.lost if tr else "not tracking",
            "dirty_bytes": tr.map.dirty_bytes if tr else None,
            "tracker_cpu_seconds": tr.poll_cpu + float(tr.tracker.stats.get("cpu_seconds", 0)) if tr else 0,
            "epochs": st.epochs,
            "points": st.points,
            "inconsistent_epochs": st.inconsistent,
            "last_inconsistent_reason": st.last_inconsistent_reason,
            "bytes_shipped": st.bytes_shipped,
            "app_points": st.app_points,
            "last_app_point": st.last_app_point,
            "resync": prog.report() if prog else None,
            "resync_pending": self.resync_wanted,
            "error": self.error,
        }
