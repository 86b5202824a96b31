"""The round-trip commands of the admin CLI: reprotect, failback, reverse (processserver.roundtrip), and
how `standby status` shows a machine's round trip."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from standby.plumbing.errors import BadInput
from standby.proto.enums import ReplicaFormat

from .client import AdminClient
from .display import human_bytes, when


def add_parsers(sub: Any) -> None:
    rp = sub.add_parser(
        "reprotect",
        help="after a committed failover, replicate the recovered machine back to the original site (only "
        "differences travel when the original disks are still there)",
        description="Replicate the recovered machine back to the original site. Its agent (an identity of its own, "
        "enrolled as usual) protects its disks into the original disks (--location original: a checksum "
        "comparison ships only what differs) or into new disks (--location alternate: a full copy, or seeded with "
        "--existing). The original machine's identity is set aside until standby reverse. Refused, before any "
        "change, when an original disk is missing, of another size or in use, or the original agent runs.",
    )
    rp.add_argument("machine", help="the machine, by its original name")
    rp.add_argument("--agent", required=True, help="the recovered machine's agent (enrolled, running, with the "
                    "recovered disks under the original disk names)")
    rp.add_argument("--mt", required=True, help="the master target at the original site")
    rp.add_argument("--location", choices=("original", "alternate"), default="original",
                    help="original: into the machine's original disks (default; the paths its agent reported, "
                    "or --replica); alternate: into new disks or replica files")
    rp.add_argument("--format", choices=tuple(ReplicaFormat), default=None,
                    help="replica format at the original site (default: device for original, vmdk for alternate)")
    rp.add_argument("--replica", action="append", default=[], metavar="DISK=PATH",
                    help="where one disk goes at the original site (repeatable)")
    rp.add_argument("--replica-dir", help="alternate location: directory for new replicas (MACHINE-DISK.vmdk)")
    rp.add_argument("--existing", action="store_true",
                    help="alternate location: the replicas exist (a copy of the disks): compare, send differences")
    rp.add_argument("--full", action="store_true", help="copy every block instead of comparing checksums")
    rp.add_argument("--rpo-threshold", type=float, metavar="SECONDS",
                    help="the reverse direction's RPO alert threshold (default 900: the failback policy's 15 min)")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    fb = sub.add_parser(
        "failback",
        help="planned failover back to the original site, with no data loss: start (sync), --complete "
        "(shut down, final point, fail over), --cancel",
        description="A planned failover towards the original site, in two steps. 'standby failback M' starts it: "
        "with --sync before-shutdown (default) replication catches up while the recovered machine runs; with "
        "--sync full the recovered machine is stopped first and every block is copied. 'standby failback M "
        "--complete' runs the shutdown step on the recovered machine (its shutdown_script stops the workload; the "
        "file systems are flushed and frozen; a final point is cut), ships it and fails the original site over to "
        "exactly that point, checking that nothing was written after it; it prints the downtime and the bytes "
        "shipped after the shutdown, and exits 1 if data arrived after the final point (do not commit then). Then "
        "'standby commit M'. '--cancel' before --complete stops the failback (after "
        "a full-download shutdown it starts the workload again with start_script).",
    )
    fb.add_argument("machine", help="the machine, by its original name")
    g = fb.add_mutually_exclusive_group()
    g.add_argument("--complete", action="store_true", help="shut the recovered machine down and fail over to its "
                   "final point")
    g.add_argument("--cancel", action="store_true", help="stop the failback that was started")
    fb.add_argument("--sync", choices=("before-shutdown", "full"), default="before-shutdown",
                    help="before-shutdown: catch up while it runs, downtime only for the last changes (default); "
                    "full: stop first, then copy every block")
    fb.add_argument("--json", action="store_true", help="machine-readable output")
    rv = sub.add_parser(
        "reverse",
        help="after a committed failback, protect the machine again in its first direction (only what changed "
        "since the recovered machine stopped travels)",
        description="Protect the original machine again into the recovery site's replicas, which still hold the "
        "recovered machine's disks: a checksum comparison ships only what changed since it stopped. The recovered "
        "machine must be shut down (its agent is set aside from now on); the original machine's agent must run. "
        "The recovery site's retention starts again (the old journal is kept aside).",
    )
    rv.add_argument("machine", help="the machine, by its original name")
    rv.add_argument("--json", action="store_true", help="machine-readable output")


def _replicas(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        disk, sep, path = item.partition("=")
        if not sep or not disk or not path:
            raise BadInput(f"--replica takes DISK=PATH, got {item!r}")
        out[disk] = path
    return out


def dispatch(client: AdminClient, args: argparse.Namespace) -> int | None:
    """Run a round-trip command; None if `args.cmd` is not one."""
    if args.cmd == "reprotect":
        if args.rpo_threshold is not None and args.rpo_threshold <= 0:
            raise BadInput("--rpo-threshold takes a positive number of seconds")
        res = client.call("reprotect", 300.0, machine=args.machine, agent=args.agent, mt=args.mt,
                          location=args.location, format=args.format, replica_dir=args.replica_dir,
                          replicas=_replicas(args.replica), full=args.full, existing=args.existing,
                          rpo_threshold=args.rpo_threshold)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        for d in res["disks"]:
            print(f"{args.machine}/{d['disk']}: {args.agent} -> {args.mt}:{d['replica']}")
        what = "checksum comparison: only differences travel" if res["mode"] == "checksum" else "full copy"
        print(f"reprotecting {args.machine} ({what}); {args.machine}'s own agent is set aside until standby reverse; "
              "watch it with: standby status")
        return 0
    if args.cmd == "failback":
        action = "complete" if args.complete else "cancel" if args.cancel else "start"
        # No time limit: the shutdown step, the final sync and the failover are bounded at the process server,
        # and a client that gave up halfway would not learn how the failback ended.
        res = client.call("failback", None, machine=args.machine, action=action, sync=args.sync)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        r = res.get("result") or {}
        for f in r.get("final", []):
            print(f"{args.machine}/{f['disk']}: final point {f['sequence']} ({f['consistency']}) of {when(f['time'])}")
        print(res["message"])
        return 0 if r.get("no_data_loss", True) else 1
    if args.cmd == "reverse":
        res = client.call("reverse", 300.0, machine=args.machine)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        for d in res["disks"]:
            print(f"{args.machine}/{d['disk']} -> {res['mt']}:{d['replica']}")
        print(f"reverse replication of {args.machine} started (checksum comparison: only what changed travels); "
              "watch it with: standby status")
        return 0
    return None


def format_trips(trips: list[dict[str, Any]]) -> list[str]:
    """The round-trip lines of `standby status`: direction and phase, then the history, a line a phase."""
    lines = []
    for t in trips:
        where = f" ({t['active']} -> {t['home_mt']})" if t["direction"] == "reverse" else f" ({t['active']})"
        lines.append(f"{t['name']} round-trip direction:{t['direction']}{where} phase:{t['phase']} "
                     f"state:{t['state'].replace(' ', '-')} round-trips-done:{t['round_trips']}")
        if t.get("policy"):
            p = t["policy"]
            lines.append(f"    policy: rpo-threshold {p['rpo_threshold']:.0f} s, retention {p['retention_hours']} h, "
                         f"app-consistent every {p['app_consistent_minutes']} min")
        final = t.get("final")
        if final:
            verdict = "no data loss (checked)" if final["no_data_loss"] else "DATA AFTER THE FINAL POINT"
            lines.append(f"    failback: downtime {final['downtime_seconds']:.1f} s, "
                         f"{human_bytes(final['bytes_after_shutdown'])} after the shutdown, {verdict}")
        for h in t["history"]:
            took = f"{h['ended'] - h['started']:.1f} s" if h["ended"] else "running"
            shipped = human_bytes(h["bytes"]) if h["bytes"] is not None else "-"
            lines.append(f"    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['started']))} {h['phase']:<14} "
                         f"{took:>10} {shipped:>10}  {h['detail']}")
    return lines
