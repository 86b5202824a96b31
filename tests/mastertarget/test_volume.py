"""Is a directory fit to be the retention volume (standby.mastertarget.volume)? Each refusal of the seeds'
rules, and the happy path in tmp_path.

There is no mkfs.vfat here (and making a FAT file system needs a loop device anyway), so the FAT rule is
tested through `mount_of`: once by monkeypatching it, once by feeding it a mountinfo of our own.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from standby.mastertarget import volume
from standby.mastertarget.volume import VolumeError, check_retention_dir, free_bytes, mount_of, overlaps


def test_happy_path(tmp_path: Path) -> None:
    ret = tmp_path / "retention"
    ret.mkdir()
    (tmp_path / "replicas").mkdir()
    check_retention_dir(ret, [tmp_path / "replicas" / "disk0.img", tmp_path / "replicas" / "web.vmdk"],
                        str(tmp_path / "cache"))
    check_retention_dir(ret)
    free, total = free_bytes(ret)
    assert 0 < free <= total


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="does not exist.*retention-dir"):
        check_retention_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(VolumeError, match="does not exist"):
        check_retention_dir(tmp_path / "file")  # a file is not a directory


def test_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root os.access() is always true, so the permission check is simulated.
    asked: list[tuple[str, int]] = []

    def access(path: os.PathLike[str] | str, mode: int) -> bool:
        asked.append((str(path), mode))
        return False

    monkeypatch.setattr(volume.os, "access", access)
    with pytest.raises(VolumeError, match="not writable"):
        check_retention_dir(tmp_path)
    assert asked == [(str(tmp_path), os.W_OK | os.X_OK)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: see test_not_writable")
def test_not_writable_for_real(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(VolumeError, match="not writable"):
            check_retention_dir(ro)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("fstype", ["vfat", "msdos"])
def test_fat_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fstype: str) -> None:
    monkeypatch.setattr(volume, "mount_of", lambda p: ("/mnt/usb", fstype))
    with pytest.raises(VolumeError, match=rf"{fstype} \(FAT/FAT32\).*/mnt/usb.*ext4 or xfs"):
        check_retention_dir(tmp_path)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "tmpfs", "exfat"])
def test_other_file_systems_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fstype: str) -> None:
    monkeypatch.setattr(volume, "mount_of", lambda p: ("/", fstype))
    check_retention_dir(tmp_path)


def test_no_free_capacity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    def statvfs(path: os.PathLike[str] | str) -> object:
        st = real(path)
        return SimpleNamespace(f_bavail=0, f_frsize=st.f_frsize, f_blocks=st.f_blocks)

    monkeypatch.setattr(volume.os, "statvfs", statvfs)
    with pytest.raises(VolumeError, match="no free capacity"):
        check_retention_dir(tmp_path)


@pytest.mark.parametrize("cache", ["same", "inside", "outside"])
def test_cache_volume_is_refused(tmp_path: Path, cache: str) -> None:
    ret = tmp_path / "ret"
    (ret / "sub").mkdir(parents=True)
    cache_dir = {"same": ret, "inside": ret / "sub", "outside": tmp_path}[cache]
    with pytest.raises(VolumeError, match="cache volume"):
        check_retention_dir(ret, cache_dir=str(cache_dir))


def test_cache_through_a_symlink_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "ret").symlink_to(cache)
    with pytest.raises(VolumeError, match="cache volume"):
        check_retention_dir(tmp_path / "ret", cache_dir=str(cache))


def test_sibling_with_a_common_prefix_is_not_an_overlap(tmp_path: Path) -> None:
    (tmp_path / "ret").mkdir()
    (tmp_path / "ret-cache").mkdir()
    check_retention_dir(tmp_path / "ret", [tmp_path / "ret2" / "d.img"], cache_dir=str(tmp_path / "ret-cache"))


@pytest.mark.parametrize("where", ["inside", "deep", "is-the-dir", "holds-it"])
def test_replica_on_the_retention_volume_is_refused(tmp_path: Path, where: str) -> None:
    ret = tmp_path / "ret"
    ret.mkdir()
    replica = {"inside": ret / "d.img", "deep": ret / "a" / "b" / "d.vmdk", "is-the-dir": ret,
               "holds-it": tmp_path}[where]
    with pytest.raises(VolumeError, match="holds replica"):
        check_retention_dir(ret, [tmp_path / "elsewhere.img", replica])


def test_overlaps() -> None:
    assert overlaps("/a/b", "/a/b")
    assert overlaps("/a/b/", "/a/b")
    assert overlaps("/a/b/c", "/a/b")
    assert overlaps("/a", "/a/b/c")
    assert not overlaps("/a/b", "/a/bc")
    assert not overlaps("/a/b", "/a/c")
    assert overlaps("/a/./b/../b", "/a/b")


def test_mount_of_the_real_system(tmp_path: Path) -> None:
    mnt, fstype = mount_of(tmp_path)
    assert fstype
    real = os.path.realpath(tmp_path)
    assert real == mnt or real.startswith(mnt.rstrip("/") + "/")
    assert mount_of(Path("/proc/self")) == ("/proc", "proc")


def test_mount_of_reads_mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Longest mount point wins, by path component; `\\040` is a space; a later mount on the same point
    hides an earlier one."""
    base = os.path.realpath(tmp_path)
    (tmp_path / "usb stick" / "ret").mkdir(parents=True)
    (tmp_path / "usbx").mkdir()
    (tmp_path / "over").mkdir()
    esc = base.replace(" ", "\\040")
    info = "\n".join(
        [
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
            f"30 22 8:17 / {esc}/usb\\040stick rw,relatime shared:5 - vfat /dev/sdb1 rw,fmask=0022",
            f"31 22 8:18 / {esc}/usb rw,relatime - msdos /dev/sdc1 rw",
            f"32 22 0:40 / {esc}/over rw - tmpfs tmpfs rw",
            f"33 32 0:41 / {esc}/over rw - xfs /dev/sdd1 rw",
            "garbage line",
        ]
    )
    real_read = Path.read_text

    def read_text(self: Path, *a: object, **kw: object) -> str:
        if str(self) == "/proc/self/mountinfo":
            return info
        return real_read(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert mount_of(tmp_path / "usb stick" / "ret") == (f"{base}/usb stick", "vfat")
    assert mount_of(tmp_path / "usbx") == ("/", "ext4")  # /usb is not a parent of /usbx
    assert mount_of(tmp_path / "over") == (f"{base}/over", "xfs")
    with pytest.raises(VolumeError, match="vfat"):
        check_retention_dir(tmp_path / "usb stick" / "ret")
    check_retention_dir(tmp_path / "over")


def test_mount_of_without_proc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def unreadable(self: Path, *a: object, **kw: object) -> str:
        raise PermissionError(13, "denied")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert mount_of(tmp_path) == ("/", "")

