"""Independent-enough judge of a master target's retention journal for tests: materialise recovery
points in memory from the replica image and the journal, newest first, and judge each with the
write-order records (tests/writeorder.py).

The journal is read from a *copy* of its directory (opening it may cut a torn tail: the master target
itself must do that, not the test). The disk's data key comes from where the master target gets it:
the wrapped key in the process server's registry, unwrapped with the master target's identity.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from standby.mastertarget.journal import DiskJournal, apply_undo
from standby.plumbing.identity import Identity
from standby.proto.keywrap import unwrap_key


def disk_key(ps_dir: Path, mt_dir: Path, disk: int) -> tuple[bytes, uuid.UUID]:
    db = sqlite3.connect(ps_dir / "registry.sqlite")
    try:
        wrapped, uid = db.execute("SELECT wrapped_key, uid FROM disks WHERE id = ?", (disk,)).fetchone()
    finally:
        db.close()
    u = uuid.UUID(uid)
    ident = Identity.load(mt_dir / "identity", command="test")
    return unwrap_key(wrapped, ident.key_pem, b"disk:" + u.bytes), u


def walk_points(
    retention_dir: Path, disk: int, key: bytes, uid: uuid.UUID, image: bytearray, want: set[int] | None = None,
    oldest: int = 0,
) -> Iterator[tuple[int, bytearray]]:
    """Yield (point sequence, the image at that point) newest first, down to `oldest`, for the points in
    `want` (all if None). `image` must hold the replica's newest applied state; it is modified."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "j"
        shutil.copytree(retention_dir / str(uid), copy)
        journal = DiskJournal(copy, disk, key, uid.bytes)
        if journal.open() is not None:
            raise AssertionError("the journal ends with an open group while nothing is applied")

        def write(offset: int, data: bytes | None, length: int) -> None:
            image[offset : offset + length] = bytes(length) if data is None else data

        for g in reversed(list(journal.groups)):
            if g.last < oldest:
                break
            if g.is_point and (want is None or g.last in want):
                yield g.last, image
            rec = journal.read_undo(g)
            if rec is not None:
                apply_undo(rec, write)
        journal.close()
