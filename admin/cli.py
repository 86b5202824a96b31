"""`standby`: the admin CLI. Talks to the configuration service in the process server.

Exit codes: standby.plumbing.errors.EXIT_CODES (README "Exit codes").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from standby.plumbing.errors import BadInput, run_main
from standby.plumbing.version import add_version
from standby.proto.enums import ReplicaFormat

from . import machinecli, recoverycli, tripcli, vcentercli
from .client import DEFAULT_ADMIN_DIR, AdminClient
from .display import human_bytes, when
from .watch import watch_status

FORMATS = tuple(ReplicaFormat)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="standby", description="standby admin CLI: protect machines, watch replication")
    add_version(p)
    p.add_argument(
        "--admin",
        type=Path,
        default=DEFAULT_ADMIN_DIR,
        help=f"admin identity directory (default $STANDBY_ADMIN or {DEFAULT_ADMIN_DIR})",
    )
    p.add_argument(
        "--server",
        help="process server HOST[:PORT] (default $STANDBY_SERVER, else the admin identity's admin.toml: the "
        "advertised name, or on the process server itself its local address when that name does not resolve)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("protect", help="protect a machine's disks into replicas on a master target")
    pr.add_argument("machine", help="the enrolled machine (agent) to protect")
    pr.add_argument("--mt", required=True, help="the master target that writes the replicas")
    pr.add_argument(
        "--format",
        choices=FORMATS,
        default="vmdk",
        help="replica format: vmdk (ESXi vmfs descriptor, thin flat extent; default), vmdk-thick, "
        "vmdk-monolithic-flat, vmdk-sparse (monolithicSparse), raw, device",
    )
    pr.add_argument(
        "--replica-dir", help="directory on the master target; replicas are named MACHINE-DISK.vmdk (.img for raw)"
    )
    pr.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="DISK=PATH",
        help="explicit replica path for one disk (repeatable; required for --format device)",
    )
    pr.add_argument(
        "--existing",
        action="store_true",
        help="offline seeding: the replicas already exist (restored from a backup, an old copy of the disk); "
        "compare checksums and send only differences instead of a full copy",
    )
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.add_argument(
        "--datastore",
        help="when the master target is a VM of an added vCenter and neither --replica nor --replica-dir is given: "
        "the datastore of its host for the replica VMDKs (default: the writable VMFS one with the most free space); "
        "the replicas are created there, attached to the master target VM and written as devices",
    )
    rs = sub.add_parser("resync", help="compare a machine's replicas with its disks and repair differences")
    rs.add_argument("machine", help="the protected machine")
    rs.add_argument("--disk", help="only this disk")
    rs.add_argument("--full", action="store_true", help="send every byte again instead of comparing checksums")
    pa = sub.add_parser("pause", help="stop applying for a machine at each disk's next recovery point")
    pa.add_argument("machine", help="the protected machine")
    pa.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait up to SECONDS until every disk is paused at a point"
    )
    re_ = sub.add_parser("resume", help="apply again what a pause held back")
    re_.add_argument("machine", help="the paused machine")
    recoverycli.add_parsers(sub)
    machinecli.add_parsers(sub)
    tripcli.add_parsers(sub)
    vcentercli.add_parsers(sub)
    add_status_parser(sub)
    ms = sub.add_parser("machines", help="enrolled machines and master targets")
    ms.add_argument("--json", action="store_true", help="machine-readable output")
    add_demo_parser(sub)
    return p


def add_demo_parser(sub: Any) -> None:
    dm = sub.add_parser(
        "demo",
        help="run the whole path on this machine with a 1 GiB test disk: initial copy, then live writes with "
        "the RPO shown, each verified",
    )
    dm.add_argument("--keep", type=Path, metavar="DIR", help="keep deployment and replica in DIR for inspection")
    dm.add_argument("--size", default="1G", help="test disk size (default 1G)")
    dm.add_argument(
        "--format",
        choices=[f for f in FORMATS if f != ReplicaFormat.DEVICE],
        default="vmdk",
        help="replica format (default vmdk: thin vmfs-flat)",
    )
    dm.add_argument(
        "--churn-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="after the initial copy, keep writing to the source for S seconds (continuous replication, RPO "
        "shown live), then verify again (default 10; 0 skips)",
    )


def add_status_parser(sub: Any) -> None:
    st = sub.add_parser("status", help="replication state of every protected disk")
    st.add_argument("machine", nargs="?", help="only this machine")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="repeat every SECONDS until interrupted (Ctrl-C); while the process server is unreachable, say so "
        "once and retry every SECONDS",
    )
    st.add_argument(
        "--for",
        dest="watch_for",
        type=float,
        metavar="SECONDS",
        help="with --watch: stop after SECONDS (exit 0, or 3 when the process server is unreachable then)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: dispatch(args), "standby")


def dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "demo":
        from .demo import run_demo

        return run_demo(args.keep, args.size, args.format, args.churn_seconds)
    client = AdminClient(args.admin, args.server)
    if args.cmd == "protect":
        return cmd_protect(client, args)
    if args.cmd == "resync":
        res = client.call("resync", machine=args.machine, full=args.full, disk=args.disk)
        mode = "full" if args.full else "checksum"
        print(f"{mode} resync requested for {args.machine}: {', '.join(res['disks'])}; watch it with: standby status")
        return 0
    if args.cmd == "pause":
        return cmd_pause(client, args)
    done = recoverycli.dispatch(client, args)
    if done is None:
        done = machinecli.dispatch(client, args)
    if done is None:
        done = tripcli.dispatch(client, args)
    if done is None:
        done = vcentercli.dispatch(client, args)
    if done is not None:
        return done
    if args.cmd == "resume":
        client.call("resume", machine=args.machine)
        print(f"applying for {args.machine} resumed")
        return 0
    if args.cmd == "machines":
        res = client.call("machines")
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            for m in res["machines"]:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["enrolled_at"]))
                # The system UUID matches the machine to its VM in vCenter; "-": not told yet, "unknown":
                # told, but its firmware reports none (set system_uuid in its config).
                said = m.get("system_uuid")
                uid = "-" if said is None else said or "unknown"
                host = f"  host {m['hostname']}" if m.get("hostname") else ""
                print(f"{m['name']:<24} {m['role']:<6} enrolled {when}  system UUID {uid:<36}{host}".rstrip())
        return 0
    if args.cmd == "status":
        if args.watch is not None:
            if args.watch <= 0 or (args.watch_for is not None and args.watch_for <= 0):
                raise BadInput("--watch and --for take a positive number of seconds")
            return watch_status(client, args.machine, args.json, args.watch, args.watch_for, format_status)
        if args.watch_for is not None:
            raise BadInput("--for bounds a --watch: give --watch SECONDS too")
        res = client.call("status", machine=args.machine)
        print(json.dumps(res, indent=2) if args.json else format_status(res))
        return 0
    raise BadInput(f"unknown command {args.cmd}")


def cmd_protect(client: AdminClient, args: argparse.Namespace) -> int:
    replicas: dict[str, str] = {}
    for item in args.replica:
        disk, sep, path = item.partition("=")
        if not sep or not disk or not path:
            raise BadInput(f"--replica takes DISK=PATH, got {item!r}")
        replicas[disk] = path
    res = client.call(
        "protect",
        machine=args.machine,
        mt=args.mt,
        format=args.format,
        replica_dir=args.replica_dir,
        replicas=replicas,
        existing=args.existing,
        datastore=args.datastore,
    )
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for d in res["disks"]:
        where = f"device, VMDK {d['vmdk']} attached to the master target VM" if d.get("vmdk") else args.format
        print(f"protecting {args.machine}/{d['disk']} -> {args.mt}:{d['replica']} ({where})")
    what = "seeding (checksum comparison)" if args.existing else "initial replication"
    print(f"{what} starts now; watch it with: standby status")
    return 0


def cmd_pause(client: AdminClient, args: argparse.Namespace) -> int:
    from standby.plumbing.errors import StandbyError

    client.call("pause", machine=args.machine)
    if not args.wait:
        print(f"applying for {args.machine} pauses at each disk's next point; see: standby status")
        return 0
    deadline = time.monotonic() + args.wait
    while True:
        disks = [d for d in client.call("status", machine=args.machine)["disks"] if d["mt"]]
        if all(d["applying"] == "paused" for d in disks):
            for d in disks:
                when = time.strftime("%H:%M:%S", time.localtime(d["last_point_time"] or 0))
                print(f"{d['machine']}/{d['disk']} paused at point {d['paused_at_seq']} ({when})")
            return 0
        if time.monotonic() > deadline:
            why = ""
            if any(d.get("tracker") == "full-scan" for d in disks):
                why = " (a disk tracked by the full-scan tracker makes no recovery points)"
            raise StandbyError(f"not every disk of {args.machine} reached a point within {args.wait:.0f} s{why}")
        time.sleep(0.1)


def failover_text(fo: dict[str, Any] | None) -> str:
    """The failover part of a disk's status line: a point only when the replica is settled at one (a move
    that broke off leaves it between two states, which is no point at all)."""
    if not fo:
        return ""
    if fo.get("point") is not None:
        return f" FAILED-OVER to point {fo['point']}{' (committed)' if fo.get('committed') else ''}"
    return (f" FAILED-OVER, NOT AT A RECOVERY POINT: the move to point {fo.get('target')} did not finish"
            f"{': ' + fo['problem'] if fo.get('problem') else ''} (run standby failover again)")


def format_status(res: dict[str, Any]) -> str:
    """One block per disk, `key:value` tokens that people and grep both read."""
    lines = []
    if not res["disks"]:
        lines.append("no disks reported yet (is an agent enrolled and running?)")
    for d in res["disks"]:
        eta = d["eta_seconds"]
        eta_s = "-" if eta is None else f"{eta:.0f}s"
        ratio, zeros = d["compression_ratio"], d["bytes_received"] - d["bytes_data"]
        lines.append(
            f"{d['machine']}/{d['disk']} replication:{d['replication']} disk:{d['disk_state']} "
            f"size:{human_bytes(d['size'])} progress:{100 * d['progress']:.1f}% rate:{human_bytes(d['rate'])}/s "
            f"eta:{eta_s}"
        )
        lines.append(
            f"    replica:{d['mt'] or '-'}:{d['replica'] or '-'} format:{d['format'] or '-'} "
            f"received:{human_bytes(d['bytes_received'])} wire:{human_bytes(d['bytes_wire'])} "
            # What made wire smaller than received: zeros are never sent; the data sent is compressed.
            f"(zeros-not-sent:{human_bytes(max(zeros, 0))} data-compressed:{f'{ratio:.2f}x' if ratio else '-'}) "
            f"applied:{human_bytes(d['bytes_applied'])} backlog:{d['backlog_records']}-records"
        )
        if d["mt"] and d["replication"] not in ("Initial", "Off"):
            rpo = d.get("rpo_seconds")
            dirty = d.get("dirty_bytes")
            tcpu = "-" if d.get("tracker_cpu_seconds") is None else f"{d['tracker_cpu_seconds']:.1f}s"
            rpo_s = "-" if rpo is None else f"{rpo:.1f}s"
            if d["replication"] in ("FailedOver", "Committed"):
                rpo_s = "-(failed-over:nothing-replicates)"
            lines.append(
                f"    rpo:{rpo_s} points/min:{d.get('points_last_minute', 0)} "
                f"dirty:{'-' if dirty is None else human_bytes(dirty)} cache-backlog:{human_bytes(d['backlog_bytes'])} "
                f"tracker:{d.get('tracker') or '-'} tracker-cpu:{tcpu} applying:{d.get('applying')}"
            )
        if d.get("history_points") is not None:
            lines.append(
                f"    history:{d['history_points']} points since {when(d.get('history_oldest'))} "
                f"journal:{human_bytes(d.get('journal_bytes') or 0)}" + failover_text(d.get("failover"))
            )
        rs = d.get("resync")
        if rs and rs.get("phase") != "complete":
            eta = rs.get("eta_seconds")
            lines.append(
                f"    resync:{rs['mode']} {rs['phase']} {100 * rs['progress']:.1f}% "
                f"eta:{'-' if eta is None else f'{eta:.0f}s'} reason: {rs['reason']}"
            )
        elif d.get("last_resync"):
            lr = d["last_resync"]
            lines.append(f"    last-resync:{lr['mode']} reason: {lr['reason']}")
        for a in d.get("alerts", []):
            lines.append(f"    ALERT: {a}")
        if d["error"]:
            lines.append(f"    error: {d['error']}")
        for c in d.get("cleared", []):
            lines.append(f"    cleared {time.strftime('%H:%M:%S', time.localtime(c['cleared_at']))} "
                         f"(since {time.strftime('%H:%M:%S', time.localtime(c['since']))}): {c['text']}")
    lines.extend(tripcli.format_trips(res.get("roundtrips", [])))
    mts = ", ".join(res.get("master_targets", [])) or "none"
    lines.append(
        f"cache:{human_bytes(res['cache_bytes'])} of {human_bytes(res['cache_quota'])} master-targets-connected:{mts}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
