"""Is a directory fit to be the retention volume? Checked at start-up and when disks are assigned; a
refusal says what is wrong and what to do (the seeds' rules).

- It must exist and be writable: the retention journal is the only copy of older recovery points.
- Not FAT/FAT32 (vfat, msdos): no sparse files, no POSIX permissions, 4 GiB files, no reliable fsync.
- Free capacity above zero.
- Not the process server's cache volume: a full cache and a full journal must not starve each other,
  and the cache is the process server's, not history.
- Not holding a replica: pruning history must never compete with, or delete beside, a replica.

Volumes are compared by path (one inside the other). A retention directory on the root file system is no
volume of its own: when history fills it, the system's own file system fills too. `standby-mt enroll`
refuses one unless the operator accepts it (`--shared-volume`: a small or test deployment), and the
master target says so at every start.
"""

from __future__ import annotations

import os
from pathlib import Path

FAT = frozenset({"vfat", "msdos", "umsdos", "fat"})


class VolumeError(Exception):
    pass


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file-system type) of the mount that holds `path` (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best = ("/", "")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = fields[4].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best[0]):
            best = (mnt, right.split()[0])
    return best


def overlaps(a: Path | str, b: Path | str) -> bool:
    pa, pb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)


def check_retention_dir(path: Path, replica_paths: list[Path] | None = None, cache_dir: str | None = None,
                        allow_full: bool = False) -> None:
    """Raise VolumeError with the reason if `path` cannot be the retention volume. `allow_full`: a volume
    that holds history may be full (a crash while it filled up): pruning frees it, so it is no reason to
    refuse."""
    where = f"retention volume {path}"
    if not path.is_dir():
        raise VolumeError(
            f"{where} does not exist: mount a volume there, or set [retention] dir in mt.toml "
            "(standby-mt enroll --retention-dir)"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise VolumeError(f"{where} is not writable by the master target")
    mnt, fstype = mount_of(path)
    if fstype in FAT:
        raise VolumeError(f"{where} is on a {fstype} (FAT/FAT32) file system ({mnt}): not supported for the "
                          "retention journal; use ext4 or xfs")
    st = os.statvfs(path)
    if st.f_bavail * st.f_frsize <= 0 and not allow_full:
        raise VolumeError(f"{where} has no free capacity")
    if cache_dir is not None and overlaps(path, cache_dir):
        raise VolumeError(f"{where} is the process server's cache volume ({cache_dir}): give the retention "
                          "journal a volume of its own")
    for r in replica_paths or []:
        if overlaps(path, r):
            raise VolumeError(f"{where} holds replica {r}: keep replicas off the retention volume")


def on_root_file_system(path: Path) -> bool:
    """Is `path` on the file system of `/` (not a volume of its own)?"""
    return os.stat(path).st_dev == os.stat("/").st_dev


def shared_volume_warning(path: Path) -> str:
    return (f"retention volume {path} is on the root file system: when history fills it, the system's own "
            "file system fills too; mount a volume of its own there")


def free_bytes(path: Path) -> tuple[int, int]:
    """(free bytes for us, total bytes) of the volume holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
