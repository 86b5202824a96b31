"""Config files are TOML, read once at start-up into an immutable, validated object (no globals)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from .durable import save_file
from .errors import BadInput, NotStarted

DEFAULT_PORT = 9443
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.I)


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise NotStarted(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NotStarted(f"config file {path} is not valid TOML: {exc}") from None


def save_toml(path: Path, data: dict[str, Any], mode: int = 0o644) -> None:
    save_file(path, tomli_w.dumps(data).encode(), mode)


def parse_size(text: str | int) -> int:
    """'10G', '512MiB', '1.5T', 4096 -> bytes (binary units: operators size disks in GiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(text) if isinstance(text, str) else None
    if not m or len(m.group(1)) > 20:
        raise BadInput(f"not a size: {text!r} (examples: 1G, 512M, 4096)")
    n, unit = float(m.group(1)), m.group(2).lower()
    return int(n * 1024 ** " kmgtp".index(unit or " "))


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"not a server address: {text!r} (expected HOST or HOST:PORT)")
    return host, int(port)


@dataclass(frozen=True)
class ClientConfig:
    """What an agent and a master target both have: a state directory, the name they enrolled under and
    the process server they dial. Their own configs extend it."""

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


def load_client_toml(state_dir: Path, filename: str, enroll_command: str) -> tuple[Path, dict[str, Any], ClientConfig]:
    """Read an enrolled client's TOML: (its path, the raw table, the common part). A missing file means
    the machine was never enrolled, and the message says what to run."""
    path = Path(state_dir) / filename
    if not path.exists():
        raise NotStarted(
            f"not enrolled: no {filename} in {state_dir} — run '{enroll_command} --dir {state_dir} …' first"
        )
    raw = load_toml(path)
    try:
        host, port = parse_address(str(raw["server"]))
        return path, raw, ClientConfig(Path(state_dir), str(raw["name"]), host, port)
    except (KeyError, BadInput) as exc:
        raise NotStarted(f"{path}: invalid config: {exc}") from None
