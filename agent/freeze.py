"""Quiescing a machine for an app-consistent point (DESIGN §4): the file systems on the protected disks,
their flush (syncfs), their freeze (FIFREEZE/FITHAW) and the operator's pre/post scripts.

Which file systems: those mounted from a protected disk, one of its partitions, or a device stacked on
them (device-mapper, md: the disk's `holders` in sysfs). /proc/self/mountinfo names each mount's
superblock by major:minor; a file system whose superblock has an anonymous number (btrfs) is matched by
its source device instead. An image-file disk has no mounts: nothing to freeze.

The promise is "a timeout always thaws": a machine must never be left frozen, whatever happens to the
caller. So a `Freeze` starts a watchdog thread before its first FIFREEZE that thaws everything when
`timeout` passes — a thread, not an asyncio task, because a caller stuck on the frozen file system (a
log write, a page fault on a file there) would stop the event loop too. It also writes a marker (the
mount points it is about to freeze) before freezing and removes it after the thaw, so an agent killed
with -9 while frozen thaws them when it starts again (`thaw_leftover`).

Every FIFREEZE fd is opened before the first file system is frozen: opening a path may touch a file
system already frozen (an atime update is skipped, but a lookup on a covered mount point could not be
retried), and thawing must never need a path lookup.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from standby.plumbing.durable import load_json, save_json
from standby.plumbing.errors import StandbyError

log = logging.getLogger("standby.agent.freeze")

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
MOUNTINFO = Path("/proc/self/mountinfo")
SYS_BLOCK = Path("/sys/dev/block")
# A script's output is kept for the warning; more than this is cut (the head is rarely the reason).
SCRIPT_OUTPUT_TAIL = 2000
# After a script is killed at its timeout, how long to wait for its output pipes to close (a grandchild
# that left the process group may hold them open for ever).
KILL_GRACE = 5.0


class FreezeError(StandbyError):
    """The file systems could not be frozen (everything frozen so far was thawed again)."""


class ScriptFailed(StandbyError):
    """A pre- or post-script is missing, exited non-zero or ran out of time."""


@dataclass(frozen=True)
class Mount:
    """One file system to freeze: its superblock's device number and a path where it is mounted."""

    dev: tuple[int, int]
    mount_point: str
    fstype: str
    source: str


# -- discovery --------------------------------------------------------------------------------------------
def block_devices(path: str | os.PathLike[str]) -> set[tuple[int, int]]:
    """The device numbers of a block device, its partitions and every device stacked on any of them.
    Empty for an image file (nothing can be mounted from it without a loop device of its own)."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return set()
    todo = [(os.major(st.st_rdev), os.minor(st.st_rdev))]
    seen: set[tuple[int, int]] = set()
    while todo:
        dev = todo.pop()
        if dev in seen:
            continue
        seen.add(dev)
        sysdir = SYS_BLOCK / f"{dev[0]}:{dev[1]}"
        try:
            children = [c for c in sysdir.iterdir() if (c / "partition").exists()]
            children += list((sysdir / "holders").iterdir())
        except OSError:
            continue  # no sysfs entry (a container without /sys): the device itself still counts
        for child in children:
            try:
                todo.append(_parse_dev((child / "dev").read_text()))
            except (OSError, ValueError):
                continue
    return seen


def _parse_dev(text: str) -> tuple[int, int]:
    major, minor = text.strip().split(":")
    return int(major), int(minor)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every mount in a mountinfo text. Format (proc(5)), optional fields end at the lone "-":
    ``36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue``"""
    out = []
    for line in text.splitlines():
        f = line.split(" ")
        try:
            sep = f.index("-", 6)
            out.append(Mount(_parse_dev(f[2]), _unescape(f[4]), f[sep + 1], _unescape(f[sep + 2])))
        except (ValueError, IndexError):
            continue  # a line we cannot read names no file system we could freeze safely
    return out


def _source_dev(source: str) -> tuple[int, int] | None:
    if not source.startswith("/dev/"):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    return (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISBLK(st.st_mode) else None


def mounts_on(paths: list[str | os.PathLike[str]], mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """The file systems living on the given disks, one entry per superblock (a file system mounted at
    several places, or bind-mounted, is frozen once: a second FIFREEZE of it would fail with EBUSY)."""
    devs: set[tuple[int, int]] = set()
    for p in paths:
        devs |= block_devices(p)
    if not devs:
        return []
    found: dict[tuple[int, int], list[Mount]] = {}
    for m in parse_mountinfo(mountinfo.read_text()):
        if m.dev in devs or _source_dev(m.source) in devs:
            found.setdefault(m.dev, []).append(m)
    # Parents before children, so thawing in reverse order releases nested mounts first.
    return sorted((ms[0] for ms in found.values()), key=lambda m: (m.mount_point.count("/"), m.mount_point))


def _all_mounts_of(m: Mount, mountinfo: Path = MOUNTINFO) -> list[str]:
    try:
        return [x.mount_point for x in parse_mountinfo(mountinfo.read_text()) if x.dev == m.dev]
    except OSError:
        return [m.mount_point]


# -- flush --------------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(mount_point: str) -> None:
    """Write the file system's dirty data now, so the freeze that follows has little left to flush and
    stays short (measured on ext4: ≈45 ms after a flush, 1.3 s with 600 MB dirty without one). Python has
    no os.syncfs; libc has."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"syncfs {mount_point}: {os.strerror(e)}")
    finally:
        os.close(fd)


# -- freeze -------------------------------------------------------------------------------------------
class Freeze:
    """File systems frozen together: `freeze()`, then `thaw()` — or the watchdog thaws them `timeout`
    seconds after the freeze started. Safe to thaw from any thread, any number of times.

    `seconds` is the freeze duration, from the start of the first FIFREEZE to the end of the last FITHAW.
    """

    def __init__(self, mounts: list[Mount], timeout: float, marker: Path | None = None) -> None:
        self.mounts = mounts
        self.timeout = timeout
        self.marker = marker
        self.expired = False  # the watchdog thawed
        self.seconds: float | None = None
        self._lock = threading.Lock()
        self._frozen: list[tuple[Mount, int]] = []  # in freezing order
        self._fds: list[int] = []
        self._started = 0.0
        self._thawed = False
        self._freezing = False
        self._timer: threading.Timer | None = None

    @property
    def frozen(self) -> bool:
        """True from the moment every file system is frozen until a thaw begins."""
        return not self._thawed and len(self._frozen) == len(self.mounts) and self._started > 0

    def remaining(self) -> float:
        """Seconds until the watchdog thaws (counted from the start of the freeze)."""
        return self.timeout - (time.monotonic() - self._started) if self._started else self.timeout

    def freeze(self) -> None:
        if self._started:
            raise RuntimeError("a Freeze is used once")
        fds: list[tuple[Mount, int]] = []
        try:
            for m in self.mounts:
                fds.append((m, self._open(m)))
            if self.marker is not None:
                save_json(self.marker, {"mount_points": [m.mount_point for m in self.mounts], "pid": os.getpid()})
        except (FreezeError, OSError) as exc:
            for _, fd in fds:
                os.close(fd)
            if isinstance(exc, FreezeError):
                raise
            raise FreezeError(f"cannot write the freeze marker {self.marker}: {exc}") from None
        self._fds = [fd for _, fd in fds]
        self._freezing = True  # the fds stay open until this loop is over, whoever thaws
        self._timer = threading.Timer(self.timeout, self._expire)
        self._timer.daemon = True
        self._started = time.monotonic()
        self._timer.start()
        try:
            for m, fd in fds:
                try:
                    fcntl.ioctl(fd, FIFREEZE, 0)
                except OSError as exc:
                    self.thaw()
                    why = "it is already frozen" if exc.errno == errno.EBUSY else exc.strerror
                    raise FreezeError(f"cannot freeze {m.mount_point} ({m.fstype} on {m.source}): {why}") from None
                with self._lock:
                    self._frozen.append((m, fd))
                    late = self._thawed
                if late:  # the watchdog fired while this one was still being frozen
                    self._thaw_one(m, fd)
                    raise FreezeError(f"freezing took longer than freeze_timeout ({self.timeout:g} s)")
        finally:
            with self._lock:
                self._freezing = False
                close = self._thawed
            if close:
                self._close_fds()

    def _open(self, m: Mount) -> int:
        """An fd on the mounted file system itself: a path covered by a later mount would open (and
        freeze) the file system on top, so check the device and try the file system's other mounts."""
        for path in [m.mount_point] + [p for p in _all_mounts_of(m) if p != m.mount_point]:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            if (os.major(os.fstat(fd).st_dev), os.minor(os.fstat(fd).st_dev)) == m.dev or m.fstype == "btrfs":
                return fd
            os.close(fd)
        raise FreezeError(f"cannot open the file system mounted at {m.mount_point} (covered by another mount?)")

    def _expire(self) -> None:
        with self._lock:
            if self._thawed:
                return
            self.expired = True
        log.error("file systems still frozen after freeze_timeout (%g s): thawing them now", self.timeout)
        self.thaw()

    def thaw(self) -> float:
        """Thaw everything this Freeze froze (newest first); returns the freeze duration in seconds."""
        with self._lock:
            if self._thawed:
                return self.seconds or 0.0
            self._thawed = True
            frozen, self._frozen = self._frozen, []
            for m, fd in reversed(frozen):
                self._thaw_one(m, fd)
            end = time.monotonic()
            self.seconds = end - self._started if self._started else 0.0
            if self._timer is not None:
                self._timer.cancel()
            if not self._freezing:
                self._close_fds()
        if self.marker is not None:
            try:
                self.marker.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove the freeze marker %s: %s", self.marker, exc)
        return self.seconds

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    @staticmethod
    def _thaw_one(m: Mount, fd: int) -> None:
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not frozen (someone ran fsfreeze -u): nothing to do
                log.error("cannot thaw %s: %s", m.mount_point, exc.strerror)

    def __enter__(self) -> Freeze:
        self.freeze()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thaw()


def thaw_leftover(marker: Path) -> list[str]:
    """At start: thaw what an agent killed while frozen left frozen (its marker names the mount points).
    Returns the mount points thawed."""
    if not marker.exists():
        return []
    try:
        points = [str(p) for p in load_json(marker)["mount_points"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("unreadable freeze marker %s (%s): removing it", marker, exc)
        marker.unlink(missing_ok=True)
        return []
    thawed = []
    for p in points:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            thawed.append(p)
        except OSError:
            pass  # not frozen any more
        finally:
            os.close(fd)
    if thawed:
        log.warning("thawed %s, left frozen by an agent that stopped while freezing", ", ".join(thawed))
    marker.unlink(missing_ok=True)
    return thawed


# -- scripts ------------------------------------------------------------------------------------------
def run_script(path: Path, phase: str, tag: str, timeout: float) -> str:
    """Run the operator's pre- or post-script; returns its output. The script learns the point's tag and
    the phase from STANDBY_TAG and STANDBY_PHASE ("pre"/"post"). It runs in its own process group so a
    timeout kills whatever it started too. Raises ScriptFailed with a message that says why."""
    name = f"{phase}-script {path}"
    if not path.exists():
        raise ScriptFailed(f"{name} does not exist")
    problem = unsafe_script(path)
    if problem:
        raise ScriptFailed(f"{name} not run: {problem}")
    env = {**os.environ, "STANDBY_TAG": tag, "STANDBY_PHASE": phase}
    try:
        proc = subprocess.Popen(
            [str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise ScriptFailed(f"{name} cannot be run: {exc.strerror}") from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            out, _ = proc.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = b""
        raise ScriptFailed(f"{name} did not finish within {timeout:g} s (killed){_tail(out)}") from None
    if proc.returncode != 0:
        how = f"exit status {proc.returncode}" if proc.returncode > 0 else f"signal {-proc.returncode}"
        raise ScriptFailed(f"{name} failed ({how}){_tail(out)}")
    return out.decode(errors="replace")


def unsafe_script(path: Path) -> str:
    """Why the agent (root) must not run `path`, or "": threat — a local user who may change the script,
    or a directory on its way, would get their commands run as root at the next app-consistent point.
    The file and every directory up to / must belong to root (or to the agent's own user) and must not be
    writable by group or others — except a sticky directory such as /tmp, whose users cannot rename or
    remove what they do not own (and the next component is checked to be root's)."""
    me = os.geteuid()
    try:
        real = path.resolve(strict=True)
        st = os.stat(real)
    except OSError as exc:
        return f"cannot check it: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{real} is not a regular file"
    for p in [real, *real.parents]:
        st = os.stat(p)
        if st.st_uid not in (0, me):
            return f"{p} belongs to user {st.st_uid}, not root: another user could change what runs as root"
        sticky_dir = p != real and st.st_mode & stat.S_ISVTX
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
            return (f"{p} is writable by its group or by others: another user could change what runs as root "
                    f"(chmod go-w {p})")
    return ""


def _tail(out: bytes | None) -> str:
    text = (out or b"").decode(errors="replace").strip()
    if not text:
        return ""
    if len(text) > SCRIPT_OUTPUT_TAIL:
        text = "…" + text[-SCRIPT_OUTPUT_TAIL:]
    return f": {text}"
