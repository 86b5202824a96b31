"""The master target's configuration (mt.toml in its state directory): name and process server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from standby.plumbing.config import ClientConfig, load_client_toml

DEFAULT_DIR = Path("/var/lib/standby/mt")


@dataclass(frozen=True)
class MTConfig(ClientConfig):
    @classmethod
    def load(cls, state_dir: Path) -> MTConfig:
        _, _, common = load_client_toml(state_dir, "mt.toml", "standby-mt enroll")
        return cls(common.state_dir, common.name, common.host, common.port)
