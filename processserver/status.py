"""The deployment's status (the admin's `status` request, and the metrics endpoint's source): per disk
its replication state, progress, positions, rates, RPO and points, the agent's and the master target's
word on it, and its problems; per process server its cache and master targets."""

from __future__ import annotations

import json
import time
from typing import Any

from standby.proto.enums import MarkerKind
from standby.proto.states import FAILED_OVER, Replication, disk_state

from .health import ALERT, ERROR
from .hub import Hub
from .registry import DiskRow
from .streams import DiskStream
from .tripstatus import trips_status


def deployment_status(ps: Hub, machine: str | None = None) -> dict[str, Any]:
    """What `standby status` shows (the admin's `status` request) — and what the metrics endpoint
    exposes (processserver.metrics): one path, so the two never disagree."""
    now = time.monotonic()
    wall = time.time()
    out = []
    names = {machine, ps.active_identity(machine)} if machine is not None else None
    for d in ps.registry.disks():
        if names is not None and d.machine not in names:
            continue
        st = ps.streams.get(d.id)
        rate = st.apply_rate.value(now) if st else 0.0
        done = d.size if d.replication is Replication.DELTA else d.applied_cursor
        remaining = max(d.size - done, 0)
        out.append(
            {
                "machine": d.machine,
                "disk": d.name,
                "path": d.path,
                "size": d.size,
                "replication": d.replication.value,
                "disk_state": disk_state(d.replication).value,
                "mt": d.mt,
                "replica": d.replica_path,
                "format": d.replica_format,
                "progress": (done / d.size) if d.size else 1.0,
                "bytes_done": done,
                "received_cursor": d.cursor,
                "rate": rate,
                "receive_rate": st.receive_rate.value(now) if st else 0.0,
                "eta_seconds": (remaining / rate) if rate > 0 and remaining else (0.0 if not remaining else None),
                "bytes_received": d.bytes_logical,
                "bytes_data": d.bytes_data,
                "bytes_wire": d.bytes_wire,
                "bytes_applied": d.bytes_applied,
                "compression_ratio": (d.bytes_data / d.bytes_wire) if d.bytes_wire else None,
                "received_seq": d.received_seq,
                "applied_seq": d.applied_seq,
                "backlog_records": st.backlog_records if st else 0,
                "cache_bytes": st.cache.bytes if st else 0,
                "refused_records": st.refused_records if st else 0,  # BUSY answers (back-pressure)
                "error": "; ".join(st.health.texts(ERROR)) or None if st else None,
                "problems": [p.as_dict() for p in st.health.active.values()] if st else [],
                "cleared": st.health.recent(wall) if st else [],
                "synced_at": d.synced_at,
                **continuous(ps, d, st, wall),
            }
        )
    return {
        "disks": out,
        "cache_bytes": ps.cache_bytes,
        "cache_quota": ps.cfg.cache_quota,
        "master_targets": sorted(ps.mt_sessions),
        "rpo_threshold": ps.cfg.rpo_threshold,
        "roundtrips": trips_status(ps, out, machine),
    }


def applying(ps: Hub, d: DiskRow, st: DiskStream | None) -> str:
    """What applying this disk is doing now — never `running` unless a master target is connected and
    pulling this disk with nothing wrong known (promise 9)."""
    if d.mt is None or st is None:
        return "-"
    if d.replication in FAILED_OVER:
        return "failed-over"
    if st.quarantined_from is not None:
        return "quarantined"
    if st.pause:
        return "paused" if st.paused_at and st.applied_seq >= st.paused_at else "pausing"
    mt = ps.mt_sessions.get(d.mt)
    if mt is None:
        return "stopped"
    if st.health.has("stalled"):
        return "stalled"
    if st.health.has("mt-replica") or st.health.has("mt-reject"):
        return "failed"
    if not mt.sending(d.id):
        return "stopped"
    return "running"


def continuous(ps: Hub, d: DiskRow, st: DiskStream | None, wall: float) -> dict[str, Any]:
    """Delta replication health of one disk: RPO, points, the agent's dirty bytes, cache backlog,
    resync progress and reason, alerts."""
    # Failed over, nothing replicates: no RPO (it would only rise while the replica is the machine).
    rpo = wall - d.last_point_at if d.last_point_at and d.replication not in FAILED_OVER else None
    rep = dict(st.agent_report) if st else {}
    fresh = st is not None and wall - st.agent_report_at < 30
    backlog = sum(v.nbytes for v in st.records.values()) if st else 0
    alerts = st.health.texts(ALERT) if st else []
    hist = st.mt_report if st else {}
    return {
        "history_points": hist.get("points"),
        "history_oldest": hist.get("oldest_point"),
        "journal_bytes": hist.get("journal_bytes"),
        "failover": hist.get("failed_over"),
        "rpo_seconds": rpo,
        "last_point_time": d.last_point_at,
        # `latest` also counts points still in the cache (DESIGN §6): what a failover to latest reaches.
        "latest_point_time": max([v.time for v in st.records.values() if v.marker == MarkerKind.POINT]
                                 + [d.last_point_at or 0.0]) or None if st else d.last_point_at,
        "last_point_seq": d.last_point_seq,
        "points_last_minute": st.points_since(wall - 60) if st else 0,
        "dirty_bytes": rep.get("dirty_bytes") if fresh else None,
        "tracker": rep.get("tracker") if fresh else None,
        "tracker_cpu_seconds": rep.get("tracker_cpu_seconds") if fresh else None,
        "epochs": rep.get("epochs") if fresh else None,
        "inconsistent_epochs": rep.get("inconsistent_epochs") if fresh else None,
        "agent_points": rep.get("points") if fresh else None,  # made by this agent run (restarts reset it)
        "backlog_bytes": backlog,
        "resync": rep.get("resync") if fresh else None,
        "resync_requested": json.loads(d.resync_request) if d.resync_request else None,
        "last_resync": {
            "mode": d.resync_mode,
            "reason": d.resync_reason,
            "started_at": d.resync_started_at,
            "done_at": d.resync_done_at,
        }
        if d.resync_reason
        else None,
        "applying": applying(ps, d, st),
        "paused_at_seq": st.paused_at if st and st.pause else None,
        "alerts": alerts,
    }
