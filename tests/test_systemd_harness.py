"""tests/systemdns.py: a real systemd boots as PID 1 of private namespaces, runs a Type=notify service of ours
as it would on a machine (READY=1, restart on failure, watchdog, clean stop, journal) and leaves nothing
behind on the host.

The service is a toy written here: it waits for a gate file before READY=1 (so "active only after READY" is
seen, not guessed), then sends WATCHDOG=1 every 0.2 s with the project's sd_notify, and stops on SIGTERM.
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import systemdns
from tests.systemdns import SystemdNamespace

REASON = systemdns.unavailable()
needs_systemd = pytest.mark.skipif(REASON is not None, reason=REASON or "")

TOY = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from standby.plumbing.notify import sd_notify

    gate = Path(sys.argv[1])
    print("toy: started, waiting for the gate", flush=True)
    while not gate.exists():
        time.sleep(0.05)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    sd_notify("READY=1")
    print("toy: ready", flush=True)
    while not stopping:
        sd_notify("WATCHDOG=1")
        time.sleep(0.2)
    sd_notify("STOPPING=1")
    print("toy: stopped cleanly", flush=True)
""")


def toy_unit(shared: Path) -> str:
    return textwrap.dedent(f"""
        [Unit]
        Description=harness toy: Type=notify with a watchdog

        [Service]
        Type=notify
        ExecStart={sys.executable} {shared / "toy.py"} {shared / "gate"}
        Restart=on-failure
        RestartSec=0.2
        WatchdogSec=2
        TimeoutStartSec=60
        TimeoutStopSec=10
    """)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A host directory bound into the namespace: the toy's script and its gate."""
    d = tmp_path / "shared"
    d.mkdir()
    (d / "toy.py").write_text(TOY)
    return d


@pytest.fixture
def sd(tmp_path: Path, shared: Path) -> Iterator[SystemdNamespace]:
    with SystemdNamespace(tmp_path / "ns", units=[("toy.service", toy_unit(shared))], binds=[shared]) as ns:
        print(f"systemd booted in {ns.boot_seconds:.3f} s")
        try:
            yield ns
        finally:
            print(ns.status("toy.service"))


def started(sd: SystemdNamespace, shared: Path) -> int:
    """Start the toy with its gate open; its main PID once active."""
    (shared / "gate").touch()
    sd.systemctl("start", "toy.service")
    sd.wait_active("toy.service", 30)
    return sd.main_pid("toy.service")


def restarted(sd: SystemdNamespace, before: int, restarts: int) -> Callable[[], bool]:
    def check() -> bool:
        s = sd.show("toy.service", "ActiveState", "MainPID", "NRestarts")
        return s["ActiveState"] == "active" and int(s["MainPID"]) not in (0, before) and \
            int(s["NRestarts"]) == restarts
    return check


@needs_systemd
def test_boots_fast_as_pid_1_without_module_loading(sd: SystemdNamespace) -> None:
    assert sd.boot_seconds < 10, "booting is meant to take well under a second"  # generous: shared CI cores
    assert sd.run("cat", "/proc/1/comm", check=True).stdout.strip() == "systemd"
    bounding = next(line for line in sd.run("cat", "/proc/1/status", check=True).stdout.splitlines()
                    if line.startswith("CapBnd:"))
    assert not int(bounding.split()[1], 16) & (1 << 16), "CAP_SYS_MODULE (16) left in PID 1's bounding set"
    assert sd.prop(systemdns.TARGET, "ActiveState") == "active"
    assert sd.systemctl("is-system-running", check=False).stdout.strip() == "running"


@needs_systemd
def test_the_host_is_out_of_reach(sd: SystemdNamespace, tmp_path: Path) -> None:
    """Writes land in the overlay's tmpfs, /proc/sys and /sys are read-only, the host's units are masked."""
    probe = Path("/var/tmp") / f"standby-harness-probe-{os.getpid()}-{tmp_path.name}"
    assert sd.run("touch", str(probe)).returncode == 0
    assert sd.path(probe).exists() and not probe.exists()
    assert sd.run("sh", "-c", "echo 1 > /proc/sys/kernel/printk_ratelimit").returncode != 0
    assert sd.run("touch", "/sys/kernel/standby-probe").returncode != 0
    for unit in ("timers.target", "systemd-timesyncd.service", "systemd-tmpfiles-setup.service"):
        assert sd.prop(unit, "LoadState") == "masked", unit
    assert sd.run("test", "-e", "/dev/kmsg").returncode != 0


@needs_systemd
def test_active_only_after_ready(sd: SystemdNamespace, shared: Path) -> None:
    sd.systemctl("start", "--no-block", "toy.service")
    sd.wait(lambda: "waiting for the gate" in sd.journalctl("toy.service"), 30, "the toy started")
    assert sd.is_active("toy.service") == "activating"  # running, but no READY=1 yet
    (shared / "gate").touch()
    sd.wait_active("toy.service", 30)
    assert "toy: ready" in sd.journalctl("toy.service")


@needs_systemd
def test_kill_9_is_restarted(sd: SystemdNamespace, shared: Path) -> None:
    first = started(sd, shared)
    assert sd.n_restarts("toy.service") == 0
    sd.kill("toy.service", "SIGKILL")
    sd.wait(restarted(sd, first, 1), 30, "the toy restarted after kill -9")


@needs_systemd
def test_a_stalled_process_is_killed_by_the_watchdog_and_restarted(sd: SystemdNamespace, shared: Path) -> None:
    first = started(sd, shared)
    sd.kill("toy.service", "SIGSTOP")  # alive, but no WATCHDOG=1 any more
    sd.wait(restarted(sd, first, 1), 30, "the toy restarted by the watchdog")
    assert "Watchdog timeout" in sd.journalctl("toy.service")


@needs_systemd
def test_stop_is_clean(sd: SystemdNamespace, shared: Path) -> None:
    started(sd, shared)
    sd.systemctl("stop", "toy.service")
    s = sd.show("toy.service", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert s == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0", "NRestarts": "0"}
    assert "toy: stopped cleanly" in sd.journalctl("toy.service")


@needs_systemd
def test_systemd_analyze_works_inside(sd: SystemdNamespace) -> None:
    """The units' exposure scores (README) come from `systemd-analyze security`, run inside."""
    res = sd.run("systemd-analyze", "security", "--no-pager", "toy.service")
    assert res.returncode == 0 and "Overall exposure level for toy.service" in res.stdout, res.stderr
    assert sd.run("systemd-analyze", "verify", "toy.service").returncode == 0


@needs_systemd
def test_device_nodes_and_directories_bound_in(tmp_path: Path, make_loop: Callable[..., str]) -> None:
    """A loop device made on the host appears in the private /dev; a bound directory is shared both ways."""
    dev = make_loop(1 << 20)
    shared = tmp_path / "state"
    shared.mkdir()
    (shared / "from-host").write_text("host")
    with SystemdNamespace(tmp_path / "ns", binds=[shared], devices=[dev]) as sd:
        mode = sd.run("stat", "-c", "%f %t:%T", dev, check=True).stdout.split()
        st = os.stat(dev)
        assert stat.S_ISBLK(int(mode[0], 16))
        assert mode[1] == f"{os.major(st.st_rdev):x}:{os.minor(st.st_rdev):x}"
        assert sd.run("blockdev", "--getsize64", dev, check=True).stdout.strip() == str(1 << 20)
        assert sd.run("cat", str(shared / "from-host"), check=True).stdout == "host"
        sd.run("sh", "-c", f"echo ns > {shared / 'from-ns'}", check=True)
        assert sd.run("ls", "/dev", check=True).stdout.split().count("loop-control") == 0
    assert (shared / "from-ns").read_text() == "ns\n"


@needs_systemd
def test_teardown_leaves_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "ns"
    with SystemdNamespace(workdir) as sd:
        pid, cgroup, unshare = sd.pid, sd.cgroup, sd.proc
        assert cgroup is not None and cgroup.is_dir() and unshare is not None
    assert unshare.poll() is not None
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/comm").read_text().strip() != "systemd"
    assert not cgroup.exists()
    assert str(workdir) not in Path("/proc/self/mountinfo").read_text()
    assert not (workdir / "mnt").exists()
    assert "Reached target" in (workdir / "console.log").read_text(errors="replace")


@needs_systemd
def test_a_dead_test_process_leftovers_are_swept() -> None:
    """A cgroup of ours whose test process is gone (killed before its teardown) goes at the next boot."""
    parent = systemdns.cgroup2_parent()
    assert parent is not None
    stale = parent / f"{systemdns.CGROUP_PREFIX}{2**22 + 1}-1"  # above any pid_max: that process cannot exist
    (stale / "system.slice").mkdir(parents=True)
    systemdns.sweep_stale(parent)
    assert not stale.exists()


def test_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert systemdns.unavailable() == "needs root: namespaces, mounts and a cgroup of our own"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(systemdns, "SYSTEMD", "/nonexistent/systemd")
    assert systemdns.unavailable() == "no systemd binary at /nonexistent/systemd: apt-get install systemd"


def test_masks_what_the_boot_would_start_on_the_host() -> None:
    masked = systemdns.units_to_mask()
    assert "systemd-tmpfiles-setup.service" in masked
    assert not set(masked) & systemdns.KEEP
    assert not [u for u in masked if u.endswith((".target", ".slice"))]

