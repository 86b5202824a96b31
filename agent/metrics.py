"""The agent's Prometheus metrics: what only the agent knows of each disk — change tracking (events the
kernel lost, times tracking was lost, bytes dirty now), the epochs and points it made, what it shipped, a
resync's progress. Labels `machine` (the agent's enrolled name) and `disk`, as on the process server.

`snapshot(agent)` reads each disk's report — the one the agent sends the process server for status
(replicated.ReplicatedDisk.report) — and its tracking's counters; `families(snap)` is pure: snapshot in,
metric families out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.metrics_core import Metric

from standby.plumbing.metrics import counter, gauge
from standby.proto.enums import Consistency

from .config import AgentConfig
from .replicated import ReplicatedDisk

DISK = ("machine", "disk")


class Watched(Protocol):
    """The agent as its metrics see it (daemon.Agent)."""

    cfg: AgentConfig
    disks: list[ReplicatedDisk]


def snapshot(agent: Watched) -> list[dict[str, Any]]:
    out = []
    for rd in agent.disks:
        tr = rd.tracking
        out.append({
            **rd.report(),
            "machine": agent.cfg.name,
            "disk": rd.name,
            "losses": tr.losses if tr else None,
            "events_lost": getattr(tr.tracker, "events_lost", None) if tr else None,
        })
    return out


def families(disks: list[dict[str, Any]]) -> Iterator[Metric]:
    keys = [(d["machine"], d["disk"]) for d in disks]
    pairs = list(zip(keys, disks, strict=True))
    yield gauge("standby_agent_dirty_bytes", "Bytes tracked as written and not yet shipped", DISK,
                ((k, d["dirty_bytes"]) for k, d in pairs))
    yield gauge("standby_agent_tracking_lost", "1 while change tracking cannot be trusted (a resync is needed)",
                DISK, ((k, 1 if d["tracking_lost"] else 0) for k, d in pairs))
    yield counter("standby_agent_tracker_events_lost", "Write events the kernel reported lost (tracefs tracker)",
                  DISK, ((k, d["events_lost"]) for k, d in pairs))
    yield counter("standby_agent_tracking_losses", "Times change tracking was lost, each one a resync", DISK,
                  ((k, d["losses"]) for k, d in pairs))
    yield counter("standby_agent_points", "Recovery points made by this agent run", (*DISK, "consistency"), [
        *(((*k, Consistency.CRASH.value), d["points"] - d["app_points"]) for k, d in pairs),
        *(((*k, Consistency.APP.value), d["app_points"]) for k, d in pairs),
    ])
    yield counter("standby_agent_epochs", "Epochs shipped by this agent run", DISK,
                  ((k, d["epochs"]) for k, d in pairs))
    yield counter("standby_agent_inconsistent_epochs", "Epochs applied but not a point (a write during the read)",
                  DISK, ((k, d["inconsistent_epochs"]) for k, d in pairs))
    yield counter("standby_agent_shipped_bytes", "Bytes shipped by delta replication in this agent run", DISK,
                  ((k, d["bytes_shipped"]) for k, d in pairs))
    yield counter("standby_agent_tracker_cpu_seconds", "CPU time spent tracking changes", DISK,
                  ((k, d["tracker_cpu_seconds"]) for k, d in pairs))
    yield gauge("standby_agent_resync_progress_ratio", "Share of the running (or last) resync done", DISK,
                ((k, d["resync"]["progress"] if d["resync"] else None) for k, d in pairs))
    yield gauge("standby_agent_replication_failed", "1 while the disk's replication fails (retrying)", DISK,
                ((k, 1 if d["error"] else 0) for k, d in pairs))


class AgentCollector:
    """Reads the agent's state at scrape time (on its event loop: plumbing.metrics)."""

    def __init__(self, agent: Watched) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        return families(snapshot(self.agent))
