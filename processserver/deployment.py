"""Creating a deployment (`standby-ps init`) and loading the process server's configuration.

A deployment is a directory (default /var/lib/standby/ps)::

    ps.toml            the process server's config ([metrics] turns on its Prometheus endpoint:
                       plumbing.metrics)
    ca/ca.pem ca.key   the deployment's own CA (key readable by root only)
    identity/          the process server's TLS certificate and key
    admin/             the admin identity the `standby` CLI uses, plus admin.toml (server: the advertised
                       address; local: the address that reaches it on this machine)
    enroll-passphrase  the enrollment passphrase, mode 0400; only its scrypt hash is in the registry
    registry.sqlite    the configuration service's store
    cache/             the per-disk cache
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from standby.plumbing import identity as ident
from standby.plumbing.config import DEFAULT_PORT, load_toml, parse_size, save_toml
from standby.plumbing.durable import make_private_dir, save_file
from standby.plumbing.errors import BadInput, NotStarted
from standby.plumbing.metrics import MetricsConfig, parse_metrics
from standby.plumbing.passphrase import hash_passphrase

from .registry import Registry

DEFAULT_DIR = Path("/var/lib/standby/ps")
DEFAULT_QUOTA = 10 * 1024**3
DEFAULT_RPO_THRESHOLD = 15 * 60.0  # the seeds' failback policy: RPO threshold 15 minutes


@dataclass(frozen=True)
class PSConfig:
    state_dir: Path
    name: str
    listen: str
    port: int
    cache_dir: Path
    cache_quota: int
    # Policy: an alert when a disk's RPO (now minus its newest applied point) passes this (seconds).
    rpo_threshold: float = DEFAULT_RPO_THRESHOLD
    metrics: MetricsConfig | None = None  # the Prometheus endpoint ([metrics] in ps.toml; off without it)
    # vSphere: how long a master target VM's guest may take to show a replica disk just attached (seconds).
    vsphere_device_wait: float = 120.0

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite"

    @classmethod
    def load(cls, state_dir: Path) -> PSConfig:
        state_dir = Path(state_dir)
        raw = load_toml(state_dir / "ps.toml")
        try:
            port = int(raw.get("port", DEFAULT_PORT))
            cfg = cls(
                state_dir=state_dir,
                name=str(raw["name"]),
                listen=str(raw.get("listen", "0.0.0.0")),
                port=port,
                cache_dir=Path(raw.get("cache_dir", state_dir / "cache")),
                cache_quota=parse_size(raw.get("cache_quota", DEFAULT_QUOTA)),
                rpo_threshold=float(raw.get("rpo_threshold", DEFAULT_RPO_THRESHOLD)),
                metrics=parse_metrics(raw.get("metrics")),
                vsphere_device_wait=float(raw.get("vsphere_device_wait", 120.0)),
            )
        except (KeyError, TypeError, ValueError, OverflowError, BadInput) as exc:
            raise NotStarted(f"{state_dir / 'ps.toml'}: invalid config: {exc}") from None
        if not 0 <= cfg.port < 65536 or cfg.cache_quota <= 0 or not 0 < cfg.vsphere_device_wait <= 300:
            raise NotStarted(f"{state_dir / 'ps.toml'}: port must be 0..65535, cache_quota positive and "
                             "vsphere_device_wait 0..300 seconds")
        return cfg


def init_deployment(
    state_dir: Path, name: str, hosts: list[str], listen: str, port: int, cache_quota: int, advertise: str
) -> dict[str, str]:
    """Create everything a new deployment needs; refuse to overwrite an existing one."""
    state_dir = Path(state_dir)
    if (state_dir / "ps.toml").exists():
        raise BadInput(f"{state_dir} already holds a deployment (ps.toml exists); choose another --dir")
    make_private_dir(state_dir)
    hosts = list(dict.fromkeys([*hosts, "127.0.0.1", "localhost", socket.gethostname()]))
    ca_cert, ca_key = ident.create_ca(name)
    cadir = make_private_dir(state_dir / "ca")
    save_file(cadir / "ca.pem", ca_cert, 0o644)
    save_file(cadir / "ca.key", ca_key, 0o600)
    cert, key = ident.issue_server_cert(ca_cert, ca_key, name, hosts)
    ident.Identity(name, "ps", cert, key, ca_cert).save(make_private_dir(state_dir / "identity"))
    akey, acsr = ident.make_key_and_csr("admin", "admin")
    acert = ident.sign_csr(ca_cert, ca_key, acsr, "admin", "admin")
    admin_dir = make_private_dir(state_dir / "admin")
    ident.Identity("admin", "admin", acert, akey, ca_cert).save(admin_dir)
    # `server` is what agents dial; `local` reaches this server from its own machine, where the advertised
    # name may not resolve (admin.client dials it then, checking the certificate against `server`'s name).
    local = listen if listen not in ("0.0.0.0", "::", "") else "127.0.0.1"
    local = f"[{local}]" if ":" in local else local
    save_toml(admin_dir / "admin.toml", {"server": f"{advertise}:{port}", "local": f"{local}:{port}"})
    passphrase = ident.generate_passphrase()
    save_file(state_dir / "enroll-passphrase", (passphrase + "\n").encode(), 0o400)
    reg = Registry(state_dir / "registry.sqlite")
    try:
        reg.set_meta("deployment", name)
        reg.set_meta("passphrase", hash_passphrase(passphrase))
        reg.set_meta("admin_serial", str(ident.cert_serial(acert)))
    finally:
        reg.close()
    os.chmod(state_dir / "registry.sqlite", 0o600)
    save_toml(
        state_dir / "ps.toml",
        {
            "name": name,
            "listen": listen,
            "port": port,
            "cache_dir": str(state_dir / "cache"),
            "cache_quota": cache_quota,
        },
    )
    return {
        "state_dir": str(state_dir),
        "fingerprint": ident.ca_fingerprint(ca_cert),
        "passphrase_file": str(state_dir / "enroll-passphrase"),
        "admin_dir": str(admin_dir),
        "server": f"{advertise}:{port}",
    }
