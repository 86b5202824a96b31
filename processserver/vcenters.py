"""The vCenters the configuration service talks to: one JSON file each in <state_dir>/vcenters/, mode 0600
in a 0700 directory, like the other secrets of the process server (the CA key, the registry). The
password is stored there and nowhere else: never logged, never in a reply (`standby vcenter list` shows
the user and the pinned fingerprint only)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from standby.plumbing.durable import DamagedFile, load_json, make_private_dir, save_json
from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode
from standby.vsphere.connect import VCenter

FIELDS = ("name", "host", "port", "user", "password", "fingerprint", "added_at")


class VCenterStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "vcenters"

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"  # name is checked at the boundary (proto.fields.name): no '/'

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json")) if self.dir.is_dir() else []

    def has(self, name: str) -> bool:
        return self._path(name).exists()

    def save(self, vc: VCenter) -> None:
        make_private_dir(self.dir)
        save_json(self._path(vc.name), {
            "name": vc.name, "host": vc.host, "port": vc.port, "user": vc.user, "password": vc.password,
            "fingerprint": vc.fingerprint, "added_at": time.time(),
        }, mode=0o600)

    def _raw(self, name: str) -> dict[str, Any]:
        path = self._path(name)
        if not path.exists():
            known = ", ".join(self.names()) or "none; add one with `standby vcenter add`"
            raise RequestFailed(ErrorCode.BAD_INPUT, f"unknown vCenter {name!r} (known: {known})")
        try:
            raw = load_json(path)
            if not isinstance(raw, dict) or set(raw) != set(FIELDS):
                raise DamagedFile(f"{path} is damaged: expected the fields {', '.join(FIELDS)}")
        except OSError as exc:
            raise RequestFailed(ErrorCode.FAILED, f"vCenter {name}: {exc}; add it again with --replace") from None
        return raw

    def get(self, name: str) -> VCenter:
        r = self._raw(name)
        return VCenter(r["name"], r["host"], int(r["port"]), r["user"], r["password"], r["fingerprint"])

    def listing(self) -> list[dict[str, Any]]:
        """Every vCenter without its password."""
        return [{k: v for k, v in self._raw(n).items() if k != "password"} for n in self.names()]

    def remove(self, name: str) -> None:
        self._raw(name)
        self._path(name).unlink()
