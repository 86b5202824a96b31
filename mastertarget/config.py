"""The master target's configuration (mt.toml in its state directory)::

    name = "mt01"
    server = "ps.example.net:9443"
    disk_by_id_dir = "/dev/disk/by-id"   # where a replica disk attached in vSphere is looked up by name
    system_uuid = "4213a1b2-5c6d-7e8f-9a0b-1c2d3e4f5a6b"   # optional: this machine's SMBIOS UUID where the
                               # firmware reports none or a wrong one (plumbing.about)

    [retention]
    dir = "/mnt/retention"     # the retention volume: undo records of every replica (default /mnt/retention)
    window = "24h"             # recovery points are kept this long (the seeds' failback policy: 24 h)
    space_cap = "200G"         # at most this much history (optional); over it, the oldest points go first
    tiers = [[3600, 0], [21600, 300], [86400, 3600]]   # [age, every]: up to `age` seconds old, one point
                               # per `every` seconds (0: all) — all for 1 h, one per 5 min to 6 h, hourly
    segment_size = "64M"       # journal files: pruning frees whole files, so this is its granularity

    [metrics]                  # optional: a Prometheus endpoint (plumbing.metrics), off without this table
    port = 9465
    address = "127.0.0.1"      # the default

Besides the cap, history never takes the retention volume's last `reserve` bytes (default 5 % of the
volume, at most 4 GiB): space pressure prunes oldest points first, with an alert, instead of failing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standby.plumbing.about import parse_system_uuid
from standby.plumbing.config import ClientConfig, load_client_toml, parse_size
from standby.plumbing.errors import BadInput, NotStarted
from standby.plumbing.metrics import MetricsConfig, parse_metrics

from .journal import SEGMENT_MAX
from .retention import Policy, Tier

DEFAULT_DIR = Path("/var/lib/standby/mt")
DEFAULT_RETENTION_DIR = Path("/mnt/retention")
DEFAULT_BY_ID_DIR = Path("/dev/disk/by-id")  # udev's names of disks by their identity (mastertarget.guestdisk)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str | int | float) -> float:
    """'24h', '90m', '3600', 3600 -> seconds."""
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(str(text))
    if not m:
        raise BadInput(f"not a duration: {text!r} (examples: 24h, 90m, 3600)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@dataclass(frozen=True)
class MTConfig(ClientConfig):
    retention_dir: Path = DEFAULT_RETENTION_DIR
    policy: Policy = field(default_factory=Policy)
    reserve: int | None = None  # bytes the journal leaves free on the retention volume (None: 5 %, <= 4 GiB)
    segment_size: int = SEGMENT_MAX  # journal file size: pruning frees whole files
    shared_volume: bool = False  # the operator accepted a retention directory on the root file system
    metrics: MetricsConfig | None = None  # the Prometheus endpoint ([metrics]; off without it)
    disk_by_id_dir: Path = DEFAULT_BY_ID_DIR  # where find_device looks (tests: a directory of symlinks)
    system_uuid: str | None = None  # None: the firmware's (plumbing.about); "": say unknown

    @classmethod
    def load(cls, state_dir: Path) -> MTConfig:
        path, raw, common = load_client_toml(state_dir, "mt.toml", "standby-mt enroll")
        r: dict[str, Any] = raw.get("retention", {})
        try:
            metrics = parse_metrics(raw.get("metrics"))
        except BadInput as exc:
            raise NotStarted(f"{path}: invalid [metrics] settings: {exc}") from None
        try:
            by_id = raw.get("disk_by_id_dir", str(DEFAULT_BY_ID_DIR))
            if not isinstance(by_id, str) or not by_id.startswith("/"):
                raise BadInput(f"disk_by_id_dir must be an absolute path, not {by_id!r}")
            system_uuid = parse_system_uuid(raw.get("system_uuid"))
        except BadInput as exc:
            raise NotStarted(f"{path}: invalid config: {exc}") from None
        try:
            if not isinstance(r, dict):
                raise TypeError("[retention] must be a table")
            defaults = Policy()
            tiers = defaults.tiers
            if "tiers" in r:
                tiers = tuple(Tier(parse_duration(a), parse_duration(e)) for a, e in r["tiers"])
            policy = Policy(
                window=parse_duration(r.get("window", defaults.window)),
                space_cap=parse_size(r["space_cap"]) if r.get("space_cap") is not None else None,
                tiers=tiers,
            )
            reserve = parse_size(r["reserve"]) if r.get("reserve") is not None else None
            segment = parse_size(r.get("segment_size", SEGMENT_MAX))
            if not 64 * 1024 <= segment <= 1 << 30:
                raise BadInput("segment_size must be 64K..1G")
            shared = r.get("shared_volume", False)
            if not isinstance(shared, bool):
                raise TypeError("shared_volume must be true or false")
            return cls(common.state_dir, common.name, common.host, common.port,
                       Path(r.get("dir", DEFAULT_RETENTION_DIR)), policy, reserve, segment, shared, metrics,
                       Path(by_id), system_uuid)
        except (TypeError, ValueError, OverflowError, KeyError, BadInput) as exc:
            raise NotStarted(f"{path}: invalid [retention] settings: {exc}") from None
