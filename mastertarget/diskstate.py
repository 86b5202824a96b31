"""What the master target knows durably about each replica: disks/<disk id>.json.

`applied_seq` is written only after the replica was synced, so it never claims more than the replica
holds. A crash between the replica sync and this write means the last batch is applied again on
restart — harmless, because a batch's writes are absolute (offset, bytes), never relative.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from standby.plumbing.durable import DamagedFile, load_record, save_json
from standby.proto.states import DiskState, Replication

log = logging.getLogger("standby.mt.state")


@dataclass
class ReplicaState:
    disk: int
    machine: str
    name: str
    uid: str
    size: int
    kind: str
    path: str
    applied_seq: int = 0
    generation: int = 1
    # proto.states words: the disk axis (Inconsistent during initial replication and resync, UpToDate after),
    # or FailedOver once failed over (nothing more is applied).
    state: str = DiskState.INCONSISTENT.value
    error: str | None = None
    last_point: dict[str, Any] | None = None  # the newest point applied: proto.point.Point.to_wire()

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
        return load_record(cls, p)

    @staticmethod
    def all(directory: Path) -> list[ReplicaState]:
        if not directory.exists():
            return []
        out = []
        for p in sorted(directory.glob("*.json")):
            if p.stem.isdigit():
                try:
                    out.append(load_record(ReplicaState, p))
                except DamagedFile as exc:  # that disk fails when it is opened (with this reason); not the rest
                    log.error("%s", exc)
        return out
