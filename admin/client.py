"""The admin CLI's connection to the configuration service (admin identity, mutual TLS)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from standby.plumbing.config import load_toml, parse_address
from standby.plumbing.errors import Refused, Unreachable
from standby.plumbing.identity import Identity, IdentityError
from standby.plumbing.link import LinkClosed, dial
from standby.plumbing.tls import client_context

DEFAULT_ADMIN_DIR = Path(os.environ.get("STANDBY_ADMIN", "/var/lib/standby/ps/admin"))


class AdminClient:
    def __init__(self, admin_dir: Path, server: str | None = None) -> None:
        try:
            self.identity = Identity.load(admin_dir, command="standby-ps init")
        except IdentityError as exc:
            raise Refused(f"no admin identity: {exc} (or pass --admin DIR)") from None
        if self.identity.role != "admin":
            raise Refused(f"the identity in {admin_dir} is a {self.identity.role}, not the admin")
        if server is None:
            conf = admin_dir / "admin.toml"
            server = str(load_toml(conf).get("server", "127.0.0.1")) if conf.exists() else "127.0.0.1"
        self.host, self.port = parse_address(server)

    async def acall(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        """One request. A connection lost or an answer not given in time is the process server being
        unreachable (exit 3), never a crash."""
        link = await dial(self.host, self.port, client_context(self.identity), "admin")
        where = f"the process server at {self.host}:{self.port}"
        try:
            return await link.call(op, timeout, **args)
        except TimeoutError:
            raise Unreachable(f"{where} did not answer {op} within {timeout:.0f} s") from None
        except LinkClosed as exc:
            raise Unreachable(f"{where} closed the connection during {op}: {exc}") from None
        finally:
            await link.close()

    def call(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        """One request; `timeout` bounds the wait for its answer (None: as long as it takes)."""
        return asyncio.run(self.acall(op, timeout, **args))
