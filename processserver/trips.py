"""The store of machines' round trips (reprotect, failback, reverse replication) and of retired identities.

A round trip is named by the machine's original name. Two agent identities take part: the original
machine's and the recovered machine's. Which of them replicates now is `active` (the forward direction:
the original; reverse: the recovered). The registry's disk rows stay per identity, as protection made
them; this store adds what spans both: direction, phase, the recovery site's replicas (kept while the
machine replicates the other way, so that reverse replication seeds from them), the final point of a
failback, and the history of phases with their times and bytes.

A **retired** identity is refused at the door (server.py): the original machine's while its disks are
written by reprotect, and the recovered machine's once it has failed back — so a copy of an agent's
identity and state (a clone on the recovered disks) never writes the stream of a disk another agent
owns.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from standby.proto.states import Direction, Phase

SCHEMA = """
CREATE TABLE IF NOT EXISTS roundtrips (
    name TEXT PRIMARY KEY,
    direction TEXT NOT NULL,
    phase TEXT NOT NULL,
    active TEXT NOT NULL,
    recovered TEXT,
    trips INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS roundtrip_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    phase TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    bytes_start INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS retired (name TEXT PRIMARY KEY, reason TEXT NOT NULL, at REAL NOT NULL);
"""


@dataclass
class Trip:
    name: str
    direction: Direction
    phase: Phase
    active: str
    recovered: str | None = None
    trips: int = 0  # round trips completed (reverse replication started)
    data: dict[str, Any] = field(default_factory=dict)  # away (replicas at the recovery site), policy, final

    def __post_init__(self) -> None:
        self.direction = Direction(self.direction)
        self.phase = Phase(self.phase)


class TripStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def get(self, name: str) -> Trip | None:
        row = self.db.execute("SELECT name, direction, phase, active, recovered, trips, data FROM roundtrips "
                              "WHERE name=?", (name,)).fetchone()
        return Trip(*row[:6], json.loads(row[6])) if row else None

    def of_identity(self, identity: str) -> Trip | None:
        """The round trip an agent identity takes part in (as the original or the recovered machine)."""
        row = self.db.execute("SELECT name FROM roundtrips WHERE name=? OR recovered=?", (identity, identity))
        r = row.fetchone()
        return self.get(r[0]) if r else None

    def all(self) -> list[Trip]:
        return [t for (n,) in self.db.execute("SELECT name FROM roundtrips ORDER BY name") if (t := self.get(n))]

    def save(self, t: Trip) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO roundtrips(name, direction, phase, active, recovered, trips, data) "
            "VALUES (?,?,?,?,?,?,?)",
            (t.name, t.direction.value, t.phase.value, t.active, t.recovered, t.trips, json.dumps(t.data)),
        )

    # -- history ------------------------------------------------------------------------------------
    def begin(self, name: str, phase: Phase, wire_bytes: int, detail: str = "") -> None:
        """A phase starts: the one still open ends now (with the bytes shipped during it)."""
        self.end(name, wire_bytes)
        self.db.execute("INSERT INTO roundtrip_events(name, phase, started, bytes_start, detail) VALUES (?,?,?,?,?)",
                        (name, phase.value, time.time(), wire_bytes, detail))

    def end(self, name: str, wire_bytes: int, detail: str | None = None) -> None:
        sets = "ended=?, bytes=MAX(?-bytes_start, 0)" + (", detail=?" if detail is not None else "")
        args: tuple[Any, ...] = (time.time(), wire_bytes) + ((detail,) if detail is not None else ())
        self.db.execute(f"UPDATE roundtrip_events SET {sets} WHERE name=? AND ended IS NULL", (*args, name))

    def history(self, name: str, newest: int | None = None) -> list[dict[str, Any]]:
        """The phases of a round trip, oldest first; only the `newest` ones when given (status shows a few
        round trips, not every one a machine ever made: the reply stays small however long it lives)."""
        rows = self.db.execute("SELECT phase, started, ended, bytes, detail FROM roundtrip_events WHERE name=? "
                               "ORDER BY id DESC LIMIT ?", (name, -1 if newest is None else newest)).fetchall()
        return [dict(zip(("phase", "started", "ended", "bytes", "detail"), r, strict=True)) for r in reversed(rows)]

    # -- retired identities ---------------------------------------------------------------------------
    def retire(self, identity: str, reason: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO retired(name, reason, at) VALUES (?,?,?)",
                        (identity, reason, time.time()))

    def reinstate(self, identity: str) -> None:
        self.db.execute("DELETE FROM retired WHERE name=?", (identity,))

    def retired(self, identity: str) -> str | None:
        """Why this identity is refused at the door (None: it is not retired)."""
        row = self.db.execute("SELECT reason FROM retired WHERE name=?", (identity,)).fetchone()
        return row[0] if row else None
