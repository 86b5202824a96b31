"""The admin CLI's connection to the configuration service (admin identity, mutual TLS).

Which process server it dials, first that applies: the `--server` option, the `STANDBY_SERVER`
environment variable (HOST[:PORT]), the admin identity's admin.toml. `standby-ps init` writes there the
advertised name (`server`, what agents dial, in the server's certificate) and the address that reaches
the server from its own machine (`local`). The advertised name often does not resolve on the process
server itself (a name only the agents' DNS knows): then the CLI dials `local` and still checks the
certificate against the advertised name, so TLS verification is as strict as when dialing the name.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from standby.plumbing.config import load_toml, parse_address
from standby.plumbing.errors import Refused, Unreachable
from standby.plumbing.identity import Identity, IdentityError
from standby.plumbing.link import LinkClosed, dial
from standby.plumbing.tls import client_context

DEFAULT_ADMIN_DIR = Path(os.environ.get("STANDBY_ADMIN", "/var/lib/standby/ps/admin"))
SERVER_ENV = "STANDBY_SERVER"


class AdminClient:
    def __init__(self, admin_dir: Path, server: str | None = None) -> None:
        try:
            self.identity = Identity.load(admin_dir, command="standby-ps init")
        except IdentityError as exc:
            raise Refused(f"no admin identity: {exc} (or pass --admin DIR)") from None
        if self.identity.role != "admin":
            raise Refused(f"the identity in {admin_dir} is a {self.identity.role}, not the admin")
        # The address to fall back to when the advertised name does not resolve here (None: no fallback).
        self.local: tuple[str, int] | None = None
        server = server or os.environ.get(SERVER_ENV) or None
        if server is None:
            conf = admin_dir / "admin.toml"
            raw = load_toml(conf) if conf.exists() else {}
            server = str(raw.get("server", "127.0.0.1"))
            _, port = parse_address(server)
            self.local = parse_address(str(raw.get("local", f"127.0.0.1:{port}")), port)
        self.host, self.port = parse_address(server)
        self.where = f"{self.host}:{self.port}"  # for messages: the server as the operator named it

    async def _address(self) -> tuple[str, int, str | None]:
        """(host, port, name the certificate must carry) to dial: the configured server, or the local
        address checked against the advertised name when that name does not resolve on this machine."""
        if self.local is None or self.local[0] == self.host:
            return self.host, self.port, None
        try:
            await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return self.local[0], self.local[1], self.host
        return self.host, self.port, None

    async def acall(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        """One request. A connection lost or an answer not given in time is the process server being
        unreachable (exit 3), never a crash."""
        host, port, name = await self._address()
        link = await dial(host, port, client_context(self.identity), "admin", server_hostname=name)
        where = f"the process server at {self.where}"
        try:
            return await link.call(op, timeout, **args)
        except TimeoutError:
            raise Unreachable(f"{where} did not answer {op} within {timeout:.0f} s") from None
        except LinkClosed as exc:  # the server went away mid-request (stopped, restarted)
            raise Unreachable(f"{where} closed the connection during {op}: {exc}") from None
        finally:
            await link.close()

    def call(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        """One request; `timeout` bounds the wait for its answer (None: as long as it takes)."""
        return asyncio.run(self.acall(op, timeout, **args))
