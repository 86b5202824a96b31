"""`standby-mt`: enroll this master target with a deployment (`enroll`) and run it (`run`)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from standby.plumbing.config import parse_address, save_toml
from standby.plumbing.enrollment import add_enroll_parser, enroll, read_passphrase
from standby.plumbing.errors import BadInput, run_main
from standby.plumbing.logs import add_log_options, setup_logging
from standby.plumbing.notify import Notifier
from standby.plumbing.service import run_daemon
from standby.plumbing.version import add_version

from .config import DEFAULT_DIR, DEFAULT_RETENTION_DIR, MTConfig
from .volume import VolumeError, check_retention_dir, on_root_file_system, shared_volume_warning


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="standby-mt", description="standby master target: writes replica disks")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = add_enroll_parser(sub, "master target", DEFAULT_DIR)
    e.add_argument(
        "--retention-dir",
        type=Path,
        default=DEFAULT_RETENTION_DIR,
        help=f"the retention volume: history of every replica (default {DEFAULT_RETENTION_DIR}; a volume of its "
        "own, not FAT, not the process server's cache, not holding replicas); checked before enrolling",
    )
    e.add_argument(
        "--shared-volume",
        action="store_true",
        help="accept a retention directory on the root file system (a small or test deployment: history then "
        "competes with the system for space)",
    )
    r = sub.add_parser("run", help="run the master target")
    r.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})")
    add_log_options(r)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "enroll":
        return run_main(lambda: cmd_enroll(args), "standby-mt")
    return run_main(lambda: cmd_run(args), "standby-mt")


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging("standby.mt", args.log_level, args.log_file)

    async def serve(stop: asyncio.Event, notifier: Notifier) -> None:
        from .daemon import MasterTarget

        mt = MasterTarget(MTConfig.load(args.dir))
        await mt.run(stop, notifier)  # READY=1 once connected to the process server, or retrying with why

    return run_daemon("standby-mt", serve)


def cmd_enroll(args: argparse.Namespace) -> int:
    host, port = parse_address(args.server)
    check_retention_volume(args.retention_dir, args.shared_volume)
    passphrase = read_passphrase(args.passphrase_file)
    ident = enroll(host, port, args.fingerprint, args.name, "mt", passphrase, args.dir / "identity", args.replace)
    save_toml(
        args.dir / "mt.toml",
        {"name": ident.name, "server": f"{host}:{port}",
         "retention": {"dir": str(args.retention_dir.absolute()), "shared_volume": args.shared_volume}},
    )
    print(f"enrolled master target {ident.name!r} with {host}:{port}; state in {args.dir}")
    print(f"start it with: standby-mt run --dir {args.dir}")
    return 0


def check_retention_volume(path: Path, shared_ok: bool) -> None:
    """Before enrolling (nothing is written if it is refused): the retention volume's rules, and a volume of
    its own unless the operator accepts the root file system."""
    try:
        check_retention_dir(path)
    except VolumeError as exc:
        raise BadInput(str(exc)) from None
    if on_root_file_system(path):
        if not shared_ok:
            raise BadInput(f"{shared_volume_warning(path)}, or pass --shared-volume to accept it")
        print(f"warning: {shared_volume_warning(path)} (accepted: --shared-volume)")


if __name__ == "__main__":
    raise SystemExit(main())
