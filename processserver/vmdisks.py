"""Replica disks that live in vSphere: the record of where each one is, and the configuration service's
steps that move them (processserver.vmsteps runs those steps).

When the master target is a vCenter VM (processserver.vmlocate), a protected disk's replica is a VMDK on
a datastore of the master target's host, attached to the master-target VM and written by the master
target as a `device` replica (the by-id link of the disk inside its guest). This store says, per agent
identity and disk name, which file it is, its disk UUID, and which VM holds it now: the master target's
while it replicates; the recovered VM's after commit. Reprotect to the original location attaches the
original VM's own disks to the master target at the original site; their `home` (the original VM and the
controller slot) is kept so that the commit of the failback puts each one back where it was.

`vm_sources` records, for a protected machine that is itself a VM, which VM disk each standby disk is
(agent disks by name paired with the VM's disks by controller and unit, sizes checked): what reprotect to
the original location and failover to the original VM need, even when the protected site's vCenter is
slow or gone later."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS vm_disks (
    identity TEXT NOT NULL,
    disk TEXT NOT NULL,
    vcenter TEXT NOT NULL,
    file TEXT NOT NULL,
    uuid TEXT NOT NULL,
    holder TEXT NOT NULL,
    at_mt INTEGER NOT NULL,
    created INTEGER NOT NULL,
    home TEXT,
    PRIMARY KEY (identity, disk)
);
CREATE TABLE IF NOT EXISTS vm_sources (
    identity TEXT NOT NULL,
    disk TEXT NOT NULL,
    vcenter TEXT NOT NULL,
    vm TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    file TEXT NOT NULL,
    uuid TEXT NOT NULL,
    controller_key INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    PRIMARY KEY (identity, disk)
);
CREATE TABLE IF NOT EXISTS vm_shapes (identity TEXT PRIMARY KEY, vcenter TEXT NOT NULL, shape TEXT NOT NULL);
"""


@dataclass(frozen=True)
class VmDisk:
    identity: str
    disk: str
    vcenter: str
    file: str  # "[datastore] folder/name.vmdk"
    uuid: str
    holder: str  # the instance UUID of the VM the file is attached to now ("" none)
    at_mt: bool  # that VM is the master target's: the replica is being written
    created: bool  # made by standby (protect) rather than an original VM's own disk (reprotect)
    home: dict[str, Any] | None  # {"vm", "vm_name", "controller_key", "unit"}: where it goes back at failback


@dataclass(frozen=True)
class VmSource:
    identity: str
    disk: str
    vcenter: str
    vm: str  # instance UUID
    vm_name: str
    file: str
    uuid: str
    controller_key: int
    unit: int


class VmDiskStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def put(self, d: VmDisk) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO vm_disks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (d.identity, d.disk, d.vcenter, d.file, d.uuid, d.holder, int(d.at_mt), int(d.created),
                 json.dumps(d.home) if d.home is not None else None),
            )

    def disks(self, identity: str) -> list[VmDisk]:
        rows = self.db.execute("SELECT * FROM vm_disks WHERE identity = ? ORDER BY disk", (identity,)).fetchall()
        return [VmDisk(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), bool(r[7]), json.loads(r[8]) if r[8] else None)
                for r in rows]

    def move(self, identity: str, disk: str, holder: str, at_mt: bool) -> None:
        with self.db:
            self.db.execute("UPDATE vm_disks SET holder = ?, at_mt = ? WHERE identity = ? AND disk = ?",
                            (holder, int(at_mt), identity, disk))

    def drop(self, identity: str, disks: list[str] | None = None) -> None:
        with self.db:
            if disks is None:
                self.db.execute("DELETE FROM vm_disks WHERE identity = ?", (identity,))
            else:
                self.db.executemany("DELETE FROM vm_disks WHERE identity = ? AND disk = ?",
                                    [(identity, d) for d in disks])

    def left_mt(self, identity: str, disk: str) -> bool:
        """Has this disk's replica (a VMDK) left the master-target VM (failover committed: the recovered VM
        has it)? The master target must then not be given it again."""
        row = self.db.execute("SELECT at_mt FROM vm_disks WHERE identity = ? AND disk = ?", (identity, disk)).fetchone()
        return row is not None and not row[0]

    def vcenters(self) -> set[str]:
        """The vCenters that hold replica VMDKs or protected VMs standby keeps track of."""
        rows = self.db.execute("SELECT vcenter FROM vm_disks UNION SELECT vcenter FROM vm_sources "
                               "UNION SELECT vcenter FROM vm_shapes").fetchall()
        return {r[0] for r in rows}

    def put_sources(self, sources: list[VmSource]) -> None:
        with self.db:
            for s in sources:
                self.db.execute("INSERT OR REPLACE INTO vm_sources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (s.identity, s.disk, s.vcenter, s.vm, s.vm_name, s.file, s.uuid, s.controller_key,
                                 s.unit))

    def put_shape(self, identity: str, vcenter: str, shape: dict[str, Any]) -> None:
        """The protected VM's shape (vsphere.shape.VmShape as JSON), for the VM a failover makes."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO vm_shapes VALUES (?, ?, ?)", (identity, vcenter, json.dumps(shape)))

    def shape(self, identity: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT shape FROM vm_shapes WHERE identity = ?", (identity,)).fetchone()
        return json.loads(row[0]) if row else None

    def sources(self, identity: str) -> list[VmSource]:
        rows = self.db.execute("SELECT * FROM vm_sources WHERE identity = ? ORDER BY disk", (identity,)).fetchall()
        return [VmSource(*r) for r in rows]
