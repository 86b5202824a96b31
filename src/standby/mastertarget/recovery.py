"""Going back to a recovery point: failover in place (with the way forward kept until commit) and test
failover into a separate copy. Runs in worker threads; the daemon serialises per disk.

**Failover** rolls the replica back in place: the undo records of every group newer than the point,
newest first. Before a group's old contents overwrite the replica, what they overwrite is saved as a
REDO record (synced) — so the operator can move to a *newer* point again (REDO records replayed oldest
first) until `commit` discards everything newer. `failover.json` says where the replica is (`at`) and
where it is going (`target`); a crash in between resumes the move at start-up: replaying undo records
(REDO already saved, never captured twice) and replaying redo records are both idempotent.

**Test failover** copies the replica while replication goes on, then applies every undo record newer
than the point, newest first, *including those written during the copy*: any block the copy caught
half-way through replication was written after its group's undo record was synced, so undoing every
group newer than the point gives that block's contents at the point, whatever version was copied.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from standby.plumbing.durable import load_json, save_json, write_synced

from .history import DiskJournal, Group, apply_undo
from .journal import REDO_TYPE, JournalError, UndoRecord, decode_undo, encode_undo, redo_opener, redo_sealer, scan
from .replicas import Replica, create_replica
from .replicas.raw import FileReplica

log = logging.getLogger("standby.mt.recovery")
COPY_CHUNK = 8 << 20

Writer = Callable[[int, bytes | None, int], None]


def replica_writer(replica: Replica) -> Writer:
    def write(offset: int, data: bytes | None, length: int) -> None:
        if data is None:
            replica.write_zeroes(offset, length)
        else:
            replica.write(offset, data)

    return write


@dataclass
class FailoverState:
    latest: int  # the newest state the replica held when the failover began
    at: int  # the state it holds now (a group boundary)
    target: int  # where it is going (== at once settled)
    point_time: float = 0.0
    started_at: float = 0.0
    committed: bool = False

    @classmethod
    def load(cls, directory: Path) -> FailoverState | None:
        p = directory / "failover.json"
        return cls(**load_json(p)) if p.exists() else None

    def save(self, directory: Path) -> None:
        save_json(directory / "failover.json", asdict(self), 0o600)


class RedoLog:
    """REDO records of one disk's failover: what rolling back overwrote, by group (its first sequence)."""

    def __init__(self, journal: DiskJournal) -> None:
        self.path = journal.dir / "redo.jrn"
        self.disk = journal.disk
        self.sealer = redo_sealer(journal.key, journal.uid)
        self.opener = redo_opener(journal.key, journal.uid)
        self.index: dict[int, tuple[int, int]] = {}
        if self.path.exists():
            data = self.path.read_bytes()
            s = scan(data)
            if s.problem:
                raise JournalError(f"redo log {self.path} is damaged: {s.problem}")
            if s.torn:
                os.truncate(self.path, s.good_end)
            for n, (ftype, _, seq, _) in enumerate(s.records):
                end = s.offsets[n + 1] if n + 1 < len(s.offsets) else s.good_end
                if ftype == REDO_TYPE:
                    self.index[seq] = (s.offsets[n], end - s.offsets[n])

    def has(self, first: int) -> bool:
        return first in self.index

    def append(self, first: int, generation: int, pieces: list[tuple[int, bytes]]) -> None:
        rec = encode_undo(self.disk, first, generation, pieces, self.sealer, REDO_TYPE)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            at = os.fstat(fd).st_size
            write_synced(fd, rec)
        finally:
            os.close(fd)
        self.index[first] = (at, len(rec))

    def read(self, first: int) -> UndoRecord:
        at, size = self.index[first]
        with open(self.path, "rb") as f:
            f.seek(at)
            data = f.read(size)
        s = scan(data)
        if s.problem or s.torn or len(s.records) != 1:
            raise JournalError(f"redo log {self.path}: record of {first} is damaged")
        _, disk, seq, payload = s.records[0]
        return decode_undo(disk, seq, payload, self.opener)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self.index.clear()


def move(journal: DiskJournal, replica: Replica, fo: FailoverState, target: int) -> int:
    """Move the replica from `fo.at` to the state after group `target` (<= fo.latest); returns the bytes
    written. `fo` is saved with the target first and with `at` once the replica is synced."""
    if target > fo.latest:
        raise JournalError(f"sequence {target} is newer than the replica's newest state {fo.latest}")
    redo = RedoLog(journal)
    fo.target = target
    fo.save(journal.dir)
    write = replica_writer(replica)
    n = 0
    groups = list(journal.groups)
    if target < fo.at:
        for g in reversed([g for g in groups if target < g.last <= fo.at]):
            rec = journal.read_undo(g)
            if rec is None:
                continue
            if not redo.has(g.first):
                now = [(off, replica.read(off, length)) for (off, _), length in zip(rec.extents, rec.lengths,
                                                                                   strict=True)]
                redo.append(g.first, rec.generation, now)
            n += apply_undo(rec, write)
    else:
        for g in [g for g in groups if fo.at < g.last <= target]:
            if g.undo_at < 0:
                continue
            if not redo.has(g.first):
                raise JournalError(f"no redo record for sequence {g.first}: cannot move forward past it")
            n += apply_undo(redo.read(g.first), write)
    replica.sync()
    fo.at = target
    fo.save(journal.dir)
    return n


def commit(journal: DiskJournal, fo: FailoverState) -> None:
    """Make the failover final: history newer than the point is discarded, the way forward too."""
    journal.truncate_after(fo.at)
    RedoLog(journal).remove()
    fo.committed = True
    fo.latest = fo.target = fo.at
    fo.save(journal.dir)


# -- test failover ----------------------------------------------------------------------------------
def copy_replica(src: Replica, kind: str, dest: Path, read_locked: Callable[[int, int], bytes]) -> Replica:
    """A new replica at `dest` with `src`'s contents as they are now (replication may be writing
    meanwhile: the undo records fix that up). Flat files copy only their data ranges in the kernel;
    other kinds copy through `read_locked` (which serialises with applying), skipping zeros."""
    dest_kind = "raw" if kind == "device" else kind
    out = create_replica(dest_kind, dest, src.size)
    try:
        if isinstance(src, FileReplica) and isinstance(out, FileReplica):
            _copy_data_ranges(src.data_path, out.data_path, src.size)
        else:
            for off in range(0, src.size, COPY_CHUNK):
                data = read_locked(off, min(COPY_CHUNK, src.size - off))
                if data.count(0) != len(data):
                    out.write(off, data)
        out.sync()
    except BaseException:
        out.close()
        for f in {dest, *out.data_files()}:
            f.unlink(missing_ok=True)
        raise
    return out


def _copy_data_ranges(src: Path, dest: Path, size: int) -> None:
    """Copy the allocated ranges of `src` into `dest` (same offsets) with copy_file_range."""
    fin = os.open(src, os.O_RDONLY)
    fout = os.open(dest, os.O_WRONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole from here
                raise
            end = min(os.lseek(fin, start, os.SEEK_HOLE), size)
            off = start
            while off < end:
                n = os.copy_file_range(fin, fout, min(end - off, 1 << 30), off, off)
                if n <= 0:
                    raise OSError(errno.EIO, f"copy_file_range stopped at {off}")
                off += n
            pos = end
    finally:
        os.close(fin)
        os.close(fout)


def undo_into(journal: DiskJournal, groups: list[Group], out: Replica) -> int:
    """Apply the undo records of `groups` (all newer than the point) to `out`, newest first."""
    write = replica_writer(out)
    n = 0
    for g in reversed(groups):
        rec = journal.read_undo(g)
        if rec is not None:
            n += apply_undo(rec, write)
    out.sync()
    return n


def test_failover_path(replica_path: str, kind: str, disk: int, directory: Path | None) -> Path:
    """Where a disk's test-failover copy goes: beside the replica (or in `directory`), named -test."""
    p = Path(replica_path)
    base = directory if directory is not None else p.parent
    if kind == "device":
        return base / f"test-failover-disk{disk}.img"
    return base / f"{p.stem}-test{p.suffix}"


def elapsed(t0: float) -> float:
    return round(time.monotonic() - t0, 3)
