"""`standby-ps`: create a deployment (`init`) and run the process server (`run`)."""

from __future__ import annotations

import argparse
import asyncio
import socket
from pathlib import Path

from standby.plumbing.config import DEFAULT_PORT, parse_size
from standby.plumbing.errors import run_main
from standby.plumbing.logs import add_log_options, setup_logging
from standby.plumbing.notify import Notifier
from standby.plumbing.service import run_daemon
from standby.plumbing.version import add_version

from .deployment import DEFAULT_DIR, DEFAULT_QUOTA, PSConfig, init_deployment


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="standby-ps", description="standby process server and configuration service")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="create a new deployment: CA, server certificate, admin identity, passphrase")
    i.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"deployment directory (default {DEFAULT_DIR})")
    i.add_argument("--name", default=socket.gethostname(), help="process server name (default: host name)")
    i.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="a name or address agents use to reach this server (repeatable; added to its certificate)",
    )
    i.add_argument("--listen", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    i.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    i.add_argument(
        "--cache-quota",
        default=str(DEFAULT_QUOTA),
        type=parse_size,
        help="cache size above which the server stops accepting data (default 10G)",
    )
    r = sub.add_parser("run", help="run the process server")
    r.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"deployment directory (default {DEFAULT_DIR})")
    add_log_options(r)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "init":
        return run_main(lambda: cmd_init(args), "standby-ps")
    return run_main(lambda: cmd_run(args), "standby-ps")


def cmd_init(args: argparse.Namespace) -> int:
    advertise = args.host[0] if args.host else socket.gethostname()
    info = init_deployment(args.dir, args.name, args.host, args.listen, args.port, args.cache_quota, advertise)
    print(f"deployment created in {info['state_dir']}")
    print(f"  CA fingerprint:      {info['fingerprint']}")
    print(f"  enrollment passphrase: in {info['passphrase_file']} (readable by root only)")
    print(f"  admin identity:      {info['admin_dir']}  (for the `standby` CLI: --admin {info['admin_dir']})")
    print(f"  server address:      {info['server']}")
    print("enroll agents and master targets with:")
    print(
        f"  standby-agent enroll --server {info['server']} --fingerprint {info['fingerprint']} --passphrase-file FILE"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging("standby.ps", args.log_level, args.log_file)

    async def serve(stop: asyncio.Event, notifier: Notifier) -> None:
        from .server import ProcessServer
        from .summary import summary

        cfg = PSConfig.load(args.dir)
        server = ProcessServer(cfg)
        ready = asyncio.Event()
        task = asyncio.create_task(server.serve(stop, ready))
        await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():  # listening: agents and master targets can connect from now on
            notifier.ready(lambda: f"listening on port {server.port}: {summary(server)}")
        await task

    try:
        return run_daemon("standby-ps", serve)
    except OSError as exc:
        print(f"standby-ps: error: cannot start: {exc}")
        return 5


if __name__ == "__main__":
    raise SystemExit(main())
