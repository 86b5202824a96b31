"""The agent's configuration (agent.toml in its state directory)::

name = "web01"
server = "ps.example.net:9443"
system_uuid = "4213a1b2-5c6d-7e8f-9a0b-1c2d3e4f5a6b"   # optional: this machine's SMBIOS UUID where the
                               # firmware reports none or a wrong one (plumbing.about)
compression_level = 1          # zstd level, 1..19 (1: measured fastest end to end, ~3 % larger)
batch_size = "8M"              # logical bytes read per batch (initial replication, epochs, resync)
tracker = "auto"               # auto (tracefs where possible, else full-scan) | tracefs | full-scan
cut_interval = 1.0             # seconds between cuts (each consistent cut is a crash-consistent point)
cut_bytes = "64M"              # cut early when this much is dirty
trace_buffer = "16M"           # tracefs ring buffer per CPU (never overwritten: a full one means resync)

# App-consistent points (agent.appoint): pre-script, flush and freeze the file systems on the protected
# disks, cut, thaw, post-script. A failing pre-script gives a crash-consistent point with the tag instead.
pre_script = "/etc/standby/pre-freeze"    # optional; run with STANDBY_TAG, STANDBY_PHASE=pre
post_script = "/etc/standby/post-thaw"    # optional; run after the thaw (also when the pre-script failed)
script_timeout = 60            # seconds a script may run; then it is killed and counts as failed
freeze_timeout = 10            # seconds at most frozen: then everything is thawed, whatever happens
app_consistent_every = 3600    # seconds between scheduled app-consistent points (the seeds' 60 min); 0: off

# Planned failback (agent.shutdown): the shutdown step stops the workload, flushes and freezes the file
# systems and cuts the final point; the workload stays stopped. A cancelled failback starts it again.
shutdown_script = "/etc/standby/stop-workload"   # optional; run with STANDBY_PHASE=shutdown (must stop every writer)
start_script = "/etc/standby/start-workload"     # optional; run when a failback is cancelled after the shutdown

[metrics]                      # optional: a Prometheus endpoint (plumbing.metrics), off without this table
port = 9466
address = "127.0.0.1"          # the default

[[disks]]
name = "sda"
path = "/dev/sda"              # a block device or an image file
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from standby.plumbing.about import parse_system_uuid
from standby.plumbing.config import ClientConfig, load_client_toml, parse_size
from standby.plumbing.errors import BadInput, NotStarted
from standby.plumbing.metrics import MetricsConfig, parse_metrics
from standby.proto.messages import MAX_BATCH_LOGICAL

from .tracker import TRACKERS

DEFAULT_DIR = Path("/var/lib/standby/agent")
# zstd level 1: on the demo's data mix, 2 GiB end to end took 14.8 s at level 1 and 15.7 s at level 3 on a
# 2-core machine, for 2.7 % more bytes on the wire (bench/initial_replication.py).
DEFAULT_LEVEL = 1
DISK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class DiskConfig:
    name: str
    path: Path


@dataclass(frozen=True)
class AgentConfig(ClientConfig):
    disks: tuple[DiskConfig, ...] = ()
    compression_level: int = DEFAULT_LEVEL
    batch_size: int = 8 * 1024 * 1024
    tracker: str = "auto"
    cut_interval: float = 1.0
    cut_bytes: int = 64 * 1024 * 1024
    trace_buffer: int = 16 * 1024 * 1024
    pre_script: Path | None = None
    post_script: Path | None = None
    script_timeout: float = 60.0
    freeze_timeout: float = 10.0
    app_consistent_every: float = 3600.0
    metrics: MetricsConfig | None = None  # the Prometheus endpoint ([metrics]; off without it)
    shutdown_script: Path | None = None
    start_script: Path | None = None
    system_uuid: str | None = None  # None: the firmware's (plumbing.about); "": say unknown

    @classmethod
    def load(cls, state_dir: Path) -> AgentConfig:
        path, raw, common = load_client_toml(state_dir, "agent.toml", "standby-agent enroll")
        try:
            disks = tuple(DiskConfig(str(d["name"]), Path(d["path"])) for d in raw.get("disks", []))
            level = int(raw.get("compression_level", DEFAULT_LEVEL))
            batch = parse_size(raw.get("batch_size", 8 * 1024 * 1024))
            tracker = str(raw.get("tracker", "auto"))
            cut_interval = float(raw.get("cut_interval", 1.0))
            cut_bytes = parse_size(raw.get("cut_bytes", 64 * 1024 * 1024))
            trace_buffer = parse_size(raw.get("trace_buffer", 16 * 1024 * 1024))
            pre, post = (Path(raw[k]) if raw.get(k) else None for k in ("pre_script", "post_script"))
            script_timeout = float(raw.get("script_timeout", 60.0))
            freeze_timeout = float(raw.get("freeze_timeout", 10.0))
            app_every = float(raw.get("app_consistent_every", 3600.0))
            metrics = parse_metrics(raw.get("metrics"))
            cfg = cls(
                common.state_dir,
                common.name,
                common.host,
                common.port,
                disks,
                level,
                batch,
                tracker,
                cut_interval,
                cut_bytes,
                trace_buffer,
                pre,
                post,
                script_timeout,
                freeze_timeout,
                app_every,
                metrics,
                *(Path(raw[k]) if raw.get(k) else None for k in ("shutdown_script", "start_script")),
                parse_system_uuid(raw.get("system_uuid")),
            )
        except (KeyError, TypeError, ValueError, OverflowError, BadInput) as exc:
            raise NotStarted(f"{path}: invalid config: {exc}") from None
        names = [d.name for d in disks]
        if len(set(names)) != len(names) or not all(DISK_NAME.match(n) for n in names):
            raise NotStarted(f"{path}: disk names must be unique and simple (letters, digits, . _ -)")
        if not 1 <= level <= 19:
            raise NotStarted(f"{path}: compression_level must be 1..19")
        if batch % (64 * 1024) or not 0 < batch <= MAX_BATCH_LOGICAL:
            raise NotStarted(f"{path}: batch_size must be a multiple of 64K, at most 16M")
        if tracker not in TRACKERS:
            raise NotStarted(f"{path}: tracker must be one of {', '.join(TRACKERS)}")
        if not 0.05 <= cut_interval <= 3600:
            raise NotStarted(f"{path}: cut_interval must be 0.05..3600 seconds")
        if cut_bytes < batch or trace_buffer < 64 * 1024:
            raise NotStarted(f"{path}: cut_bytes must be at least batch_size, trace_buffer at least 64K")
        scripts = (("pre_script", pre), ("post_script", post), ("shutdown_script", cfg.shutdown_script),
                   ("start_script", cfg.start_script))
        for key, script in scripts:
            if script is not None and not script.is_absolute():
                raise NotStarted(f"{path}: {key} must be an absolute path (it is run by a daemon), not {script}")
        if not 1 <= script_timeout <= 3600:
            raise NotStarted(f"{path}: script_timeout must be 1..3600 seconds")
        # A freeze stops every writer on the machine: minutes would look like a hang, not a backup.
        if not 0.1 <= freeze_timeout <= 300:
            raise NotStarted(f"{path}: freeze_timeout must be 0.1..300 seconds")
        if app_every != 0 and not 60 <= app_every <= 7 * 86400:
            raise NotStarted(f"{path}: app_consistent_every must be 0 (off) or 60..604800 seconds")
        return cfg
