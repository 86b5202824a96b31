"""The registry keeps each disk's replication state in proto.states' words, moves it only along the
table (one log line per move), and reads a registry written before the two axes existed."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from standby.processserver.registry import OLD_STATE_WORDS, Registry
from standby.proto.states import IllegalTransition, Replication

R = Replication


def test_a_disk_moves_along_the_table_with_one_line_per_move(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry(tmp_path / "registry.sqlite")
    row = reg.add_disk("web01", "sda", "00000000-0000-4000-8000-000000000001", "/dev/sda", 1 << 20)
    assert row.replication is R.OFF
    with caplog.at_level(logging.INFO, logger="standby.ps"):
        row = reg.move(row, R.INITIAL, "protected to mt1:/r/a.vmdk (vmdk)", mt="mt1")
        row = reg.move(row, R.DELTA, "initial replication complete")
        row = reg.move(row, R.DELTA, "initial replication complete")  # no move: no line
        row = reg.move(row, R.RESYNC, "tracking lost")
    assert (row.replication, row.mt) == (R.RESYNC, "mt1")
    assert [r.getMessage() for r in caplog.records] == [
        "disk web01/sda: replication Off -> Initial (reason: protected to mt1:/r/a.vmdk (vmdk))",
        "disk web01/sda: replication Initial -> Delta, disk Inconsistent -> UpToDate "
        "(reason: initial replication complete)",
        "disk web01/sda: replication Delta -> Resync, disk UpToDate -> Inconsistent (reason: tracking lost)",
    ]
    row = reg.move(row, R.FAILED_OVER, "failed over to point 9", paused=1)
    with pytest.raises(IllegalTransition):
        reg.move(row, R.DELTA, "resync complete", resync_done_at=1.0)
    again = reg.disk(row.id)
    assert again is not None
    assert (again.replication, again.paused, again.resync_done_at) == (R.FAILED_OVER, 1, None)  # nothing changed


def test_a_registry_of_the_old_words_is_read_in_the_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE disks (id INTEGER PRIMARY KEY AUTOINCREMENT, machine TEXT NOT NULL, name TEXT NOT NULL,
        uid TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'unprotected',
        generation INTEGER NOT NULL DEFAULT 1, received_seq INTEGER NOT NULL DEFAULT 0,
        applied_seq INTEGER NOT NULL DEFAULT 0, cursor INTEGER NOT NULL DEFAULT 0,
        applied_cursor INTEGER NOT NULL DEFAULT 0, mt TEXT, replica_path TEXT, replica_format TEXT,
        wrapped_key BLOB, bytes_logical INTEGER NOT NULL DEFAULT 0, bytes_data INTEGER NOT NULL DEFAULT 0,
        bytes_wire INTEGER NOT NULL DEFAULT 0, bytes_applied INTEGER NOT NULL DEFAULT 0, protected_at REAL,
        synced_at REAL, error TEXT, UNIQUE (machine, name));"""
    )
    for i, word in enumerate(OLD_STATE_WORDS):
        db.execute("INSERT INTO disks (machine, name, uid, path, size, state) VALUES ('m', ?, 'u', '/dev/x', 512, ?)",
                   (f"d{i}", word))
    db.commit()
    db.close()
    reg = Registry(path)
    assert {d.name: d.replication for d in reg.disks()} == {
        "d0": R.OFF, "d1": R.INITIAL, "d2": R.INITIAL, "d3": R.RESYNC, "d4": R.DELTA, "d5": R.FAILED_OVER,
        "d6": R.COMMITTED,
    }
    reg.close()
    assert {d.name for d in Registry(path).disks() if d.replication is R.DELTA} == {"d4"}  # opened twice: same


def test_old_words_left_by_a_crash_after_the_column_rename_are_mapped_at_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    reg = Registry(path)
    row = reg.add_disk("m", "sda", "u", "/dev/x", 512)
    reg.db.execute("UPDATE disks SET replication='up-to-date' WHERE id=?", (row.id,))  # as the crash left it
    reg.close()
    again = Registry(path).disk(row.id)
    assert again is not None and again.replication is R.DELTA


def test_what_a_machine_says_of_itself_is_stored_and_listed(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.sqlite")
    reg.add_machine("web01", "agent", 7, b"PEM")
    reg.add_machine("mt01", "mt", 8, b"PEM")
    m = reg.machine("web01")
    assert m is not None and (m["system_uuid"], m["hostname"], m["reported_at"]) == (None, None, None)  # not yet
    reg.set_about("web01", "4213a1b2-5c6d-7e8f-9a0b-1c2d3e4f5a6b", "web01.example.net")
    reg.set_about("mt01", "", "mt01")  # said, but its firmware reports none
    m = reg.machine("web01")
    assert m is not None and m["system_uuid"] == "4213a1b2-5c6d-7e8f-9a0b-1c2d3e4f5a6b"
    assert m["hostname"] == "web01.example.net" and m["reported_at"] > 0 and m["cert_pem"] == "PEM"
    listed = {x["name"]: x for x in reg.machines()}
    assert listed["mt01"]["system_uuid"] == "" and listed["mt01"]["hostname"] == "mt01"
    assert listed["web01"]["system_uuid"] == m["system_uuid"] and "cert_pem" not in listed["web01"]
    reg.close()
    again = Registry(tmp_path / "registry.sqlite").machine("web01")
    assert again is not None and again["hostname"] == "web01.example.net"  # durable


def test_an_older_machines_table_gets_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE machines (name TEXT PRIMARY KEY, role TEXT NOT NULL, serial TEXT NOT NULL,
        cert_pem TEXT NOT NULL, enrolled_at REAL NOT NULL);
        INSERT INTO machines VALUES ('web01', 'agent', '7', 'PEM', 1780000000.0);"""
    )
    db.commit()
    db.close()
    reg = Registry(path)
    assert reg.machines() == [{"name": "web01", "role": "agent", "enrolled_at": 1780000000.0, "system_uuid": None,
                               "hostname": None, "reported_at": None}]
    reg.set_about("web01", "", "web01")
    reg.close()
    m = Registry(path).machine("web01")  # opened twice: the columns are added once
    assert m is not None and (m["system_uuid"], m["hostname"], m["serial"]) == ("", "web01", "7")
