"""`standby-agent`: enroll this machine (`enroll`), choose its disks (`add-disk`), run the agent (`run`) and
remove what a stopped agent left behind (`cleanup`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from pathlib import Path

from standby.plumbing.config import load_toml, parse_address, save_toml
from standby.plumbing.durable import load_json
from standby.plumbing.enrollment import add_enroll_parser, enroll, read_passphrase
from standby.plumbing.errors import BadInput, StandbyError, run_main
from standby.plumbing.logs import add_log_options, setup_logging
from standby.plumbing.notify import Notifier
from standby.plumbing.service import run_daemon
from standby.plumbing.version import add_version

from .config import DEFAULT_DIR, DISK_NAME, AgentConfig

TRACEFS = Path("/sys/kernel/tracing")  # where the agent's tracker makes its instances


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="standby-agent", description="standby mobility agent: replicates this machine's disks"
    )
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_enroll_parser(sub, "machine", DEFAULT_DIR)
    a = sub.add_parser("add-disk", help="add a block device or image file to the disks this agent protects")
    a.add_argument("name", help="disk name, e.g. sda")
    a.add_argument("path", type=Path, help="block device or image file, e.g. /dev/sda")
    a.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})")
    r = sub.add_parser("run", help="run the agent")
    r.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})")
    add_log_options(r)
    c = sub.add_parser(
        "cleanup",
        help="remove what a stopped agent left behind: the kernel trace instances of its disks",
        description="Remove what an agent that is not running any more left behind: the private tracefs "
        "instance of each of its disks (/sys/kernel/tracing/instances/standby-*), whose ring buffers an agent "
        "killed with SIGKILL leaves recording. An instance a running agent still reads is left alone. Needs "
        "root. Nothing else is touched: the state directory, identity and disk keys stay.",
        epilog="exit codes: 0 nothing is left behind (any leftover removed), 1 something could not be removed "
        "(an instance in use: is the agent still running?), 2 DIR is not an agent's state directory",
    )
    c.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "enroll":
        return run_main(lambda: cmd_enroll(args), "standby-agent")
    if args.cmd == "add-disk":
        return run_main(lambda: cmd_add_disk(args), "standby-agent")
    if args.cmd == "cleanup":
        return run_main(lambda: cmd_cleanup(args), "standby-agent")
    return run_main(lambda: cmd_run(args), "standby-agent")


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging("standby.agent", args.log_level, args.log_file)

    async def serve(stop: asyncio.Event, notifier: Notifier) -> None:
        from .daemon import Agent

        agent = Agent(AgentConfig.load(args.dir))
        await agent.run(stop, notifier)  # READY=1 once connected to the process server, or retrying with why

    return run_daemon("standby-agent", serve)


def cmd_enroll(args: argparse.Namespace) -> int:
    host, port = parse_address(args.server)
    passphrase = read_passphrase(args.passphrase_file)
    ident = enroll(host, port, args.fingerprint, args.name, "agent", passphrase, args.dir / "identity", args.replace)
    conf = args.dir / "agent.toml"
    disks = load_toml(conf).get("disks", []) if conf.exists() else []
    save_toml(conf, {"name": ident.name, "server": f"{host}:{port}", "disks": disks})
    print(f"enrolled machine {ident.name!r} with {host}:{port}; state in {args.dir}")
    print(f"add disks with: standby-agent add-disk NAME /dev/DEVICE --dir {args.dir}")
    return 0


def cmd_add_disk(args: argparse.Namespace) -> int:
    conf = args.dir / "agent.toml"
    if not conf.exists():
        raise BadInput(f"{conf} does not exist: enroll first (standby-agent enroll …)")
    if not DISK_NAME.match(args.name):
        raise BadInput(f"invalid disk name {args.name!r}: letters, digits, '.', '_' and '-' only")
    path = args.path.resolve()
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    raw = load_toml(conf)
    disks = raw.setdefault("disks", [])
    if any(d["name"] == args.name for d in disks):
        raise BadInput(f"disk {args.name!r} is already configured")
    disks.append({"name": args.name, "path": str(path)})
    save_toml(conf, raw)
    print(f"disk {args.name} ({path}) added; restart the agent to pick it up")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from .disk import trace_instance
    from .tracker.tracefs import remove_stale

    if not (args.dir / "agent.toml").exists():
        raise BadInput(f"{args.dir} is not an agent's state directory (no agent.toml)")
    if os.geteuid() != 0:
        raise StandbyError("only root can see and remove kernel trace instances (an agent not run as root made none)")
    left: list[str] = []
    removed = 0
    for f in sorted((args.dir / "disks").glob("*.json")):  # every disk the agent ever knew, configured or not
        try:
            doc = load_json(f)
            if not isinstance(doc, dict) or "uid" not in doc:
                continue  # another record kept beside the disks' (a clean-stop record), no disk's identity
            instance = trace_instance(uuid.UUID(doc["uid"]))
        except (TypeError, ValueError, OSError) as exc:
            left.append(f"disk {f.stem}: unreadable {f} ({exc})")
            continue
        if remove_stale(instance, str(TRACEFS)):
            removed += 1
            print(f"removed trace instance {instance} of disk {f.stem}")
        elif (TRACEFS / "instances" / instance).exists():
            left.append(f"disk {f.stem}: trace instance {instance} is in use (is the agent still running?)")
    if left:
        raise StandbyError("could not clean up: " + "; ".join(left))
    if not removed:
        print(f"nothing left behind by the agent in {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
