"""The campaign's figures (issue 9's notes: trials, faults by kind, points judged, inconsistent, lost,
source/replica differences after catch-up, resyncs with their reasons, longest RPO after a fault), the
JSON written to STANDBY_FAULTS_REPORT and the summary printed at the end; and the wording of failures."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import standby.agent

if TYPE_CHECKING:
    from .campaign import Campaign


@dataclass
class Failure:
    trial: int  # 0: set-up, -1: the final checks
    fault: str
    check: str
    message: str

    def line(self) -> str:
        where = {0: "set-up", -1: "final"}.get(self.trial, f"trial {self.trial}")
        return f"{where} ({self.fault}) {self.check}: {self.message}"


def summarize(d: dict[str, Any] | None) -> str:
    if d is None:
        return "not in status"
    error = d.get("error")
    if isinstance(error, str) and len(error) > 400:
        error = error[:400] + "..."
    return (f"replication {d.get('replication')}, applying {d.get('applying')}, error {error!r}, alerts "
            f"{d.get('alerts')}, applied_seq {d.get('applied_seq')}, received_seq {d.get('received_seq')}, "
            f"backlog {d.get('backlog_records')} records, rpo {num(d.get('rpo_seconds'))} s, last point "
            f"{d.get('last_point_seq')}")


def num(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, int | float) else str(x)


def log_excerpt(text: str, n: int = 4) -> str:
    """The last few distinct warning/error lines of a log piece (what the daemon said about it), each with
    how often it was logged."""
    seen: dict[str, int] = {}
    for ln in text.splitlines():
        if not any(w in ln for w in ("WARNING", "ERROR", "CRITICAL", "Traceback")):
            continue
        msg = ln.split(" ", 2)[-1].strip()[:240]  # without the timestamp, so repeats collapse
        seen[msg] = seen.get(msg, 0) + 1
        seen[msg] = seen.pop(msg)  # keep the order of the last occurrence
    picked = list(seen.items())[-n:]
    return " | ".join(f"{m}{f' (x{k})' if k > 1 else ''}" for m, k in picked) or "(nothing logged at warning level)"


def build_report(c: Campaign) -> dict[str, Any]:
    """The figures of a run, JSON-ready (the trial log included)."""
    by_kind: dict[str, int] = {}
    effective: dict[str, int] = {}
    rpo_by_kind: dict[str, float] = {}
    longest: dict[str, Any] = {"seconds": None}
    for t in c.trials:
        k = t["fault"]
        by_kind[k] = by_kind.get(k, 0) + 1
        effective[k] = effective.get(k, 0) + (1 if t["effective"] else 0)
        r = t["rpo_after_fault"]
        if r is not None:
            rpo_by_kind[k] = max(rpo_by_kind.get(k, 0.0), r)
            if longest["seconds"] is None or r > longest["seconds"]:
                longest = {"seconds": r, "trial": t["trial"], "fault": k}
    failures_by_check: dict[str, int] = {}
    for f in c.failures:
        failures_by_check[f.check] = failures_by_check.get(f.check, 0) + 1
    return {
        "standby": os.path.dirname(os.path.dirname(standby.agent.__file__)),  # the source tree
        "seed": c.s.seed,
        "kinds": c.s.kinds,
        "trials": len(c.trials),
        "trials_planned": c.s.trials,
        "faults_by_kind": by_kind,
        "effective_by_kind": effective,
        "points_judged": c.points_judged,
        "fs_points_checked": c.fs_points_checked,
        "points_pruned_by_space": {m: b.pruned for m, b in c.books.items()},
        "inconsistent": c.inconsistent,
        "lost": c.lost,
        "differences_after_catch_up": c.differences,
        "resyncs": c.resyncs,
        "longest_rpo_after_fault": longest,
        "rpo_after_fault_by_kind": rpo_by_kind,
        "heals": c.heals,
        "wedged": c.wedged,
        "aborted": c.aborted,
        "tracebacks_logged": c.tracebacks,
        "failures": [f.__dict__ for f in c.failures],
        "failures_by_check": failures_by_check,
        "setup_seconds": round(c.setup_seconds, 1),
        "seconds_per_trial": round(sum(t["seconds"] for t in c.trials) / len(c.trials), 1)
        if c.trials else None,
        "seconds": round(time.time() - c.started, 1),
        "burst_writes": c.rig.model.writes if hasattr(c.rig, "model") else 0,
        "trial_log": c.trials,
    }


def summary(rep: dict[str, Any]) -> str:
    """The figures for people, then every failure on one line each."""
    lines = [
        f"fault campaign: seed {rep['seed']}, {rep['trials']} trials in {rep['seconds']:.0f} s "
        f"(set-up {rep['setup_seconds']} s, {rep['seconds_per_trial']} s per trial); standby from {rep['standby']}",
        "faults by kind (effective): " + ", ".join(
            f"{k} {n} ({rep['effective_by_kind'].get(k, 0)})" for k, n in sorted(rep["faults_by_kind"].items())),
        f"points judged: {rep['points_judged']} by write order + {rep['fs_points_checked']} by e2fsck; "
        f"pruned by space before judging or later: {rep['points_pruned_by_space']}",
        f"inconsistent: {rep['inconsistent']}; lost: {rep['lost']}; source/replica differences after "
        f"catch-up: {rep['differences_after_catch_up']} blocks",
        f"resyncs: {len(rep['resyncs'])}" + "".join(
            f"\n    trial {r['trial']} ({r['fault']}): {r['machine']}/{r['disk']} {r['mode']}: {r['reason']}"
            for r in rep["resyncs"]),
        f"longest RPO after a fault: {rep['longest_rpo_after_fault']}; by kind: "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(rep["rpo_after_fault_by_kind"].items())),
    ]
    if rep["heals"]:
        lines.append(f"heals: {rep['heals']}")
    if rep["wedged"] or rep["aborted"]:
        lines.append(f"set aside: {rep['wedged']}; ended early: {rep['aborted'] or 'no'}")
    if rep["tracebacks_logged"]:
        lines.append(f"tracebacks in daemon logs: {rep['tracebacks_logged']}")
    lines.append(f"failures: {len(rep['failures'])} {rep['failures_by_check']}")
    lines += ["  " + Failure(**f).line() for f in rep["failures"]]
    return "\n".join(lines)
