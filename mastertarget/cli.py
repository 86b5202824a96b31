"""`standby-mt`: enroll this master target with a deployment (`enroll`) and run it (`run`)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from standby.plumbing.config import parse_address, save_toml
from standby.plumbing.enrollment import add_enroll_parser, enroll, read_passphrase
from standby.plumbing.errors import run_main
from standby.plumbing.logs import setup_logging
from standby.plumbing.service import run_daemon, sd_notify
from standby.plumbing.version import add_version

from .config import DEFAULT_DIR, DEFAULT_RETENTION_DIR, MTConfig


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
        "own, not FAT, not the process server's cache, not holding replicas)",
    )
    r = sub.add_parser("run", help="run the master target")
    r.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state directory (default {DEFAULT_DIR})")
    r.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "enroll":
        return run_main(lambda: cmd_enroll(args), "standby-mt")
    setup_logging("standby.mt", args.log_level)

    async def serve(stop: asyncio.Event) -> None:
        from .daemon import MasterTarget

        mt = MasterTarget(MTConfig.load(args.dir))
        sd_notify("READY=1")
        await mt.run(stop)

    return run_daemon("standby-mt", serve)


def cmd_enroll(args: argparse.Namespace) -> int:
    host, port = parse_address(args.server)
    passphrase = read_passphrase(args.passphrase_file)
    ident = enroll(host, port, args.fingerprint, args.name, "mt", passphrase, args.dir / "identity", args.replace)
    save_toml(
        args.dir / "mt.toml",
        {"name": ident.name, "server": f"{host}:{port}", "retention": {"dir": str(args.retention_dir.absolute())}},
    )
    print(f"enrolled master target {ident.name!r} with {host}:{port}; state in {args.dir}")
    print(f"start it with: standby-mt run --dir {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
