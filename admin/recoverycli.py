"""The recovery commands of the admin CLI: points, failover, commit, test-failover,
test-failover-cleanup, app-point."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from typing import Any

from standby.plumbing.errors import BadInput

from .client import AdminClient
from .display import when
from .pointsview import DEFAULT_LIMIT, format_points, select

_AGO = re.compile(r"^\s*-?(\d+(?:\.\d+)?)\s*([smhd])(?:\s+ago)?\s*$")


def parse_time(text: str, now: dt.datetime | None = None) -> float:
    """--at: '2026-11-23 14:05[:30]', '2026-11-23T14:05:30+01:00', '14:05[:30]' (today, local time),
    '10m' / '-10m' / '10m ago' (that long before now), or seconds since the epoch."""
    now = now or dt.datetime.now().astimezone()
    t = text.strip()
    m = _AGO.match(t)
    if m:
        return now.timestamp() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if re.fullmatch(r"\d{9,}(\.\d+)?", t):
        return float(t)
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?", t):
        t = f"{now.date().isoformat()} {t.zfill(len(t) + (t.index(':') == 1))}"
    try:
        moment = dt.datetime.fromisoformat(t)
    except ValueError:
        raise BadInput(
            f"not a time: {text!r} (examples: '2026-11-23 14:05', '14:05:30', '10m ago', 1795478222)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time
    return moment.timestamp()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    pt = sub.add_parser("points", help="list a machine's recovery points (time, kind, tag, history size)")
    pt.add_argument("machine")
    pt.add_argument("--since", metavar="TIME", help="only points at or after TIME (as --at takes it)")
    pt.add_argument("--limit", type=int, metavar="N", default=None,
                    help=f"list the newest N points of each disk (default {DEFAULT_LIMIT}; 0: all; --json lists "
                    "all unless given); the summary by age always counts them all")
    pt.add_argument("--json", action="store_true", help="machine-readable output")

    def choice(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument(
            "--point",
            metavar="POINT",
            help="latest (first apply what the process server still holds), latest-processed (already applied: "
            "instant), latest-app (newest app-consistent), or a point id from 'standby points' (SEQ, or DISK:SEQ "
            "on a machine with several disks)",
        )
        g.add_argument(
            "--at",
            metavar="TIME",
            help="the newest point at or before TIME ('2026-11-23 14:05', '14:05:30', '10m ago', epoch seconds)",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")

    fo = sub.add_parser(
        "failover",
        help="stop replicating a machine and roll its replicas back in place to a recovery point (may be "
        "repeated with another point until commit)",
    )
    fo.add_argument("machine")
    choice(fo)
    cm = sub.add_parser(
        "commit", help="make a failover final: history newer than its point is discarded",
        description="Make a failover final: history newer than its point is discarded. When the replicas are VMDKs "
        "attached to a master target VM (vCenter), they are then detached from it (files kept) and given to the "
        "machine's VM: a new VM like the original on the master target's host (--vm alternate, the default), in place "
        "of the original VM's disks (--vm original: it must be powered off), to no VM (--vm none), or, after a "
        "failback or a reverse, back to the VM that lent them, in their slots. If that vSphere step fails, the "
        "disks go back to the master target VM and the same command runs it again.",
    )
    cm.add_argument("machine")
    cm.add_argument("--vm", choices=("alternate", "original", "none"), help="vSphere: where the replica disks go "
                    "(default alternate; none: detached from the master target VM and attached to no VM, for a machine "
                    "that was not a VM; after a failback they always go back to the original VM)")
    cm.add_argument("--vm-name", help="vSphere, --vm alternate: the new VM's name (default MACHINE-recovered)")
    cm.add_argument("--power-on", action="store_true", help="vSphere: power the VM on once it has its disks")
    cm.add_argument("--json", action="store_true", help="machine-readable output")
    tf = sub.add_parser(
        "test-failover",
        help="materialise a recovery point into separate replica files while replication continues",
    )
    tf.add_argument("machine")
    choice(tf)
    tf.add_argument("--dir", help="directory on the master target for the copies (default: beside each replica; "
                    "required for device replicas)")
    tc = sub.add_parser("test-failover-cleanup", help="delete a machine's test-failover copies")
    tc.add_argument("machine")
    tc.add_argument("--json", action="store_true", help="machine-readable output")
    ap = sub.add_parser(
        "app-point",
        help="make an app-consistent point now: pre-script, flush and freeze the file systems, cut, thaw, "
        "post-script",
    )
    ap.add_argument("machine")
    ap.add_argument("--tag", default="", help="a label stored with the point (shown by standby points)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")


def _point_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.point is not None and not args.point.strip():
        raise BadInput("--point needs a value")
    return {"point": args.point, "at": parse_time(args.at) if args.at is not None else None}


def dispatch(client: AdminClient, args: argparse.Namespace) -> int | None:
    """Run a recovery command; None if `args.cmd` is not one."""
    if args.cmd == "points":
        if args.limit is not None and args.limit < 0:
            raise BadInput("--limit needs a count of points, 0 for all")
        since = parse_time(args.since) if args.since is not None else None
        res = client.call("points", machine=args.machine)
        if args.json:
            print(json.dumps(select(res, since, args.limit), indent=2))
        else:
            print(format_points(res, since, DEFAULT_LIMIT if args.limit is None else args.limit))
        return 0
    if args.cmd == "failover":
        res = client.call("failover", None, machine=args.machine, **_point_args(args))
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        for d in res["disks"]:
            print(f"{args.machine}/{d['disk']}: rolled back to point {d['sequence']} ({d['consistency']}"
                  f"{', tag ' + d['tag'] if d['tag'] else ''}) of {when(d['time'])} in {d['seconds']:.1f} s; "
                  f"replica {d['replica']} ({d['format']}) is ready to attach and boot")
        print(f"replication of {args.machine} is stopped; change the point with another 'standby failover', "
              f"or make it final with: standby commit {args.machine}")
        return 0
    if args.cmd == "commit":
        res = client.call("commit", None, machine=args.machine, vm=args.vm, vm_name=args.vm_name,
                          power_on=args.power_on)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        for d in res["disks"]:
            print(f"{args.machine}/{d['disk']}: failover to point {d['sequence']} of {when(d['time'])} committed "
                  f"(newer history discarded); replica {d['replica']}")
        if res.get("vm"):
            print(f"vSphere: the replica disks ({', '.join(res['vm']['files'])}) are {res['vm']['what']}")
        return 0
    if args.cmd == "test-failover":
        res = client.call("test_failover", None, machine=args.machine, directory=args.dir, **_point_args(args))
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        for d in res["disks"]:
            print(f"{args.machine}/{d['disk']}: point {d['sequence']} ({d['consistency']}) of {when(d['time'])} "
                  f"materialised in {d['path']} ({d['format']}) in {d['seconds']:.1f} s (copy "
                  f"{d['copy_seconds']:.1f} s, {d['undo_groups']} undo records applied)")
        stopped = sorted({d["replication"] for d in res["disks"] if d["replication"] in ("FailedOver", "Committed")})
        if stopped:  # the copies are of a machine that no longer replicates: say so, not "replication goes on"
            state = "failed over and committed" if stopped == ["Committed"] else "failed over"
            print(f"{args.machine} is {state}: nothing replicates; the copies are separate from its replica")
        else:
            print("replication goes on")
        print(f"remove the copies with: standby test-failover-cleanup {args.machine}")
        return 0
    if args.cmd == "test-failover-cleanup":
        res = client.call("test_failover_cleanup", machine=args.machine)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        removed = [f for d in res["disks"] for f in d["removed"]]
        print("removed: " + ", ".join(removed) if removed else f"{args.machine} has no test-failover copies")
        return 0
    if args.cmd == "app-point":
        res = client.call("app_point", 330.0, machine=args.machine, tag=args.tag)
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            for d in res["disks"]:
                if d.get("sequence"):
                    fz = d.get("freeze_seconds")
                    print(f"{args.machine}/{d['disk']}: {d['consistency']} point {d['sequence']} at {when(d['time'])}"
                          + (f" (file systems frozen {1000 * fz:.0f} ms)" if fz is not None else ""))
                else:
                    print(f"{args.machine}/{d['disk']}: no point: {d.get('reason') or 'unknown reason'}")
            for w in res.get("warnings", []):
                print(f"WARNING: {w}")
        return 0 if all(d.get("sequence") for d in res["disks"]) else 1
    return None
