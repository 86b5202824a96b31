"""Quiescing for app-consistent points (agent.freeze, agent.appoint) on real file systems: ext4 on loop
devices, frozen with FIFREEZE. The oracle for "frozen" is a writer process: it does not finish until the
thaw. Needs root and loop devices (the mount, mkfs and FIFREEZE calls); script and parsing tests need
neither."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from standby.agent.config import AgentConfig
from standby.agent.freeze import (
    Freeze,
    FreezeError,
    Mount,
    ScriptFailed,
    block_devices,
    mounts_on,
    parse_mountinfo,
    run_script,
    syncfs,
    thaw_leftover,
)
from standby.agent.reader import BatchBuilder
from standby.agent.tracker import tracefs
from standby.plumbing.errors import NotStarted
from tests.agent.test_delta_points import Harness, script
from tests.conftest import LOOP_OK
from tests.tools import missing, need

MiB = 1024 * 1024
_NO_FS = (
    "needs root and loop devices (mounting and FIFREEZE are root-only)" if not LOOP_OK
    else missing("mkfs.ext4", "fsfreeze")
)
needs_fs = pytest.mark.skipif(_NO_FS is not None, reason=_NO_FS or "")


def mkfs_mount(dev: str, mnt: Path, mounted: list[Path]) -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
    mounted.append(mnt)
    return mnt


@pytest.fixture
def mounted() -> Iterator[list[Path]]:
    """Mount points made by the test: thawed (in case a test failed while frozen) and unmounted after."""
    made: list[Path] = []
    yield made
    for mnt in reversed(made):
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.fixture
def ext4(make_loop: Callable[..., str], tmp_path: Path, mounted: list[Path]) -> tuple[str, Path]:
    """An ext4 file system on a fresh loop device: (device, mount point)."""
    dev = make_loop(64 * MiB, "fs")
    return dev, mkfs_mount(dev, tmp_path / "mnt", mounted)


def writer(path: Path) -> subprocess.Popen[bytes]:
    """A process that creates a file and writes to it: blocks while the file system is frozen."""
    return subprocess.Popen(["sh", "-c", f"echo written > {path}"])


def blocked(proc: subprocess.Popen[bytes], seconds: float = 0.5) -> bool:
    time.sleep(seconds)
    return proc.poll() is None


# -- discovery ------------------------------------------------------------------------------------------
def test_mountinfo_parsing_with_escapes_and_optional_fields():
    text = (
        "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "37 35 7:3 / /mnt/with\\040space rw shared:7 master:2 - ext4 /dev/loop3 rw\n"
        "38 35 0:45 / /srv rw - btrfs /dev/vdb rw\n"
        "garbage\n"
    )
    assert parse_mountinfo(text) == [
        Mount((98, 0), "/mnt/parent", "ext3", "/dev/root"),
        Mount((7, 3), "/mnt/with space", "ext4", "/dev/loop3"),
        Mount((0, 45), "/srv", "btrfs", "/dev/vdb"),
    ]


def test_an_image_file_or_character_device_has_no_mounts(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4096))
    assert block_devices(img) == set() and mounts_on([img]) == []
    assert mounts_on(["/dev/null"]) == []


@needs_fs
def test_the_file_system_of_a_loop_device_is_found(ext4):
    dev, mnt = ext4
    [m] = mounts_on([dev])
    assert m.mount_point == str(mnt) and m.fstype == "ext4" and m.source == dev
    st = os.stat(dev)
    assert m.dev == (os.major(st.st_rdev), os.minor(st.st_rdev))


@needs_fs
def test_a_bind_mount_is_frozen_once(ext4, tmp_path, mounted):
    dev, mnt = ext4
    bind = tmp_path / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(mnt), str(bind)], check=True)
    mounted.append(bind)
    assert [m.mount_point for m in mounts_on([dev])] == [str(mnt)]


@pytest.fixture
def partitioned(tmp_path: Path, mounted: list[Path]) -> Iterator[tuple[str, str, Path]]:
    """A loop device with a partition table (losetup --partscan) and ext4 on its first partition:
    (whole device, partition, mount point). Detached after the test, like conftest's make_loop."""
    if not LOOP_OK:
        pytest.skip("needs root and loop devices")
    need("sfdisk", "mkfs.ext4")
    backing = tmp_path / "parted.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--partscan", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(
            ["sfdisk", "-q", dev], input="label: dos\nstart=2048, type=83\n", text=True, check=True, capture_output=True
        )
        part = f"{dev}p1"
        # Kernels built without the DOS partition parser (this test machine's) find no partition on re-read:
        # partx parses the table itself and adds the partition through BLKPG.
        if not os.path.exists(part):
            subprocess.run(["partx", "-a", dev], capture_output=True)
        for _ in range(50):  # devtmpfs creates the node once the kernel knows the partition
            if os.path.exists(part):
                break
            time.sleep(0.1)
        else:
            pytest.skip(f"no partition device {part} appeared after partitioning {dev}")
        yield dev, part, mkfs_mount(part, tmp_path / "pmnt", mounted)
    finally:
        for mnt in [m for m in mounted if m.name == "pmnt"]:
            subprocess.run(["umount", str(mnt)], capture_output=True)
            mounted.remove(mnt)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_the_file_system_on_a_partition_of_the_disk_is_found(partitioned):
    dev, part, mnt = partitioned
    st = os.stat(part)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) in block_devices(dev)
    assert [(m.mount_point, m.source) for m in mounts_on([dev])] == [(str(mnt), part)]


# -- syncfs and freeze ------------------------------------------------------------------------------
@needs_fs
def test_syncfs_puts_written_data_on_the_device(ext4):
    dev, mnt = ext4
    marker = os.urandom(16).hex().encode() * 256  # one distinctive 4 KiB block
    (mnt / "data").write_bytes(marker)  # buffered: in the page cache only
    syncfs(str(mnt))
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)  # the device, not its page cache
    try:
        import mmap

        buf = mmap.mmap(-1, 64 * MiB)
        os.preadv(fd, [buf], 0)
        assert buf.find(marker) >= 0
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        syncfs(str(mnt / "missing"))


@needs_fs
def test_a_freeze_blocks_writers_until_the_thaw(ext4, tmp_path):
    dev, mnt = ext4
    marker = tmp_path / "freeze.json"
    fz = Freeze(mounts_on([dev]), timeout=30, marker=marker)
    fz.freeze()
    proc = writer(mnt / "f")
    try:
        assert fz.frozen and marker.exists()
        assert blocked(proc), "a write finished on a frozen file system"
    finally:
        secs = fz.thaw()
    assert proc.wait(timeout=10) == 0 and (mnt / "f").read_text() == "written\n"
    assert secs >= 0.5 and fz.seconds == secs and not fz.frozen and not fz.expired
    assert not marker.exists()
    assert fz.thaw() == secs  # idempotent


@needs_fs
def test_the_watchdog_thaws_when_the_caller_never_does(ext4):
    dev, mnt = ext4
    fz = Freeze(mounts_on([dev]), timeout=0.5)
    t0 = time.monotonic()
    fz.freeze()
    proc = writer(mnt / "f")
    assert proc.wait(timeout=10) == 0  # no thaw() from us
    assert 0.4 <= time.monotonic() - t0 < 5
    assert fz.expired and not fz.frozen and fz.seconds is not None and 0.5 <= fz.seconds < 5


@needs_fs
def test_a_failed_freeze_thaws_what_it_had_frozen(make_loop, tmp_path, mounted):
    a = make_loop(64 * MiB, "a")
    b = make_loop(64 * MiB, "b")
    mnt_a = mkfs_mount(a, tmp_path / "a", mounted)
    mnt_b = mkfs_mount(b, tmp_path / "b", mounted)
    subprocess.run(["fsfreeze", "-f", str(mnt_b)], check=True)  # someone else froze the second one
    try:
        fz = Freeze(mounts_on([a]) + mounts_on([b]), timeout=30)
        with pytest.raises(FreezeError, match="already frozen"):
            fz.freeze()
        proc = writer(mnt_a / "f")
        assert proc.wait(timeout=10) == 0  # the first one is not left frozen
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt_b)], check=True)


@needs_fs
def test_a_freeze_left_by_a_killed_agent_is_thawed_at_start(ext4, tmp_path):
    dev, mnt = ext4
    marker = tmp_path / "freeze.json"
    fz = Freeze(mounts_on([dev]), timeout=30, marker=marker)
    fz.freeze()
    fz._timer.cancel()  # type: ignore[union-attr]  # as if the agent died: nobody will thaw
    proc = writer(mnt / "f")
    try:
        assert blocked(proc)
        assert thaw_leftover(marker) == [str(mnt)]
        assert proc.wait(timeout=10) == 0 and not marker.exists()
    finally:
        fz.thaw()


# -- the coordinator on a real file system ------------------------------------------------------------
@needs_fs
def test_an_app_point_holds_the_freeze_while_the_frozen_epoch_is_read(ext4, tmp_path):
    """Flush epoch first (not frozen), then the frozen one: a writer started while the frozen epoch is
    read is still blocked half a second later, and finishes after the thaw."""
    dev, mnt = ext4
    h = Harness(tmp_path, disk_path=Path(dev), pre_script=script(tmp_path / "pre", "true"), freeze_timeout=10)
    h.tracker.write(100, 200, 0, 4096)
    seen: list[tuple[bool, bool]] = []

    def during_read() -> None:
        app = h.shipper.current is not None and h.shipper.current.app is not None
        if not app:  # the flush epoch: the scripted "device" gets a write for the frozen epoch to read
            h.tracker.write(h.tracker.now, h.tracker.now + 10, 8192, 12288)
        seen.append((app, blocked(writer(mnt / f"w{len(seen)}"), 0.3)))

    h.builder.during_read = during_read
    res = asyncio.run(h.app_point("fs"))
    assert seen == [(False, False), (True, True)]
    [entry] = res["disks"]
    assert entry["consistency"] == "app-consistent" and 0.3 <= entry["freeze_seconds"] < 10
    assert res["warnings"] == []
    assert h.link.markers()[-1].meta["freeze_seconds"] == entry["freeze_seconds"]
    for _ in range(100):  # the blocked writer finishes once thawed
        if (mnt / "w1").exists() and (mnt / "w1").read_text() == "written\n":
            break
        time.sleep(0.05)
    assert (mnt / "w1").read_text() == "written\n"


@needs_fs
def test_a_failing_pre_script_never_freezes(ext4, tmp_path):
    dev, mnt = ext4
    h = Harness(tmp_path, disk_path=Path(dev), pre_script=script(tmp_path / "pre", "exit 1"))
    h.tracker.write(100, 200, 0, 4096)
    writes: list[bool] = []
    h.builder.during_read = lambda: writes.append(writer(mnt / "w").wait(timeout=5) == 0)
    res = asyncio.run(h.app_point("x"))
    assert writes == [True]  # a write during the cut's read went through: nothing frozen
    assert res["disks"][0]["consistency"] == "crash-consistent" and "exit status 1" in res["warnings"][0]


@needs_fs
def test_an_app_point_under_a_live_file_writer_with_the_kernel_tracker(ext4, tmp_path):
    """The real proof: tracefs events of the loop device, real reads of it, a writer busy on its file
    system throughout. Frozen, nothing reaches the device, so the frozen epoch proves app-consistent."""
    if (why := tracefs.available()) is not None:
        pytest.skip(f"tracefs tracking impossible: {why}")
    dev, mnt = ext4
    t = tracefs.TracefsTracker(dev, f"standby-pytest-app-{os.getpid()}", 4096)
    t.start()
    stop = threading.Event()

    def workload() -> None:
        i = 0
        while not stop.is_set():
            with open(mnt / f"f{i % 20}", "wb") as f:
                f.write(os.urandom(256 * 1024))
                os.fsync(f.fileno())
            i += 1

    w = threading.Thread(target=workload)
    try:
        h = Harness(tmp_path, disk_path=Path(dev), tracker=t, pre_script=script(tmp_path / "pre", "true"))
        h.shipper.builder = BatchBuilder(dev, 1, h.disk.key, h.disk.uid.bytes, 1, t)  # type: ignore[assignment]
        w.start()
        time.sleep(0.3)
        res = asyncio.run(h.app_point("live"))
    finally:
        stop.set()
        w.join(timeout=30)
        t.close()
    [entry] = res["disks"]
    assert entry["consistency"] == "app-consistent", entry["reason"]
    assert res["warnings"] == [] and entry["freeze_seconds"] < 10
    assert h.link.markers()[-1].meta["tag"] == "live"


# -- scripts ------------------------------------------------------------------------------------------
def test_a_script_sees_tag_and_phase(tmp_path):
    s = script(tmp_path / "s", 'echo "$STANDBY_PHASE/$STANDBY_TAG"')
    assert run_script(s, "pre", "nightly", 5) == "pre/nightly\n"


def test_a_script_that_fails_says_how_and_what_it_printed(tmp_path):
    s = script(tmp_path / "s", "echo cannot lock tables >&2; exit 4")
    with pytest.raises(ScriptFailed, match=r"pre-script .* failed \(exit status 4\): cannot lock tables"):
        run_script(s, "pre", "", 5)


def test_a_script_that_runs_too_long_is_killed_with_its_children(tmp_path):
    # The background sleep keeps the output pipe open: it must be killed too, or we would wait for it.
    s = script(tmp_path / "s", "echo started; sleep 60 & sleep 60")
    t0 = time.monotonic()
    with pytest.raises(ScriptFailed, match=r"did not finish within 0.5 s \(killed\): started"):
        run_script(s, "post", "", 0.5)
    assert time.monotonic() - t0 < 5


def test_a_missing_or_unrunnable_script_is_a_failure(tmp_path):
    with pytest.raises(ScriptFailed, match="does not exist"):
        run_script(tmp_path / "nope", "pre", "", 5)
    s = tmp_path / "not-executable"
    s.write_text("#!/bin/sh\ntrue\n")
    s.chmod(0o644)
    if os.geteuid() == 0 and os.access(s, os.X_OK):
        pytest.skip("root may execute anything here")
    with pytest.raises(ScriptFailed, match="cannot be run"):
        run_script(s, "pre", "", 5)


# -- config -------------------------------------------------------------------------------------------
def agent_toml(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "agent.toml").write_text(f'name = "m1"\nserver = "ps:9443"\n{extra}\n')
    return tmp_path


def test_app_point_settings_have_the_seeds_defaults(tmp_path):
    cfg = AgentConfig.load(agent_toml(tmp_path, ""))
    assert (cfg.pre_script, cfg.post_script, cfg.freeze_timeout, cfg.app_consistent_every) == (None, None, 10, 3600)
    cfg = AgentConfig.load(agent_toml(tmp_path, 'pre_script = "/etc/standby/pre"\napp_consistent_every = 0'))
    assert cfg.pre_script == Path("/etc/standby/pre") and cfg.app_consistent_every == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('pre_script = "relative/pre"', "pre_script must be an absolute path"),
        ("freeze_timeout = 0", "freeze_timeout must be"),
        ("freeze_timeout = 1000", "freeze_timeout must be"),
        ("app_consistent_every = 5", "app_consistent_every must be 0"),
        ("script_timeout = 0", "script_timeout must be"),
        ('freeze_timeout = "soon"', "invalid config"),
    ],
)
def test_bad_app_point_settings_are_refused_clearly(tmp_path, extra, message):
    with pytest.raises(NotStarted, match=message):
        AgentConfig.load(agent_toml(tmp_path, extra))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the scripts are run as root and chowned to another user")
def test_a_script_other_users_may_change_is_not_run_as_root(tmp_path):
    """Issue 9, finding 7: on 47f798a a pre-script writable by any user was run as root."""
    from standby.agent.freeze import ScriptFailed, run_script, unsafe_script

    d = tmp_path / "scripts"
    d.mkdir(mode=0o755)
    ok = d / "pre"
    ok.write_text("#!/bin/sh\necho ran\n")
    ok.chmod(0o755)
    assert unsafe_script(ok) == ""
    assert run_script(ok, "pre", "t", 10).strip() == "ran"
    ok.chmod(0o757)  # writable by others
    with pytest.raises(ScriptFailed, match="writable by its group or by others"):
        run_script(ok, "pre", "t", 10)
    ok.chmod(0o755)
    d.chmod(0o777)  # anyone may swap the file for another
    assert "writable by its group or by others" in unsafe_script(ok)
    d.chmod(0o755)
    os.chown(ok, 65534, 65534)  # another user's file
    assert "belongs to user 65534" in unsafe_script(ok)
    link = tmp_path / "link"
    link.symlink_to(ok)  # the check follows links to what would really run
    assert "belongs to user 65534" in unsafe_script(link)
