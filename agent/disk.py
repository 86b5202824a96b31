"""A protected disk's identity on this machine: its uid and data key, kept in the state directory, and what
the process server calls it on the current connection."""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from standby.plumbing.durable import load_json, save_json
from standby.proto.keywrap import new_data_key
from standby.proto.messages import Ack, Busy

from .config import DiskConfig


def trace_instance(uid: uuid.UUID) -> str:
    """The name of a disk's private tracefs instance (admin tools remove a stale one by this name)."""
    return f"standby-{uid.hex[:16]}"


@dataclass
class LocalDisk:
    """What the agent keeps about a disk: its uid and data key (never sent in clear); its size and id at
    the process server, and the answers awaited per sequence, for the current connection."""

    cfg: DiskConfig
    uid: uuid.UUID
    key: bytes
    size: int = 0
    id: int = 0
    acks: dict[int, asyncio.Future[Ack | Busy]] = field(default_factory=dict)

    @property
    def instance(self) -> str:
        """The name of the disk's private tracefs instance."""
        return trace_instance(self.uid)

    @classmethod
    def load_or_create(cls, directory: Path, cfg: DiskConfig) -> LocalDisk:
        path = directory / f"{cfg.name}.json"
        if path.exists():
            raw = load_json(path)
            return cls(cfg, uuid.UUID(raw["uid"]), base64.b64decode(raw["key"]))
        disk = cls(cfg, uuid.uuid4(), new_data_key())
        # Threat: another local user reading the data key. The file is created 0600 in a 0700 directory.
        save_json(path, {"uid": str(disk.uid), "key": base64.b64encode(disk.key).decode()}, 0o600)
        return disk
