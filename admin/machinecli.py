"""The admin CLI's commands that end things: `unprotect` (stop replicating a machine's disks; replicas and
their retention journals kept unless --delete-replicas) and `forget` (revoke an enrolled identity)."""

from __future__ import annotations

import argparse
from typing import Any

from .client import AdminClient


def add_parsers(sub: Any) -> None:
    un = sub.add_parser(
        "unprotect",
        help="stop replicating a machine's disks: the agent stops tracking and sending them, the process server "
        "drops their cache, the master target stops applying and KEEPS the replicas and retention journals",
    )
    un.add_argument("machine", help="the protected machine")
    un.add_argument(
        "--delete-replicas",
        action="store_true",
        help="also delete the replicas and their retention journals (all recovery points) on the master target; "
        "a block-device replica is never deleted",
    )
    fg = sub.add_parser(
        "forget",
        help="revoke an enrolled machine or master target: its certificate is refused from now on (enroll it "
        "again to come back); refused while it is protected or holds replicas",
    )
    fg.add_argument("machine", help="the enrolled machine or master target")


def dispatch(client: AdminClient, args: argparse.Namespace) -> int | None:
    """Run `unprotect` or `forget`; None if `args.cmd` is neither."""
    if args.cmd == "unprotect":
        res = client.call("unprotect", None, machine=args.machine, delete_replicas=args.delete_replicas)
        for d in res["disks"]:
            where = f"{d['mt']}:{d['replica'] or '-'}"
            if d["removed"]:
                print(f"{args.machine}/{d['disk']}: no longer protected; deleted on {d['mt']}: "
                      f"{', '.join(d['removed'])}")
            else:
                journal = f" and its retention journal {d['journal']}" if d.get("journal") else ""
                print(f"{args.machine}/{d['disk']}: no longer protected; replica {where}{journal} kept")
            if d.get("vmdk"):
                print(f"    in vSphere: {d['vmdk']}")
        print(f"{args.machine} stays enrolled (standby forget {args.machine} revokes it)")
        return 0
    if args.cmd == "forget":
        client.call("forget", machine=args.machine)
        print(f"{args.machine} forgotten: its certificate is refused from now on; enroll it again to bring it back")
        return 0
    return None
