"""The file mechanics of an append-only segment log, shared by the process server's cache
(processserver.cache) and the master target's retention journal (mastertarget.journal).

A log is a directory of numbered segment files, ``<dir>/seg-<first sequence, 20 digits><suffix>``,
listed in order at start-up. Records are appended to the newest segment (the *tail*) only; a new
segment is started at a size limit the owner decides. What a record is, and when a segment may go
(applied, pruned), stays with the owner: this module knows files, offsets and fsync, nothing else.

Durability (promises 1 and 5): `append` fsyncs the tail before it returns (unless the owner asks to
sync several appends at once with `sync`); starting a segment fsyncs the directory, so the new file
survives a crash; a cut (a torn tail, a rolled-back group) is fsynced; an append that fails half-way
is cut back to where it began, so a later append never buries a partial record inside the segment.

The torn-tail rule (pure, no I/O, next to the frame codec: `standby.proto.frames.classify_tail`; the
owners read a segment and ask it). Since appends go to the newest segment only and are fsynced before
anyone relies on them, a crash mid-append tears at most the last record of the newest segment. So what
follows a segment's last good record is

- *clean* if nothing follows;
- a *torn tail* — cut it off, durably, before appending — if it is in the newest segment and is fewer
  bytes than a record header, or a header that decodes and announces a record reaching (or passing) the
  end of the file (a record ending exactly at the end of the file with a bad payload counts: the file
  was extended before its blocks were written); and, in the cache, only if that record's sequence was
  never acknowledged (above the registry's received sequence: a damaged acknowledged record is damage);
- *damage* otherwise — a header that does not decode, a bad record with bytes after it, a torn record in
  an older segment, a torn acknowledged record. Damage is never cut off or skipped: the journal refuses
  to start; the cache keeps the intact records before it and sets the rest aside for a resync.

Rotation: the owner decides when a segment is full (the cache at a size limit; the journal at a size
limit but only at a group boundary, so a group's UNDO parts and MARKER share a segment) and calls `start`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .durable import drop_cached, fsync_dir, truncate_synced

PREFIX = "seg-"


class SegmentLog:
    """Numbered segment files in one directory and the open tail. Not thread-safe: the owner locks."""

    def __init__(self, directory: Path, suffix: str, drop_synced: bool = True) -> None:
        """`drop_synced`: forget a record's cached pages once it is fsynced (durable.drop_cached), for a
        log read only after a restart or a failover; an owner that reads its records back soon after
        writing them (the process server's cache, forwarding to the master target) keeps them instead."""
        self.dir = Path(directory)
        self.suffix = suffix
        self.drop_synced = drop_synced
        self.tail: Path | None = None  # the segment appends go to
        self.size = 0  # the tail's size while it is open
        self._fd: int | None = None

    # -- naming and listing -------------------------------------------------------------------------
    def path(self, first: int) -> Path:
        return self.dir / f"{PREFIX}{first:020d}{self.suffix}"

    def paths(self) -> list[Path]:
        """Every segment, oldest first (the names sort by their first sequence)."""
        return sorted(self.dir.glob(f"{PREFIX}*{self.suffix}"))

    @staticmethod
    def first_of(path: Path) -> int:
        """The first sequence of a segment, from its name; 0 if its name holds none."""
        try:
            return int(path.name.removeprefix(PREFIX).removesuffix(path.suffix))
        except ValueError:
            return 0

    # -- the tail -----------------------------------------------------------------------------------
    def start(self, first: int, exclusive: bool = False) -> Path:
        """Start a new segment named after `first` and make it the tail: created (with `exclusive`, it
        must not exist yet; without, an existing file of that name is appended to), then the directory
        fsynced so the file itself survives a crash."""
        self.close()
        path = self.path(first)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_EXCL if exclusive else 0)
        self._fd = os.open(path, flags, 0o600)
        self.tail = path
        self.size = os.fstat(self._fd).st_size
        fsync_dir(self.dir)
        return path

    def resume(self, path: Path) -> None:
        """Make an existing segment the tail (opened at the next append, at its size then)."""
        if path != self.tail:
            self.close()
            self.tail = path

    def append(self, chunks: Sequence[bytes | bytearray | memoryview], sync: bool = True) -> int:
        """Append `chunks` back to back to the tail and, with `sync`, fsync it; returns the offset of the
        first. On an error (ENOSPC, EIO) the tail is cut back to where it was and the error raised."""
        if self.tail is None:
            raise ValueError("no segment to append to")
        if self._fd is None:
            self._fd = os.open(self.tail, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.size = os.fstat(self._fd).st_size
        start = pos = self.size
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                pos += len(view)
                while view:
                    view = view[os.write(self._fd, view) :]
            if sync:
                os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, start)
            raise
        self.size = pos
        if sync and self.drop_synced:
            drop_cached(self._fd, start, pos - start)
        return start

    def sync(self) -> None:
        """fsync the tail (after appends made without `sync`)."""
        if self._fd is not None:
            os.fsync(self._fd)
            if self.drop_synced:
                drop_cached(self._fd)

    def close(self) -> None:
        """Close the tail's file; the tail stays the tail (reopened at the next append)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def forget_tail(self) -> None:
        """Close the tail and have none: the next append needs `start`."""
        self.close()
        self.tail, self.size = None, 0

    # -- cutting and deleting -----------------------------------------------------------------------
    def cut(self, path: Path, size: int) -> None:
        """Cut segment `path` to `size` bytes, durably (a torn tail, a rolled-back group, a damaged rest)."""
        truncate_synced(path, size)
        if path == self.tail:
            self.size = size

    def delete(self, paths: Sequence[Path]) -> int:
        """Delete segments (released, pruned); the tail among them is forgotten. Returns the bytes they
        held (a segment already gone counts nothing). The directory is not fsynced: `sync_dir` when the
        deletion must survive a crash."""
        freed = 0
        for path in paths:
            if path == self.tail:
                self.forget_tail()
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        return freed

    def sync_dir(self) -> None:
        fsync_dir(self.dir)
