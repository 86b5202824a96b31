"""A real systemd as PID 1 of private namespaces, to test our units under the manager that runs them (issue 11).

This machine's PID 1 is not systemd, yet systemd 252 boots as PID 1 of fresh namespaces in about 0.3 s:

1. A cgroup2 child of the cgroup this process is in (on the cgroup2 mount, wherever it is: on this host
   `/sys/fs/cgroup/unified`, the v1 controllers hold `/sys/fs/cgroup`; on a pure cgroup2 host
   `/sys/fs/cgroup`). A small shell enters it, then execs
   `unshare --pid --fork --mount --uts --ipc --net --cgroup` of the set-up script below, so the new cgroup
   namespace is rooted at that child and systemd takes the child for the whole hierarchy.
2. The script makes `/` rprivate (nothing propagates to the host), mounts a tmpfs on a directory of the
   harness's own and builds the new root there: an overlay whose lower layer is a non-recursive bind of `/`
   and whose upper layer is on that tmpfs (so nothing reaches the host's disk), a fresh proc with `/proc/sys`
   read-only (systemd and its services would otherwise write host-wide sysctls: `/proc/sys` is not
   namespaced for most keys), sysfs read-only, cgroup2 on `/sys/fs/cgroup`, a private `/dev` (a tmpfs with
   binds of null/zero/full/random/urandom/tty, a new devpts instance, a pty of the harness bound on
   `/dev/console`, plus the device nodes a test asks for: loop devices are made on the host with losetup,
   and only their nodes are bound in), a tmpfs `/tmp`, the host directories a test asks for bound at their
   own paths, the units copied to `/etc/systemd/system` with a minimal target of ours
   (`standby-harness.target`); it masks every generator and every unit the boot could start besides the
   journal (below), pivots root and execs `/lib/systemd/systemd --system --unit=standby-harness.target` under
   `setpriv --bounding-set -sys_module` (CAP_SYS_MODULE gone from the bounding set, so from PID 1 and all
   it starts).
3. Control is `nsenter -t PID -a <command>` (every namespace of PID 1 and its root): `systemctl`,
   `journalctl`, anything else.

Facts found on the way (what differs from the issue's recipe, and why):

- An overlay with `lowerdir=/` works here because `/` is ext4, but not where `/` is itself an overlay and
  the upper layer would sit on it; a non-recursive bind of `/` to a directory on our tmpfs serves as lower
  layer in both cases. The lower layer is the live root file system (other processes keep writing it):
  overlayfs tolerates that, a file copied up is a snapshot. Directories of the checkout or the interpreter
  that live on another file system than `/`, or under /tmp (a fresh tmpfs inside), are not seen through it:
  they are bound in, read-only.
- Masking `timers.target` is not enough: the units our services pull in (`sysinit.target`, `basic.target`,
  `network-online.target`…) want host services that act on the whole machine from inside the namespaces —
  `systemd-timesyncd` sets the host's clock, `systemd-binfmt` and `systemd-sysctl` write host-wide kernel
  settings, `systemd-pstore` deletes the host's crash records, `systemd-tmpfiles-setup` runs with `--remove`
  and would empty `/tmp`, including the host directories bound there. So the harness walks the wants and
  requires of those targets (directories and `Wants=` lines, through nested targets) and masks every unit
  that is not a target or a slice, except the journal's service and sockets (for `journalctl -u`) and the
  mounts of tracefs (the agent's tracker) and mqueue; every generator is masked too (host fstab, sysv
  scripts, getty). The environment variable `container=standby-harness` tells systemd it runs in a container.
- `/dev/console` is a pty of the harness (os.openpty); a thread drains its master into `console.log`, so
  systemd's messages are kept and its writes never block. `/dev/kmsg` is not bound: the host's kernel log
  is left alone.
- Our cgroup gets no controller: on this host the v1 hierarchies hold cpu, memory, pids… and the cgroup2
  root offers only hugetlb, enabled nowhere. So MemoryMax=, CPUQuota=, TasksMax= are accepted but not
  enforced in here; DevicePolicy=/DeviceAllow= are (they are BPF programs, no controller needed), and so are
  the mount-namespace settings (ProtectSystem=, ReadWritePaths=, PrivateTmp=…). systemd says "Couldn't move
  remaining userspace processes" at boot: harmless (the set-up shell is gone by then).
- Boot, from starting the unshare to `systemctl is-system-running` answering "running": 0.13–0.29 s here.
- Teardown kills systemd (PID 1 of the new PID namespace, by its PID, checked to be the unshare's child),
  which takes the whole namespace with it; then waits for the cgroup to be empty (writes `cgroup.kill` of
  our own cgroup if it is not) and removes the cgroup tree. Every mount lived only in the private mount
  namespace and went with it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
TARGET = "standby-harness.target"
CGROUP_PREFIX = "standby-harness-"
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system", "/lib/systemd/system",
             "/usr/lib/systemd/system")
GENERATOR_DIRS = ("/lib/systemd/system-generators", "/usr/lib/systemd/system-generators",
                  "/usr/local/lib/systemd/system-generators", "/etc/systemd/system-generators")
# The targets a service with default dependencies (or a usual Wants=) pulls in: their units are masked.
PULLED_TARGETS = ("basic.target", "sysinit.target", "sockets.target", "timers.target", "paths.target",
                  "local-fs.target", "local-fs-pre.target", "swap.target", "network.target", "network-pre.target",
                  "network-online.target", "nss-lookup.target", "time-set.target", "time-sync.target",
                  "remote-fs.target", "remote-fs-pre.target")
# What the boot may start: the journal (journalctl -u), tracefs (the agent's tracker), POSIX queues.
KEEP = frozenset({"systemd-journald.service", "systemd-journald.socket", "systemd-journald-dev-log.socket",
                  "systemd-journald-audit.socket", "sys-kernel-tracing.mount", "dev-mqueue.mount", "tmp.mount"})
PULL = re.compile(r"^\s*(?:Wants|Requires|Requisite|BindsTo)\s*=\s*(.*)$", re.M)

# Runs as PID 1 of the new PID namespace, in the new mount namespace, before systemd. Arguments: the harness's
# directory, the console pty, then triples KIND HOST-PATH PATH-INSIDE (KIND: bind, ro or dev).
SETUP = r"""
set -eu
H=$1 CONSOLE=$2
shift 2
M=$H/mnt N=$H/mnt/root
mount --make-rprivate /
mount -t tmpfs -o mode=0755 standby-harness "$M"
mkdir "$M/lower" "$M/upper" "$M/work" "$N"
mount --bind / "$M/lower"
mount -t overlay standby-harness -o "lowerdir=$M/lower,upperdir=$M/upper,workdir=$M/work" "$N"
mount -t proc proc "$N/proc"
mount --bind "$N/proc/sys" "$N/proc/sys"
mount -o remount,bind,ro "$N/proc/sys"
mount -t sysfs -o ro sysfs "$N/sys"
mount -t cgroup2 cgroup2 "$N/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid standby-harness "$N/dev"
for d in null zero full random urandom tty; do touch "$N/dev/$d"; mount --bind "/dev/$d" "$N/dev/$d"; done
mkdir "$N/dev/pts" "$N/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$N/dev/pts"
ln -s pts/ptmx "$N/dev/ptmx"
touch "$N/dev/console"
mount --bind "$CONSOLE" "$N/dev/console"
mount -t tmpfs -o mode=1777,nosuid,nodev standby-harness "$N/tmp"
while [ $# -gt 0 ]; do
  kind=$1 src=$2 dst=$N$3
  shift 3
  case $kind in
    dev) mkdir -p "$(dirname "$dst")"; touch "$dst"; mount --bind "$src" "$dst" ;;
    bind) mkdir -p "$dst"; mount --rbind "$src" "$dst" ;;
    ro) mkdir -p "$dst"; mount --rbind "$src" "$dst"; mount -o remount,bind,ro "$dst" ;;
  esac
done
mkdir -p "$N/etc/systemd/system" "$N/etc/systemd/system-generators"
cp -a "$H/system/." "$N/etc/systemd/system/"
cp -a "$H/generators/." "$N/etc/systemd/system-generators/"
mkdir -p "$N/etc/systemd/system.conf.d"
cp -a "$H/manager.conf" "$N/etc/systemd/system.conf.d/standby-harness.conf"
cd "$N"
mkdir -p .harness-old-root
pivot_root . .harness-old-root
umount -l /.harness-old-root
rmdir /.harness-old-root
export container=standby-harness
exec setpriv --bounding-set -sys_module "$0" --system --unit=standby-harness.target --show-status=yes
"""


def unavailable() -> str | None:
    """Why a real systemd cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root: namespaces, mounts and a cgroup of our own"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no systemd binary at {SYSTEMD}: apt-get install systemd"
    absent = [p for p in ("unshare", "nsenter", "setpriv", "pivot_root") if shutil.which(p) is None]
    if absent:
        return f"{', '.join(absent)} not installed: apt-get install util-linux"
    if cgroup2_parent() is None:
        return "no cgroup2 hierarchy mounted (looked for a cgroup2 line in /proc/self/mounts)"
    return None


def cgroup2_parent() -> Path | None:
    """The cgroup2 directory this process is in (its `0::` line), on the cgroup2 mount; None without one."""
    mount = next((line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                  if line.split()[2] == "cgroup2"), None)
    if mount is None:
        return None
    own = next((line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")), "/")
    return Path(mount) / own.lstrip("/")


def _unit_file(name: str) -> Path | None:
    return next((Path(d) / name for d in UNIT_DIRS if (Path(d) / name).exists()), None)


def _pulled(name: str) -> Iterator[str]:
    """The units `name` wants or requires: its .wants/.requires directories and its Wants=/Requires= lines."""
    for d in UNIT_DIRS:
        for kind in ("wants", "requires"):
            folder = Path(d) / f"{name}.{kind}"
            if folder.is_dir():
                yield from (p.name for p in folder.iterdir())
    path = _unit_file(name)
    if path is not None:
        try:
            for words in PULL.findall(path.read_text(errors="replace")):
                yield from words.split()
        except OSError:
            pass


def units_to_mask(roots: Iterable[str] = PULLED_TARGETS, own: Iterable[str] = ()) -> list[str]:
    """Every unit that starting `roots` would start on this host, through nested targets: all but targets,
    slices, the units in KEEP and our own units."""
    seen: set[str] = set()
    todo = list(roots)
    mask: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.endswith(".target"):
            todo.extend(_pulled(name))
        elif not name.endswith(".slice"):
            mask.add(name)
    return sorted(mask - KEEP - set(own))


def sweep_stale(parent: Path) -> None:
    """Remove the cgroups (and kill their processes) that harnesses of test processes now dead left behind —
    a test run killed with SIGKILL cannot tear down. The cgroup's name carries the PID of its test process."""
    for cg in parent.glob(f"{CGROUP_PREFIX}*"):
        owner = cg.name[len(CGROUP_PREFIX):].split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            SystemdNamespace._remove_cgroup(cg)


class Boot(RuntimeError):
    """systemd did not come up in the namespaces."""


class SystemdNamespace:
    """`with SystemdNamespace(workdir, units=[...]) as sd:` boots systemd in fresh namespaces; `sd.systemctl(...)`.

    `units`: unit files (paths) or (name, text) pairs, installed in the namespace's /etc/systemd/system.
    `binds`: host directories bound read-write at their own paths, or (host, inside) pairs: state a test reads
    from outside.
    `devices`: host device nodes (e.g. loop devices made with losetup) bound into the private /dev.
    `workdir`: a host directory of the harness's own: set-up files, the tmpfs mount point, console.log.
    """

    def __init__(self, workdir: Path, units: Iterable[Path | tuple[str, str]] = (),
                 binds: Iterable[Path | tuple[Path, Path]] = (), devices: Iterable[str] = (),
                 boot_timeout: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.units = [(u.name, u.read_text()) if isinstance(u, Path) else u for u in units]
        self.binds = [(Path(b[0]), Path(b[1])) if isinstance(b, tuple) else (Path(b), Path(b)) for b in binds]
        self.devices = list(devices)
        self.boot_timeout = boot_timeout
        self.console_log = self.workdir / "console.log"
        self.setup_log = self.workdir / "setup.log"
        self.cgroup: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd's PID on the host
        self.boot_seconds = 0.0
        self._pty: tuple[int, int] | None = None
        self._drain: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------------
    def __enter__(self) -> SystemdNamespace:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        reason = unavailable()
        if reason is not None:
            raise Boot(reason)
        self._stage()
        parent = cgroup2_parent()
        assert parent is not None
        sweep_stale(parent)
        self.cgroup = parent / f"{CGROUP_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
        self.cgroup.mkdir()
        master, slave = os.openpty()
        self._pty = (master, slave)
        self._drain = threading.Thread(target=self._drain_console, args=(master,), daemon=True)
        self._drain.start()
        words = [w for d in self.devices for w in ("dev", d, d)]
        words += [w for host, inside in self.binds for w in ("bind", str(host), str(inside))]
        words += [w for p in self._foreign_dirs() for w in ("ro", str(p), str(p))]
        inner = ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "--cgroup",
                 "sh", "-c", SETUP, SYSTEMD, str(self.workdir), os.ttyname(slave), *words]
        outer = f"echo $$ > {shlex.quote(str(self.cgroup / 'cgroup.procs'))} && exec {shlex.join(inner)}"
        started = time.monotonic()
        with open(self.setup_log, "wb") as log:
            self.proc = subprocess.Popen(["sh", "-c", outer], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.pid = self._wait_systemd(started + self.boot_timeout)
        self._wait_running(started + self.boot_timeout)
        self.boot_seconds = time.monotonic() - started

    def _stage(self) -> None:
        """Units, masks and the target in workdir/system; generator masks in workdir/generators."""
        system, generators = self.workdir / "system", self.workdir / "generators"
        for d in (system, generators, self.workdir / "mnt"):
            d.mkdir(parents=True, exist_ok=False)
        for name, text in self.units:  # a name may be a drop-in: "NAME.service.d/FILE.conf"
            (system / name).parent.mkdir(parents=True, exist_ok=True)
            (system / name).write_text(text)
        own = [name.split("/")[0].removesuffix(".d") for name, _ in self.units]
        for name in ["timers.target", *units_to_mask(own=own)]:
            (system / name).symlink_to("/dev/null")
        for d in GENERATOR_DIRS:
            if Path(d).is_dir():
                for g in Path(d).iterdir():
                    if not (generators / g.name).is_symlink():
                        (generators / g.name).symlink_to("/dev/null")
        # No core files of services killed by the watchdog (SIGABRT): a pipe in the host's core_pattern would
        # run its helper on the host, a plain pattern would fill the overlay's tmpfs.
        (self.workdir / "manager.conf").write_text("[Manager]\nDefaultLimitCORE=0\n")
        (system / TARGET).write_text(
            "[Unit]\nDescription=standby test harness: the only target booted\n"
            "Wants=systemd-journald.service\nAfter=systemd-journald.service\n")

    def _foreign_dirs(self) -> list[Path]:
        """The checkout and the interpreter's trees when the overlay does not show them: on another file
        system than `/` (its lower layer is `/` alone, not what is mounted under it), or under /tmp (a fresh
        tmpfs inside). Bound in read-only."""
        root = os.stat("/").st_dev
        repo = Path(__file__).resolve().parent.parent
        found: list[Path] = []
        for p in (repo, Path(sys.prefix), Path(sys.base_prefix)):
            p = p.resolve()
            hidden = os.stat(p).st_dev != root or p.is_relative_to("/tmp")
            if hidden and not any(p.is_relative_to(q) for q in found) and not any(
                    p.is_relative_to(host) for host, inside in self.binds if host == inside):
                found.append(p)
        return found

    def _drain_console(self, master: int) -> None:
        with open(self.console_log, "ab") as out:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                if not data:
                    return
                out.write(data)
                out.flush()

    def _wait_systemd(self, deadline: float) -> int:
        """systemd's host PID: the unshare's child once it has exec'd systemd."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            child = self._child()
            if child:
                try:
                    if os.readlink(f"/proc/{child}/exe").endswith("/systemd"):
                        return child
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise Boot(f"the namespace set-up exited ({self.proc.returncode}): {self._logs()}")
            time.sleep(0.01)
        raise Boot(f"systemd did not start within {self.boot_timeout} s: {self._logs()}")

    def _child(self) -> int:
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return 0
        return int(children[0]) if children else 0

    def _wait_running(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            if Path(f"/proc/{self.pid}/root/run/systemd/private").exists():
                left = max(1.0, deadline - time.monotonic())
                try:
                    state = self.run("systemctl", "is-system-running", "--wait", timeout=left).stdout.strip()
                except subprocess.TimeoutExpired:
                    break
                if state == "running":
                    return
                if state == "degraded":
                    failed = self.run("systemctl", "--failed", "--no-legend", "--plain").stdout
                    raise Boot(f"systemd booted degraded; failed units: {failed.strip()}\n{self._logs()}")
            time.sleep(0.01)
        raise Boot(f"systemd not running within {self.boot_timeout} s (state {state!r}): {self._logs()}")

    def _logs(self) -> str:
        parts = []
        for p in (self.setup_log, self.console_log):
            if p.exists():
                parts.append(f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Kill systemd (the whole PID namespace goes with it), then remove our cgroup; bounded waits."""
        if self.proc is not None:
            if self.pid and self._child() == self.pid:
                os.kill(self.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.cgroup is not None and self.cgroup.exists():
            self._remove_cgroup(self.cgroup)
        if self._pty is not None:
            master, slave = self._pty
            os.close(slave)  # the last opener of the console gone, the drain's read ends (EIO)
            if self._drain is not None:
                self._drain.join(timeout=5)
            os.close(master)  # only now: a number closed under a blocked read could be reused by another open
            self._pty = None
        mnt = self.workdir / "mnt"
        if mnt.is_dir():
            mnt.rmdir()

    @staticmethod
    def _remove_cgroup(cgroup: Path) -> None:
        if not _wait(lambda: "populated 0" in (cgroup / "cgroup.events").read_text(), 10):
            (cgroup / "cgroup.kill").write_text("1")  # processes left in our own cgroup: ours
            if not _wait(lambda: "populated 0" in (cgroup / "cgroup.events").read_text(), 10):
                raise RuntimeError(f"processes left in {cgroup}: {(cgroup / 'cgroup.procs').read_text()}")
        for d, _, _ in sorted(os.walk(cgroup), key=lambda t: -len(t[0])):
            os.rmdir(d)

    # -- control ------------------------------------------------------------------------------------
    def run(self, *argv: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess[str]:
        """`argv` run inside (all of PID 1's namespaces and its root), its output as text."""
        res = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed ({res.returncode}): {res.stderr.strip()} {res.stdout}")
        return res

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def journalctl(self, unit: str, *args: str) -> str:
        """The unit's journal lines, message text only."""
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *args, check=True).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, unit: str, name: str) -> str:
        return self.show(unit, name).get(name, "")

    def is_active(self, unit: str) -> str:
        """`active`, `activating`, `failed`…: the unit's ActiveState."""
        return self.prop(unit, "ActiveState")

    def main_pid(self, unit: str) -> int:
        """The unit's main PID as the namespace sees it (0 when none)."""
        return int(self.prop(unit, "MainPID") or 0)

    def n_restarts(self, unit: str) -> int:
        return int(self.prop(unit, "NRestarts") or 0)

    def kill(self, unit: str, sig: str, whom: str = "main") -> None:
        """Send `sig` (e.g. SIGKILL) to the unit's main process (or `all`)."""
        self.systemctl("kill", f"--kill-whom={whom}", f"--signal={sig}", unit)

    def wait_active(self, unit: str, timeout: float = 30) -> None:
        """Until the unit is active; a failed unit or the timeout raises, with the unit's status."""
        def check() -> bool:
            state = self.is_active(unit)
            if state == "failed":
                raise AssertionError(f"{unit} failed:\n{self.status(unit)}")
            return state == "active"

        self.wait(check, timeout, f"{unit} active")

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        if not _wait(predicate, timeout):
            raise AssertionError(f"not {what} within {timeout} s")

    def path(self, inside: str | Path) -> Path:
        """The host's way to a path inside (through PID 1's root)."""
        return Path(f"/proc/{self.pid}/root") / Path(inside).relative_to("/")

    def install(self, name: str, text: str) -> None:
        """Add or replace a unit in the running namespace (then daemon-reload)."""
        self.path(f"/etc/systemd/system/{name}").write_text(text)
        self.systemctl("daemon-reload")

    def status(self, unit: str) -> str:
        res = self.systemctl("status", "--lines=30", unit, check=False)
        return res.stdout + res.stderr


def _wait(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
