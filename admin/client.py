"""The admin CLI's connection to the configuration service (admin identity, mutual TLS)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from standby.plumbing.config import load_toml, parse_address
from standby.plumbing.errors import Refused
from standby.plumbing.identity import Identity, IdentityError
from standby.plumbing.link import dial
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
        link = await dial(self.host, self.port, client_context(self.identity), "admin")
        try:
            return await link.call(op, timeout, **args)
        finally:
            await link.close()

    def call(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
        """One request; `timeout` bounds the wait for its answer (None: as long as it takes)."""
        return asyncio.run(self.acall(op, timeout, **args))
