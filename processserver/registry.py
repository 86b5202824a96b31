"""The configuration service's store: machines, disks, assignments, replication state (SQLite).

SQLite is the embedded default: nothing else to install for a single-site deployment. WAL mode with
synchronous=NORMAL survives a process crash; the *data* path never depends on these rows alone —
what is received is proven by the fsynced cache, what is applied by the master target's own state, and
both are reconciled with these rows at start-up and at every connection.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from standby.proto.states import Replication, describe, move

log = logging.getLogger("standby.ps")


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS machines (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    serial TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    enrolled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS disks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    replication TEXT NOT NULL DEFAULT 'Off',
    generation INTEGER NOT NULL DEFAULT 1,
    received_seq INTEGER NOT NULL DEFAULT 0,
    applied_seq INTEGER NOT NULL DEFAULT 0,
    cursor INTEGER NOT NULL DEFAULT 0,
    applied_cursor INTEGER NOT NULL DEFAULT 0,
    mt TEXT,
    replica_path TEXT,
    replica_format TEXT,
    wrapped_key BLOB,
    bytes_logical INTEGER NOT NULL DEFAULT 0,
    bytes_data INTEGER NOT NULL DEFAULT 0,
    bytes_wire INTEGER NOT NULL DEFAULT 0,
    bytes_applied INTEGER NOT NULL DEFAULT 0,
    protected_at REAL,
    synced_at REAL,
    error TEXT,
    UNIQUE (machine, name)
);
"""

# Columns added after the first release: (name, SQL type with default). Added to older databases at open.
LATER_COLUMNS = (
    ("last_point_at", "REAL"),
    ("last_point_seq", "INTEGER NOT NULL DEFAULT 0"),
    ("resync_request", "TEXT"),  # JSON {mode, reason} asked by the operator or the system, not yet started
    ("resync_mode", "TEXT"),
    ("resync_reason", "TEXT"),
    ("resync_started_at", "REAL"),
    ("resync_done_at", "REAL"),
    ("paused", "INTEGER NOT NULL DEFAULT 0"),
    ("seed", "INTEGER NOT NULL DEFAULT 0"),
)

# The same for the machines table: what an agent or a master target says of itself at each connection
# (proto.requests.About), kept for vCenter discovery (a VM is matched to a standby machine by its UUID).
LATER_MACHINE_COLUMNS = (
    ("system_uuid", "TEXT"),  # SMBIOS system UUID; "" when the machine could not tell, NULL before it said
    ("hostname", "TEXT"),
    ("reported_at", "REAL"),
)
MACHINE_COLUMNS = ["name", "role", "serial", "cert_pem", "enrolled_at", *(c for c, _ in LATER_MACHINE_COLUMNS)]
LISTED_MACHINE_COLUMNS = ["name", "role", "enrolled_at", *(c for c, _ in LATER_MACHINE_COLUMNS)]

# The one state word of a disk before the two axes of proto.states existed (column `state`), and its
# replication state now (column `replication`): a registry written by an older release is read as this one.
OLD_STATE_WORDS = {
    "unprotected": Replication.OFF,
    "seeding": Replication.INITIAL,  # the `seed` column says it compares against an existing replica
    "initial-replication": Replication.INITIAL,
    "resyncing": Replication.RESYNC,
    "up-to-date": Replication.DELTA,
    "failed-over": Replication.FAILED_OVER,
    "failover-committed": Replication.COMMITTED,
}

DISK_COLUMNS = (
    "id machine name uid path size replication generation received_seq applied_seq cursor applied_cursor mt "
    "replica_path replica_format wrapped_key bytes_logical bytes_data bytes_wire bytes_applied protected_at "
    "synced_at error"
).split() + [c for c, _ in LATER_COLUMNS]


@dataclass
class DiskRow:
    id: int
    machine: str
    name: str
    uid: str
    path: str
    size: int
    replication: Replication
    generation: int
    received_seq: int
    applied_seq: int
    cursor: int
    applied_cursor: int
    mt: str | None
    replica_path: str | None
    replica_format: str | None
    wrapped_key: bytes | None
    bytes_logical: int
    bytes_data: int
    bytes_wire: int
    bytes_applied: int
    protected_at: float | None
    synced_at: float | None
    error: str | None
    last_point_at: float | None = None
    last_point_seq: int = 0
    resync_request: str | None = None
    resync_mode: str | None = None
    resync_reason: str | None = None
    resync_started_at: float | None = None
    resync_done_at: float | None = None
    paused: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.replication = Replication(self.replication)

    @property
    def label(self) -> str:
        """machine/disk, as log lines name a disk."""
        return f"{self.machine}/{self.name}"


class Registry:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = {r[1] for r in self.db.execute("PRAGMA table_info(disks)")}
        if "state" in have:
            self.db.execute("ALTER TABLE disks RENAME COLUMN state TO replication")
        # Every open, not only right after the rename: a crash between the rename and these updates (each
        # its own transaction) must not leave old words that no later open would map.
        for old, new in OLD_STATE_WORDS.items():
            self.db.execute("UPDATE disks SET replication=? WHERE replication=?", (new.value, old))
        for col, sql in LATER_COLUMNS:
            if col not in have:
                self.db.execute(f"ALTER TABLE disks ADD COLUMN {col} {sql}")
        have = {r[1] for r in self.db.execute("PRAGMA table_info(machines)")}
        for col, sql in LATER_MACHINE_COLUMNS:
            if col not in have:
                self.db.execute(f"ALTER TABLE machines ADD COLUMN {col} {sql}")

    def close(self) -> None:
        self.db.close()

    # -- meta ---------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- machines -----------------------------------------------------------------------------------
    def add_machine(self, name: str, role: str, serial: int, cert_pem: bytes) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO machines(name, role, serial, cert_pem, enrolled_at) VALUES (?,?,?,?,?)",
            (name, role, str(serial), cert_pem.decode(), time.time()),
        )

    def machine(self, name: str) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT {', '.join(MACHINE_COLUMNS)} FROM machines WHERE name=?", (name,))
        r = row.fetchone()
        return dict(zip(MACHINE_COLUMNS, r, strict=True)) if r else None

    def set_about(self, name: str, system_uuid: str, hostname: str) -> None:
        """What machine `name` said of itself as it connected (proto.requests.About), and when."""
        self.db.execute("UPDATE machines SET system_uuid=?, hostname=?, reported_at=? WHERE name=?",
                        (system_uuid, hostname, time.time(), name))

    def remove_machine(self, name: str) -> None:
        """Forget an enrolled identity: its certificate is no longer current (server._current_cert)."""
        self.db.execute("DELETE FROM machines WHERE name=?", (name,))

    def machines(self) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(LISTED_MACHINE_COLUMNS)} FROM machines ORDER BY name"
        return [dict(zip(LISTED_MACHINE_COLUMNS, r, strict=True)) for r in self.db.execute(sql).fetchall()]

    # -- disks --------------------------------------------------------------------------------------
    def _rows(self, where: str, args: tuple[Any, ...]) -> list[DiskRow]:
        sql = f"SELECT {', '.join(DISK_COLUMNS)} FROM disks {where} ORDER BY machine, name"
        return [DiskRow(*r) for r in self.db.execute(sql, args).fetchall()]

    def disk(self, disk_id: int) -> DiskRow | None:
        rows = self._rows("WHERE id=?", (disk_id,))
        return rows[0] if rows else None

    def disk_by_name(self, machine: str, name: str) -> DiskRow | None:
        rows = self._rows("WHERE machine=? AND name=?", (machine, name))
        return rows[0] if rows else None

    def disks(self, machine: str | None = None, mt: str | None = None) -> list[DiskRow]:
        if machine is not None:
            return self._rows("WHERE machine=?", (machine,))
        if mt is not None:
            return self._rows("WHERE mt=?", (mt,))
        return self._rows("", ())

    def add_disk(self, machine: str, name: str, uid: str, path: str, size: int) -> DiskRow:
        self.db.execute(
            "INSERT INTO disks(machine, name, uid, path, size) VALUES (?,?,?,?,?)", (machine, name, uid, path, size)
        )
        row = self.disk_by_name(machine, name)
        assert row is not None
        return row

    def remove_disk(self, disk_id: int) -> None:
        """Drop a disk's row (unprotect, forget); its id is never given again (AUTOINCREMENT)."""
        self.db.execute("DELETE FROM disks WHERE id=?", (disk_id,))

    def update_disk(self, disk_id: int, **fields: Any) -> None:
        for k in fields:
            if k not in DISK_COLUMNS or k == "id":
                raise KeyError(k)
        sets = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE disks SET {sets} WHERE id=?", (*fields.values(), disk_id))

    def move(self, row: DiskRow, new: Replication, reason: str, **fields: Any) -> DiskRow:
        """Move a disk's replication state (proto.states: an illegal move raises IllegalTransition and
        changes nothing), with other `fields` in the same update; one log line per move. Returns the row
        as it is now."""
        old = row.replication
        move(old, new)
        self.update_disk(row.id, replication=new.value, **fields)
        if old != new:
            log.info("%s", describe(row.label, old, new, reason))
        return self.disk(row.id) or row

    def add_counters(self, disk_id: int, **deltas: int) -> None:
        sets = ", ".join(f"{k}={k}+?" for k in deltas)
        self.db.execute(f"UPDATE disks SET {sets} WHERE id=?", (*deltas.values(), disk_id))
