"""monolithicSparse replicas: thin at the format level, crash-safe grain allocation.

Theory of operation
-------------------
The layout (``sparse_layout``) preallocates every grain table twice, primary and redundant, so
the only metadata that ever changes while the image is in use is grain-table entries, and each
entry changes at most once: 0 -> sector of a newly appended grain. Writing a batch:

``write()``
    A grain whose entry is set is overwritten in place. A grain that is unallocated gets a new
    64 KiB grain appended at the end of the file (the rest of a partial grain is written as
    zeros); its entry is set *in memory only* and the table marked dirty. All-zero data aimed at
    an unallocated grain allocates nothing: it already reads as zeros.

``sync()`` -- the durability point, in this order:
    1. fsync: every grain written so far is on stable storage;
    2. write the dirty grain tables to the PRIMARY copy, then the same tables to the REDUNDANT
       copy;
    3. fsync.
    A table entry on disk therefore never points at a grain that is not yet durable. A crash
    between the steps can leave: grains past the last referenced one (orphans), and primary and
    redundant tables that disagree -- in either direction, since nothing orders the two writes of
    step 2 on the way to the platter.

``uncleanShutdown``
    Set (and synced) when we open the image for writing, cleared (and synced) by ``close()`` after
    a final ``sync()``. Finding it set on open means a crash, and we recover before anything else:
    merge each entry of the two copies (they can only differ as 0 vs. a value, because entries
    never change once set; two different non-zero values mean damage we refuse to guess about),
    check every entry is grain-aligned, past the metadata, inside the file and unique, write the
    merged tables back to both copies, fsync, and truncate the file after the highest referenced
    grain so orphan grains are dropped and allocation resumes there. The flag stays set until
    ``close()``.

Only ``write()``/``sync()`` touch tables; grains are never freed (``write_zeroes()`` zeroes
allocated grains in place, punching a file-system hole where it can). That keeps the image
readable by qemu-img and VMware, which know nothing of our ordering.
"""

from __future__ import annotations

import logging
import os
import stat
from array import array
from pathlib import Path

from standby.plumbing.durable import fsync_dir

from .base import (
    SECTOR,
    Replica,
    ReplicaError,
    ReplicaSizeMismatch,
    check_parent_dir,
    check_size,
    open_existing,
    pread_full,
    punch_hole,
    pwrite_all,
    refuse_existing,
    remove_quietly,
    write_zero_bytes,
)
from .descriptor import Extent, new_descriptor
from .sparse_layout import (
    MAX_SECTORS,
    MAX_SPARSE_SIZE,
    SparseHeader,
    directory_for,
    new_header,
    pack_directory,
    table_from_bytes,
    table_to_bytes,
)

log = logging.getLogger(__name__)

KIND = "vmdk-sparse"

# Clean grain tables kept in memory (2 KiB each, each covering 32 MiB of disk). Past this many, the
# clean ones are dropped and reloaded on demand; dirty ones always stay until synced.
MAX_CACHED_TABLES = 4096
# Buffers gathered into one pwritev; Linux's IOV_MAX is 1024.
IOV_BATCH = 512


class _Gather:
    """Collects writes to consecutive file ranges and issues them as one pwritev.

    A 16 MiB write into fresh grains lands in contiguous appended grains, so this turns 256
    syscalls into one.
    """

    __slots__ = ("_fd", "_start", "_end", "_bufs")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._start = 0
        self._end = 0
        self._bufs: list[memoryview] = []

    def add(self, file_offset: int, buf: memoryview) -> None:
        if self._bufs and (file_offset != self._end or len(self._bufs) >= IOV_BATCH):
            self.flush()
        if not self._bufs:
            self._start = self._end = file_offset
        self._bufs.append(buf)
        self._end += len(buf)

    def flush(self) -> None:
        bufs, self._bufs = self._bufs, []
        if not bufs:
            return
        n = os.pwritev(self._fd, bufs, self._start)
        if n < self._end - self._start:  # short write (nearly full disk): finish plainly or fail loudly
            rest = b"".join(bytes(b) for b in bufs)[n:]
            pwrite_all(self._fd, rest, self._start + n)


class SparseVmdkReplica(Replica):
    """An open monolithicSparse image; see the module docstring for the crash-safety rules."""

    def __init__(self, path: Path, size: int, fd: int, header: SparseHeader) -> None:
        super().__init__(KIND, path, size)
        self._fd = fd
        self.header = header
        self._grain = header.grain_size  # sectors
        self._gb = header.grain_bytes
        self._gtes = header.num_gtes_per_gt
        self._zero_grain = bytes(self._gb)
        self._primary: list[int] = []
        self._redundant: list[int] = []
        self._tables: dict[int, array[int]] = {}
        self._dirty: set[int] = set()
        self._unsynced = False
        self._next_sector = header.overhead
        self.recovered = False

    def data_files(self) -> list[Path]:
        return [self.path]

    # -- fault injection ------------------------------------------------------------------------

    def _crash_point(self, stage: str) -> None:
        """Called between the steps of ``sync()`` ("grains-synced", "primary-written",
        "redundant-written"). Does nothing; tests replace it to stop a sync half-way and prove
        that every intermediate on-disk state recovers."""

    # -- grain tables ---------------------------------------------------------------------------

    def _table(self, gt: int) -> array[int]:
        t = self._tables.get(gt)
        if t is None:
            if len(self._tables) >= MAX_CACHED_TABLES:
                self._tables = {i: self._tables[i] for i in self._dirty}
            data = pread_full(self._fd, self.header.gt_bytes, self._primary[gt] * SECTOR)
            t = self._tables[gt] = table_from_bytes(data)
        return t

    # -- data path ------------------------------------------------------------------------------

    def _write(self, offset: int, data: memoryview) -> None:
        gb, gtes, fd = self._gb, self._gtes, self._fd
        gather = _Gather(fd)
        start_next = self._next_sector
        new_slots: list[tuple[array[int], int]] = []
        try:
            pos, n = 0, len(data)
            while pos < n:
                grain, inoff = divmod(offset + pos, gb)
                take = min(gb - inoff, n - pos)
                chunk = data[pos : pos + take]
                pos += take
                gt, slot = divmod(grain, gtes)
                t = self._table(gt)
                sector = t[slot]
                if sector:
                    gather.add(sector * SECTOR + inoff, chunk)
                    continue
                if chunk.tobytes() == self._zero_grain[:take]:
                    continue  # zeros into an unallocated grain: it already reads as zeros
                sector = self._next_sector
                if sector + self._grain > MAX_SECTORS:
                    raise ReplicaError(f"{self.path}: sparse VMDK is full (grain offsets are 32-bit sectors)")
                if take == gb:
                    gather.add(sector * SECTOR, chunk)
                else:
                    whole = bytearray(gb)
                    whole[inoff : inoff + take] = chunk
                    gather.add(sector * SECTOR, memoryview(whole))
                self._next_sector = sector + self._grain
                t[slot] = sector
                new_slots.append((t, slot))
                self._tables[gt] = t  # keep it cached even if the cache was trimmed meanwhile
                self._dirty.add(gt)
            gather.flush()
        except BaseException:
            # Nothing may end up pointing at a grain whose write failed: forget this call's
            # allocations (their grains become unreferenced space, reused by the next allocation).
            for t, slot in new_slots:
                t[slot] = 0
            self._next_sector = start_next
            raise
        finally:
            self._unsynced = True

    def _write_zeroes(self, offset: int, length: int) -> None:
        gb, gtes, fd = self._gb, self._gtes, self._fd
        gt_span = gb * gtes
        pos, end = offset, offset + length
        self._unsynced = True
        # Whole allocated grains are zeroed by punching a hole (the grain stays allocated in the
        # VMDK, the host gets the space back); holes over contiguous grains merge into one call.
        hole_start, hole_len = -1, 0
        while pos < end:
            gt = pos // gt_span
            gt_end = min(end, (gt + 1) * gt_span)
            t = self._table(gt)
            first, last = (pos // gb) % gtes, ((gt_end - 1) // gb) % gtes
            if t[first : last + 1].count(0) == last - first + 1:
                pos = gt_end  # nothing allocated here: already zeros, stays unallocated
                continue
            while pos < gt_end:
                grain, inoff = divmod(pos, gb)
                take = min(gb - inoff, gt_end - pos)
                pos += take
                sector = t[grain % gtes]
                if not sector:
                    continue
                where = sector * SECTOR + inoff
                if take < gb:
                    write_zero_bytes(fd, where, take)
                elif hole_start + hole_len == where:
                    hole_len += gb
                else:
                    if hole_len:
                        punch_hole(fd, hole_start, hole_len)
                    hole_start, hole_len = where, gb
        if hole_len:
            punch_hole(fd, hole_start, hole_len)

    def _read(self, offset: int, length: int) -> bytes:
        # Consecutive pieces merge into runs of (file offset, or -1 for zeros; length), so a read of
        # contiguously allocated grains is one pread whose result is returned without a copy.
        gb, gtes = self._gb, self._gtes
        runs: list[tuple[int, int]] = []
        pos = 0
        while pos < length:
            grain, inoff = divmod(offset + pos, gb)
            take = min(gb - inoff, length - pos)
            pos += take
            gt, slot = divmod(grain, gtes)
            sector = self._table(gt)[slot]
            where = sector * SECTOR + inoff if sector else -1
            if runs:
                start, n = runs[-1]
                if (start < 0 and where < 0) or (start >= 0 and start + n == where):
                    runs[-1] = (start, n + take)
                    continue
            runs.append((where, take))
        parts = [bytes(n) if start < 0 else pread_full(self._fd, n, start) for start, n in runs]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- durability -----------------------------------------------------------------------------

    def _sync(self) -> None:
        fd = self._fd
        if self._unsynced:
            os.fsync(fd)  # (1) grains first: no entry may reach the disk before its grain
            self._unsynced = False
        self._crash_point("grains-synced")
        if not self._dirty:
            return
        dirty = sorted(self._dirty)
        images = {gt: table_to_bytes(self._tables[gt]) for gt in dirty}
        for gt in dirty:  # (2) primary copy ...
            pwrite_all(fd, images[gt], self._primary[gt] * SECTOR)
        self._crash_point("primary-written")
        for gt in dirty:  # ... then the redundant copy
            pwrite_all(fd, images[gt], self._redundant[gt] * SECTOR)
        self._crash_point("redundant-written")
        os.fsync(fd)  # (3)
        self._dirty.clear()

    def _close(self) -> None:
        try:
            self._sync()
            self._write_header(unclean=False)
        finally:
            os.close(self._fd)

    def _write_header(self, *, unclean: bool) -> None:
        """Rewrite the header sector with the flag changed, and make it durable."""
        self.header = self.header.with_unclean(unclean)
        pwrite_all(self._fd, self.header.pack(), 0)
        os.fsync(self._fd)

    # -- open and recovery ----------------------------------------------------------------------

    def _load_directories(self, file_sectors: int) -> None:
        """Read both grain directories and check every table lies inside the metadata area,
        with no two tables overlapping (a damaged directory would make us write over data)."""
        h = self.header
        gd_len = h.gd_sectors * SECTOR
        primary = list(table_from_bytes(pread_full(self._fd, gd_len, h.gd_offset * SECTOR)))[: h.gt_count]
        redundant = list(table_from_bytes(pread_full(self._fd, gd_len, h.rgd_offset * SECTOR)))[: h.gt_count]
        spans = [(0, 1), (h.descriptor_offset, h.descriptor_size), (h.gd_offset, h.gd_sectors)]
        spans.append((h.rgd_offset, h.gd_sectors))
        for name, directory in (("grain directory", primary), ("redundant grain directory", redundant)):
            for i, sector in enumerate(directory):
                if sector == 0:
                    raise ReplicaError(
                        f"{self.path}: grain table {i} is not preallocated in the {name}; "
                        "only images with all grain tables preallocated can be written"
                    )
                if sector + h.gt_sectors > h.overhead:
                    raise ReplicaError(f"{self.path}: {name} entry {i} points outside the metadata area")
                spans.append((sector, h.gt_sectors))
        spans.sort()
        for (a, alen), (b, _) in zip(spans, spans[1:], strict=False):
            if alen and a + alen > b:
                raise ReplicaError(f"{self.path}: metadata structures overlap at sector {b}; image is damaged")
        if file_sectors < h.overhead:
            raise ReplicaError(f"{self.path} is truncated: {file_sectors} sectors, metadata needs {h.overhead}")
        self._primary, self._redundant = primary, redundant

    def _recover(self, file_sectors: int) -> None:
        """Bring an image left open by a crash back to a consistent state (module docstring)."""
        h, fd = self.header, self._fd
        grain, overhead = self._grain, h.overhead
        seen: set[int] = set()
        highest = 0
        fix_primary: list[int] = []
        fix_redundant: list[int] = []
        for gt in range(h.gt_count):
            p = pread_full(fd, h.gt_bytes, self._primary[gt] * SECTOR)
            r = pread_full(fd, h.gt_bytes, self._redundant[gt] * SECTOR)
            if p == r and p.count(0) == len(p):
                continue
            t = table_from_bytes(p)
            if p != r:
                rt = table_from_bytes(r)
                for slot, (a, b) in enumerate(zip(t, rt, strict=True)):
                    if a != b:
                        if a and b:
                            raise ReplicaError(
                                f"{self.path}: grain {gt * self._gtes + slot} is mapped to sector {a} by the "
                                f"primary table and {b} by the redundant one; image is damaged"
                            )
                        t[slot] = a or b
                merged = table_to_bytes(t)
                if merged != p:
                    fix_primary.append(gt)
                if merged != r:
                    fix_redundant.append(gt)
            first_grain = gt * self._gtes
            for slot, sector in enumerate(t):
                if not sector:
                    continue
                g = first_grain + slot
                if g >= h.grain_count:
                    raise ReplicaError(f"{self.path}: grain table maps grain {g}, beyond the disk's capacity")
                if sector < overhead or sector % grain or sector + grain > file_sectors:
                    raise ReplicaError(
                        f"{self.path}: grain {g} maps to sector {sector}, which is not a whole grain "
                        "inside the data area of the file; image is damaged"
                    )
                if sector in seen:
                    raise ReplicaError(f"{self.path}: sector {sector} is mapped by two grains; image is damaged")
                seen.add(sector)
                highest = max(highest, sector)
            self._tables[gt] = t
        for gt in fix_primary:
            pwrite_all(fd, table_to_bytes(self._tables[gt]), self._primary[gt] * SECTOR)
        for gt in fix_redundant:
            pwrite_all(fd, table_to_bytes(self._tables[gt]), self._redundant[gt] * SECTOR)
        os.fsync(fd)
        end = highest + grain if seen else overhead
        orphans = max(0, file_sectors - end) // grain
        if file_sectors != end:
            os.ftruncate(fd, end * SECTOR)  # drops grains appended but never referenced
            os.fsync(fd)
        self._next_sector = end
        self.recovered = True
        log.warning(
            "recovered %s after unclean shutdown: %d grains in use, %d+%d grain tables repaired "
            "(primary+redundant), %d orphan grains dropped",
            self.path,
            len(seen),
            len(fix_primary),
            len(fix_redundant),
            orphans,
        )


def create_vmdk_sparse(path: Path, size: int) -> SparseVmdkReplica:
    """Create a monolithicSparse image durably, then open it for writing.

    The image is built under a temporary name (header, descriptor, both directories; the grain
    tables are zeros), fsynced, renamed into place and the directory fsynced: a crash leaves
    either no image or a complete empty one.
    """
    check_size(KIND, size)
    if size > MAX_SPARSE_SIZE:
        raise ReplicaError(
            f"vmdk-sparse replicas are limited to 2 TiB by the format; {size} bytes needs a vmdk (flat) replica"
        )
    path = Path(path)
    refuse_existing(path)
    check_parent_dir(path)
    header = new_header(size // SECTOR)
    text = new_descriptor("monolithicSparse", [Extent("RW", header.capacity, "SPARSE", path.name)], size)
    desc = text.render().encode("ascii")
    if len(desc) > header.descriptor_size * SECTOR:
        raise ReplicaError(f"descriptor for {path} does not fit in {header.descriptor_size} sectors")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ReplicaError(f"cannot create {tmp}: {exc.strerror}") from exc
    try:
        try:
            # Reserve the metadata area for real, so writing a grain table can never hit ENOSPC.
            os.posix_fallocate(fd, 0, header.overhead * SECTOR)
        except OSError:
            os.ftruncate(fd, header.overhead * SECTOR)
        pwrite_all(fd, header.pack(), 0)
        pwrite_all(fd, desc, header.descriptor_offset * SECTOR)
        pwrite_all(fd, pack_directory(header, directory_for(header, header.rgd_offset)), header.rgd_offset * SECTOR)
        pwrite_all(fd, pack_directory(header, directory_for(header, header.gd_offset)), header.gd_offset * SECTOR)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        refuse_existing(path)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        remove_quietly(tmp)
        raise ReplicaError(f"cannot create {path}: {exc.strerror}") from exc
    except BaseException:
        if fd >= 0:
            os.close(fd)
        remove_quietly(tmp)
        raise
    return open_vmdk_sparse(path, size)


def open_vmdk_sparse(path: Path, size: int) -> SparseVmdkReplica:
    """Open an existing monolithicSparse image for writing, recovering it first after a crash."""
    check_size(KIND, size)
    path = Path(path)
    fd = open_existing(path, "sparse VMDK")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReplicaError(f"sparse VMDK {path} is not a regular file")
        header = SparseHeader.unpack(pread_full(fd, SECTOR, 0))
        header.validate_for_writing(str(path))
        if header.capacity * SECTOR != size:
            raise ReplicaSizeMismatch(
                f"sparse VMDK {path} holds a disk of {header.capacity * SECTOR} bytes but the disk is {size} bytes"
            )
        replica = SparseVmdkReplica(path, size, fd, header)
        file_sectors = st.st_size // SECTOR
        replica._load_directories(file_sectors)
        if header.unclean_shutdown:
            replica._recover(file_sectors)
        else:
            g = header.grain_size
            replica._next_sector = max(header.overhead, -(-file_sectors // g) * g)
        replica._write_header(unclean=True)
        return replica
    except OSError as exc:
        os.close(fd)
        raise ReplicaError(f"cannot open sparse VMDK {path}: {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        raise
