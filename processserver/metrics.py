"""The process server's Prometheus metrics: the deployment as `standby status` sees it, per disk (labels
`machine`, `disk`) and per process server. Built at scrape time from the same status dictionary the admin's
`status` request returns (status.deployment_status), so a metric and status never disagree.

`families(status, now)` is pure (status in, metric families out); `PSCollector` feeds it the live status.
A value status does not know (no point yet, no fresh agent report, failed over: no RPO) is left out,
never exposed as 0: an alert on `standby_disk_rpo_seconds` must not see a failed-over disk as healthy
or as late.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics_core import Metric

from standby.plumbing.metrics import counter, gauge
from standby.proto.states import DiskState, Phase, Replication

from .hub import Hub
from .status import deployment_status

DISK = ("machine", "disk")
# What applying a disk can be doing (status.applying); "-" (not protected) is exposed as "none".
APPLYING = ("none", "running", "stopped", "stalled", "failed", "paused", "pausing", "quarantined", "failed-over")

# (metric, help, status key): per-disk gauges read straight from a disk's status.
DISK_GAUGES = (
    ("standby_disk_rpo_seconds", "Now minus the time of the newest recovery point the master target holds "
     "(absent without a point, and while failed over)", "rpo_seconds"),
    ("standby_disk_points_per_minute", "Recovery points applied in the last 60 seconds", "points_last_minute"),
    ("standby_disk_recovery_points", "Recovery points in the disk's retention window (the master target's word)",
     "history_points"),
    ("standby_disk_retention_journal_bytes", "Bytes of the disk's retention journal (the master target's word)",
     "journal_bytes"),
    ("standby_disk_dirty_bytes", "Bytes the agent has tracked as written and not yet shipped", "dirty_bytes"),
    ("standby_disk_cache_backlog_bytes", "Bytes cached at the process server, not yet applied", "backlog_bytes"),
    ("standby_disk_cache_backlog_records", "Records received and not yet applied", "backlog_records"),
    ("standby_disk_cache_bytes", "Bytes of the disk's cache files at the process server", "cache_bytes"),
    ("standby_disk_received_sequence", "Newest sequence number received from the agent", "received_seq"),
    ("standby_disk_applied_sequence", "Newest sequence number the master target applied", "applied_seq"),
    ("standby_disk_sync_progress_ratio", "Share of the disk copied by the initial replication (1 once in delta)",
     "progress"),
    ("standby_disk_apply_rate_bytes_per_second", "Bytes applied per second over the last 10 seconds", "rate"),
    ("standby_disk_receive_rate_bytes_per_second", "Bytes received per second over the last 10 seconds",
     "receive_rate"),
    ("standby_disk_size_bytes", "Size of the source disk", "size"),
)
# (metric without _total, help, status key): per-disk counters (kept in the registry: they survive restarts).
DISK_COUNTERS = (
    ("standby_disk_received_bytes", "Bytes of disk data received (logical: zeros counted, never sent)",
     "bytes_received"),
    ("standby_disk_received_wire_bytes", "Bytes of disk data received on the wire (compressed)", "bytes_wire"),
    ("standby_disk_applied_bytes", "Bytes of disk data applied by the master target", "bytes_applied"),
    ("standby_disk_refused_records", "Records refused as busy (back-pressure) since the process server started",
     "refused_records"),
)


def families(status: dict[str, Any], now: float) -> Iterator[Metric]:
    """The metric families of one deployment status (status.deployment_status) at wall time `now`."""
    disks = status["disks"]
    keys = [(d["machine"], d["disk"]) for d in disks]
    for name, doc, key in DISK_GAUGES:
        yield gauge(name, doc, DISK, ((k, d.get(key)) for k, d in zip(keys, disks, strict=True)))
    for name, doc, key in DISK_COUNTERS:
        yield counter(name, doc, DISK, ((k, d.get(key)) for k, d in zip(keys, disks, strict=True)))
    yield gauge("standby_disk_last_point_age_seconds",
                "Now minus the time of the newest recovery point made, also counting points still in the cache "
                "(what a failover to `latest` reaches)",
                DISK, ((k, now - d["latest_point_time"] if d.get("latest_point_time") else None)
                       for k, d in zip(keys, disks, strict=True)))
    yield gauge("standby_disk_resync_progress_ratio", "Share of the running (or last) resync done, as the agent "
                "reports it", DISK, ((k, resync_progress(d)) for k, d in zip(keys, disks, strict=True)))
    yield from states(keys, disks)
    yield gauge("standby_disk_alert", "Problems the disk has now (1 each): RPO over threshold, retention pressure, "
                "a stalled or failed apply…", (*DISK, "problem", "severity"),
                (((*k, p["key"], p["level"]), 1) for k, d in zip(keys, disks, strict=True) for p in d["problems"]))
    yield gauge("standby_disk_info", "The disk's replica and master target (value 1)",
                (*DISK, "mt", "replica", "format"),
                (((*k, d["mt"] or "", d["replica"] or "", d["format"] or ""), 1)
                 for k, d in zip(keys, disks, strict=True)))
    yield gauge("standby_ps_cache_bytes", "Bytes of the process server's cache, all disks", (),
                [((), status["cache_bytes"])])
    yield gauge("standby_ps_cache_quota_bytes", "Cache size above which the process server stops accepting data",
                (), [((), status["cache_quota"])])
    yield gauge("standby_ps_rpo_threshold_seconds", "RPO above which a disk is alerted (the policy)", (),
                [((), status["rpo_threshold"])])
    yield gauge("standby_ps_master_target_connected", "Master targets connected now (value 1)", ("mt",),
                (((mt,), 1) for mt in status["master_targets"]))
    trips = status.get("roundtrips", [])
    yield gauge("standby_roundtrip_phase", "A machine's round trip: its direction and phase (1: current, 0: the "
                "other phases)", ("machine", "direction", "phase"),
                (((t["name"], t["direction"], p.value), 1 if p.value == t["phase"] else 0)
                 for t in trips for p in Phase))


def resync_progress(d: dict[str, Any]) -> float | None:
    rs = d.get("resync")
    return rs.get("progress") if isinstance(rs, dict) else None


def states(keys: list[tuple[str, str]], disks: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each state axis as a labelled gauge: 1 for the disk's state, 0 for the others (so that
    `standby_disk_replication_state{state="Delta"} == 0` finds the disks not in delta replication)."""
    axes = (
        ("standby_disk_replication_state", "The disk's replication state (1: current)", "replication",
         [s.value for s in Replication]),
        ("standby_disk_replica_state", "The replica's state: Inconsistent during copies, UpToDate at a point",
         "disk_state", [s.value for s in DiskState]),
        ("standby_disk_applying_state", "What applying the disk does now (1: current)", "applying", list(APPLYING)),
    )
    for name, doc, key, values in axes:
        yield gauge(name, doc, (*DISK, "state"),
                    (((*k, v), 1 if v == ("none" if d[key] == "-" else d[key]) else 0)
                     for k, d in zip(keys, disks, strict=True) for v in values))


class PSCollector:
    """Reads the process server's status at scrape time (on its event loop: plumbing.metrics)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        return families(deployment_status(self.hub), time.time())
