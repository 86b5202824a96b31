"""The operator's requests (`standby.mastertarget.operations`) through the narrow interface of
`standby.mastertarget.disk` alone — a real replica and retention journal, no daemon: the seam the
operations depend on is all they need."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from standby.mastertarget import operations
from standby.mastertarget.disk import NotOpen, RetentionMarks
from standby.mastertarget.diskstate import ReplicaState
from standby.mastertarget.journal import DiskJournal
from standby.mastertarget.replicas import Replica
from standby.mastertarget.retention import Policy
from standby.plumbing.errors import RequestFailed
from tests.mastertarget.test_journal import DISK, GEN, Sim


@dataclass
class FakeDisk:
    state: ReplicaState
    journal: DiskJournal
    replica: Replica
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    halted: bool = False
    pins: int = 0
    failover_problem: str | None = None
    retention: RetentionMarks = field(default_factory=RetentionMarks)

    def halt(self) -> None:
        self.halted = True


@dataclass
class FakeDisks:
    disks_dir: Path
    open: dict[int, FakeDisk]
    policy: Policy = field(default_factory=Policy)

    def disk(self, disk: int) -> FakeDisk:
        if disk not in self.open:
            raise NotOpen(f"disk {disk} is not open on this master target: its replica is gone")
        return self.open[disk]


def _setup(tmp_path: Path) -> tuple[Sim, FakeDisks, FakeDisk]:
    sim = Sim(tmp_path / "disk", 11)
    for _ in range(6):
        sim.group(kind="point")
    last = sim.applied[-1].last
    st = ReplicaState(DISK, "m", "d", "uid", sim.size, "raw", str(sim.replica.path), last, GEN, "UpToDate")
    d = FakeDisk(st, sim.journal, sim.replica)
    (tmp_path / "disks").mkdir()
    return sim, FakeDisks(tmp_path / "disks", {DISK: d}), d


def test_failover_and_commit_through_the_narrow_interface(tmp_path: Path) -> None:
    sim, disks, d = _setup(tmp_path)
    target = sim.applied[2].last
    got = asyncio.run(operations.HANDLERS["failover"](disks, disk=DISK, sequence=target))
    assert got["sequence"] == target and d.halted and d.state.state == "FailedOver"
    assert sim.read_replica() == bytes(sim.image_at(target))
    assert ReplicaState.load(disks.disks_dir, DISK) == d.state  # saved where the interface says
    done = asyncio.run(operations.HANDLERS["failover_commit"](disks, disk=DISK))
    assert done["sequence"] == target and d.state.applied_seq == target
    assert [g.last for g in sim.journal.groups] == [a.last for a in sim.applied[:3]]
    sim.close()


def test_points_lists_the_journal_s_points(tmp_path: Path) -> None:
    sim, disks, _ = _setup(tmp_path)
    got = asyncio.run(operations.HANDLERS["points"](disks, disk=DISK))
    assert [p["sequence"] for p in got["points"]] == [a.last for a in sim.applied]
    assert got["failover"] is None
    sim.close()


def test_a_disk_that_is_not_open_or_a_point_that_is_not_one_is_a_clear_error(tmp_path: Path) -> None:
    sim, disks, _ = _setup(tmp_path)
    with pytest.raises(RequestFailed, match="its replica is gone") as exc:
        asyncio.run(operations.HANDLERS["failover"](disks, disk=DISK + 1, sequence=1))
    assert exc.value.code == "unreachable"
    with pytest.raises(RequestFailed) as exc:
        asyncio.run(operations.HANDLERS["failover"](disks, disk=DISK, sequence=sim.next_seq + 5))
    assert exc.value.code == "unknown-point"
    sim.close()
