"""mastertarget.release: a released disk's state goes and it is never opened again in this run; its
replica and retention journal are kept (the journal set aside under its own name) unless `delete`, which
removes every file of the replica (a flat VMDK's extent too) but never a block device."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from standby.mastertarget.diskstate import ReplicaState
from standby.mastertarget.release import release, replica_files
from standby.mastertarget.replicas import create_replica
from standby.mastertarget.worker import DiskWorker

UID = "00000000-0000-4000-8000-000000000001"
SIZE = 1 << 20


@dataclass
class FakeMT:
    disks_dir: Path
    retention_dir: Path
    workers: dict[int, DiskWorker] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    retry_at: dict[int, float] = field(default_factory=dict)
    released: set[int] = field(default_factory=set)


def make(tmp_path: Path, fmt: str = "vmdk") -> tuple[FakeMT, ReplicaState]:
    mt = FakeMT(tmp_path / "disks", tmp_path / "retention")
    mt.disks_dir.mkdir()
    (mt.retention_dir / UID).mkdir(parents=True)
    (mt.retention_dir / UID / "seg-1.jrn").write_bytes(b"j")
    path = tmp_path / ("web01-sda.vmdk" if fmt.startswith("vmdk") else "web01-sda.img")
    create_replica(fmt, path, SIZE).close()
    st = ReplicaState(7, "web01", "sda", UID, SIZE, fmt, str(path))
    st.save(mt.disks_dir)
    mt.failed[7] = "old trouble"
    return mt, st


def test_release_keeps_replica_and_sets_the_journal_aside(tmp_path: Path) -> None:
    mt, st = make(tmp_path)
    res = asyncio.run(release(mt, [7]))
    kept = mt.retention_dir / f"{UID}.unprotected-7"
    assert res == {"disks": [{"disk": 7, "replica": st.path, "journal": str(kept), "removed": []}]}
    assert Path(st.path).exists() and (kept / "seg-1.jrn").exists() and not (mt.retention_dir / UID).exists()
    assert ReplicaState.load(mt.disks_dir, 7) is None
    assert mt.released == {7} and 7 not in mt.failed


def test_release_delete_removes_every_file(tmp_path: Path) -> None:
    mt, st = make(tmp_path)
    files = replica_files(st)
    assert len(files) == 2 and all(f.exists() for f in files)  # descriptor and flat extent
    res = asyncio.run(release(mt, [7], delete=True))
    assert set(res["disks"][0]["removed"]) == {*map(str, files), str(mt.retention_dir / UID)}
    assert res["disks"][0]["journal"] is None
    assert not any(f.exists() for f in files) and not (mt.retention_dir / UID).exists()


def test_release_of_an_unknown_disk_and_of_a_device(tmp_path: Path) -> None:
    mt, st = make(tmp_path, "raw")
    assert asyncio.run(release(mt, [99])) == {"disks": [{"disk": 99, "replica": None, "removed": []}]}
    assert replica_files(ReplicaState(8, "web01", "sdb", UID, SIZE, "device", "/dev/null")) == []
    assert replica_files(st) == [Path(st.path)]
