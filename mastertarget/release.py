"""Releasing disks that are no longer protected (`standby unprotect`): the process server's `release`.

Applying stops and the disk's state file goes, so no later assignment brings it back by itself. The
replica and its retention journal stay where they are — an operator who unprotects a machine has not
said its replicas are worthless — unless the request says `delete` (the CLI's explicit
`--delete-replicas`); the journal is renamed `UID.unprotected-DISK`, so protecting the disk again starts a
journal of its own. A block-device replica is never deleted: the device is the operator's, only its
contents are ours.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

from standby.proto.enums import ReplicaFormat

from .diskstate import ReplicaState
from .replicas import ReplicaError, open_replica
from .worker import DiskWorker

log = logging.getLogger("standby.mt")


class Releaser(Protocol):
    """What releasing needs of the daemon (daemon.MasterTarget)."""

    workers: dict[int, DiskWorker]
    failed: dict[int, str]
    retry_at: dict[int, float]
    released: set[int]

    @property
    def disks_dir(self) -> Path: ...

    @property
    def retention_dir(self) -> Path: ...


async def stop_worker(w: DiskWorker) -> None:
    """Stop applying for one disk (a write under way finishes first) and close its replica and journal."""
    if w.task is not None:
        w.task.cancel()
        await asyncio.gather(w.task, return_exceptions=True)
    if w.inflight is not None:
        await asyncio.gather(w.inflight, return_exceptions=True)
    for what, close in ((w.state.path, w.applier.replica.close), (w.journal.dir, w.journal.close)):
        try:
            close()
        except OSError as exc:
            log.warning("closing %s: %s", what, exc)


def replica_files(st: ReplicaState) -> list[Path]:
    """The files a replica is made of (a flat VMDK's descriptor and extent); none for a block device."""
    if st.format == ReplicaFormat.DEVICE:
        return []
    path = Path(st.path)
    try:
        replica = open_replica(st.format, path, st.size)
    except (ReplicaError, OSError):
        return [path]
    try:
        return list(dict.fromkeys([path, *replica.data_files()]))
    finally:
        replica.close()


def _delete(st: ReplicaState, journal_dir: Path) -> list[str]:
    removed = []
    for f in replica_files(st):
        if f.exists():
            f.unlink()
            removed.append(str(f))
    if journal_dir.is_dir():
        shutil.rmtree(journal_dir)
        removed.append(str(journal_dir))
    return removed


def _set_aside(journal: Path, disk: int) -> Path | None:
    """Keep the journal under a name of its own: a journal directory is named by the disk's uid, and the
    same disk protected again must start a new journal, not continue this one's sequence."""
    if not journal.is_dir():
        return None
    kept = journal.with_name(f"{journal.name}.unprotected-{disk}")
    journal.rename(kept)
    return kept


async def release(mt: Releaser, disks: list[int], delete: bool = False) -> dict[str, Any]:
    out = []
    for disk in disks:
        mt.released.add(disk)
        w = mt.workers.pop(disk, None)
        if w is not None:
            await stop_worker(w)
        mt.failed.pop(disk, None)
        mt.retry_at.pop(disk, None)
        st = w.state if w is not None else ReplicaState.load(mt.disks_dir, disk)
        if st is None:
            out.append({"disk": disk, "replica": None, "removed": []})
            continue
        (mt.disks_dir / f"{disk}.json").unlink(missing_ok=True)
        journal: Path | None = mt.retention_dir / st.uid
        if delete:
            removed, journal = await asyncio.to_thread(_delete, st, journal), None
        else:
            removed, journal = [], _set_aside(journal, disk)
        log.warning("disk %s/%s: no longer protected; replica %s and its retention journal %s", st.machine,
                    st.name, st.path, "deleted" if delete else f"kept ({journal})")
        out.append({"disk": disk, "replica": st.path, "journal": str(journal) if journal else None,
                    "removed": removed})
    return {"disks": out}
