"""The master target's Prometheus metrics: what only it knows — its retention journals and the volume
they live on, how fast and how long applying takes, the recovery points each disk holds. Per disk the
labels are `machine` and `disk`, as on the process server's metrics.

`snapshot(mt)` reads the daemon's current state (its open disks, their apply counters, the last
retention upkeep's report — what it tells the process server — and the retention volume's free space);
`families(snap)` is pure: snapshot in, metric families out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.metrics_core import Metric, SummaryMetricFamily

from standby.plumbing.metrics import counter, gauge

from .volume import free_bytes
from .worker import DiskWorker

DISK = ("machine", "disk")


class Watched(Protocol):
    """The master target as its metrics see it (daemon.MasterTarget)."""

    workers: dict[int, DiskWorker]
    failed: dict[int, str]
    history: dict[str, dict[str, Any]]

    @property
    def retention_dir(self) -> Path: ...


def snapshot(mt: Watched) -> dict[str, Any]:
    disks = []
    for disk, w in sorted(mt.workers.items()):
        st, stats = w.state, w.stats
        disks.append({
            "machine": st.machine, "disk": st.name, "journal_bytes": w.journal.bytes,
            "points": mt.history.get(str(disk), {}).get("points"), "applied_seq": st.applied_seq,
            "records": stats.records, "bytes": stats.bytes, "groups": stats.groups, "seconds": stats.seconds,
            "failed": bool(w.error), "halted": w.halted,
        })
    try:
        free, size = free_bytes(mt.retention_dir)
    except OSError:
        free = size = None
    return {"disks": disks, "volume_free": free, "volume_size": size, "unopened": len(mt.failed)}


def families(snap: dict[str, Any]) -> Iterator[Metric]:
    disks = snap["disks"]
    keys = [(d["machine"], d["disk"]) for d in disks]
    for name, doc, key in (
        ("standby_mt_retention_journal_bytes", "Bytes of the disk's retention journal", "journal_bytes"),
        ("standby_mt_recovery_points", "Recovery points the disk's retention keeps (at the last upkeep)", "points"),
        ("standby_mt_applied_sequence", "Newest sequence number applied to the replica", "applied_seq"),
        ("standby_mt_apply_failed", "1 while applying the disk fails (status says why)", "failed"),
        ("standby_mt_failed_over", "1 while the disk is failed over (nothing is applied)", "halted"),
    ):
        yield gauge(name, doc, DISK, ((k, d[key]) for k, d in zip(keys, disks, strict=True)))
    for name, doc, key in (
        ("standby_mt_applied_records", "Records applied since the master target started", "records"),
        ("standby_mt_applied_bytes", "Bytes applied since the master target started (logical: zeros counted)",
         "bytes"),
    ):
        yield counter(name, doc, DISK, ((k, d[key]) for k, d in zip(keys, disks, strict=True)))
    apply = SummaryMetricFamily("standby_mt_apply_duration_seconds", "Time to apply a group of records: verify, "
                                "journal the old contents, write, sync, acknowledge", labels=list(DISK))
    for k, d in zip(keys, disks, strict=True):
        apply.add_metric(list(k), d["groups"], d["seconds"])
    yield apply
    yield gauge("standby_mt_retention_volume_free_bytes", "Free bytes of the retention volume", (),
                [((), snap["volume_free"])])
    yield gauge("standby_mt_retention_volume_size_bytes", "Size of the retention volume", (),
                [((), snap["volume_size"])])
    yield gauge("standby_mt_disks_unopened", "Disks assigned here that could not be opened (status says why)", (),
                [((), snap["unopened"])])


class MTCollector:
    """Reads the master target's state at scrape time (on its event loop: plumbing.metrics)."""

    def __init__(self, mt: Watched) -> None:
        self.mt = mt

    def collect(self) -> Iterator[Metric]:
        return families(snapshot(self.mt))
