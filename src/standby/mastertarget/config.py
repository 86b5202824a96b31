"""The master target's configuration (mt.toml in its state directory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from standby.plumbing.config import load_toml, parse_address
from standby.plumbing.errors import BadInput, NotStarted

DEFAULT_DIR = Path("/var/lib/standby/mt")


@dataclass(frozen=True)
class MTConfig:
    state_dir: Path
    name: str
    host: str
    port: int

    @property
    def identity_dir(self) -> Path:
        return self.state_dir / "identity"

    @property
    def disks_dir(self) -> Path:
        return self.state_dir / "disks"

    @classmethod
    def load(cls, state_dir: Path) -> MTConfig:
        if not (Path(state_dir) / "mt.toml").exists():
            raise NotStarted(
                f"not enrolled: no mt.toml in {state_dir} — run 'standby-mt enroll --dir {state_dir} …' first"
            )
        raw = load_toml(Path(state_dir) / "mt.toml")
        try:
            host, port = parse_address(str(raw["server"]))
            return cls(Path(state_dir), str(raw["name"]), host, port)
        except (KeyError, BadInput) as exc:
            raise NotStarted(f"{state_dir}/mt.toml: invalid config: {exc}") from None
