"""What the master target knows durably about each replica: disks/<disk id>.json.

`applied_seq` is written only after the replica was synced, so it never claims more than the replica
holds. A crash between the replica sync and this write means the last batch is applied again on
restart — harmless, because a batch's writes are absolute (offset, bytes), never relative.

State files written before the replica format had its own word keep it under `kind`: `load` reads that
too (the next save writes `format`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from standby.plumbing.durable import DamagedFile, load_record, save_json
from standby.proto.enums import ReplicaFormat
from standby.proto.states import DiskState, Replication

log = logging.getLogger("standby.mt.state")


@dataclass
class ReplicaState:
    disk: int
    machine: str
    name: str
    uid: str
    size: int
    format: ReplicaFormat
    path: str
    applied_seq: int = 0
    generation: int = 1
    # proto.states words: the disk axis (Inconsistent during initial replication and resync, UpToDate after),
    # or FailedOver once failed over (nothing more is applied).
    state: str = DiskState.INCONSISTENT.value
    error: str | None = None
    last_point: dict[str, Any] | None = None  # the newest point applied: proto.point.Point.to_wire()

    def __post_init__(self) -> None:
        self.format = ReplicaFormat(self.format)  # ValueError (a damaged file) if it is not one

    def move(self, new: DiskState | Replication, reason: str) -> bool:
        """Set the state, with one log line if it changed; True if it did (the state file must be saved)."""
        if new == self.state:
            return False
        log.info("disk %s/%s: replica %s -> %s (reason: %s)", self.machine, self.name, self.state, new.value, reason)
        self.state = new.value
        return True

    def save(self, directory: Path) -> None:
        save_json(directory / f"{self.disk}.json", asdict(self), 0o600)

    @classmethod
    def load(cls, directory: Path, disk: int) -> ReplicaState | None:
        p = directory / f"{disk}.json"
        if not p.exists():
            return None
        return load_record(cls, p, _upgrade)

    @staticmethod
    def all(directory: Path) -> list[ReplicaState]:
        if not directory.exists():
            return []
        out = []
        for p in sorted(directory.glob("*.json")):
            if p.stem.isdigit():
                try:
                    out.append(load_record(ReplicaState, p, _upgrade))
                except DamagedFile as exc:  # that disk fails when it is opened (with this reason); not the rest
                    log.error("%s", exc)
        return out


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A state file of an older release: the replica format was saved under `kind`."""
    if "kind" in raw and "format" not in raw:
        raw = {**raw, "format": raw["kind"]}
        del raw["kind"]
    return raw
