"""The fault kinds of the campaign: each injects one fault at a random moment of a storm of writes,
holds it, and undoes it (restart what was killed, SIGCONT what was stopped, free the space). Judging
is the campaign's job, after the deployment has had time to recover.

Every trial starts a storm: 8 MiB up to `storm_max` MiB of 1-4 MiB incompressible writes on disk0 and a
copy burst of files onto the file system of disk1; the fault lands 0.05-1 s into it, so it meets epochs
being cut, read, shipped, cached and applied.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from standby.plumbing.errors import StandbyError

from .rig import MiB, Rig

AGENTS = ("agent-src", "agent-fs")
SMALL_QUOTA = 24 * MiB


class FaultFailure(Exception):
    """The product failed while the fault was injected or undone (the message says how)."""


@dataclass
class TrialContext:
    """One trial's fault: what was done, to whom, whether it bit, and what status said meanwhile."""

    rig: Rig
    rng: random.Random
    number: int
    kind: str
    storm_max: int  # MiB
    logs_at: dict[str, int] = field(default_factory=dict)
    target: str = ""
    effective: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    during: dict[str, Any] | None = None
    cleanup: Callable[[], None] | None = None
    injected_at: float = 0.0

    def storm(self, lo: int = 8, hi: int | None = None) -> None:
        mb = self.rng.randint(lo, max(lo, hi or self.storm_max))
        fs_mb = self.rng.randint(2, 24)
        self.detail.update(storm_mib=mb, fs_copy_mib=fs_mb)
        self.rig.bursts.storm(mb * MiB)
        self.rig.files.copy_burst(fs_mb * MiB)

    def moment(self, lo: float = 0.05, hi: float = 1.0) -> None:
        time.sleep(self.rng.uniform(lo, hi))

    def inject(self) -> None:
        self.injected_at = time.time()

    def snapshot(self) -> None:
        """What an operator running `standby status` saw while the fault was in force."""
        st = self.rig.status(timeout=3)
        if st is None:
            self.during = {"status": "no answer from the process server"}
            return
        self.during = {
            d["machine"]: {k: d.get(k) for k in ("replication", "applying", "error", "alerts", "rpo_seconds")}
            for d in st["disks"]
        }

    def new_log(self, key: str) -> str:
        return self.rig.new_log(key, self.logs_at)

    def any_agent(self) -> str:
        # disk0's agent is where the write-order and burst judges look: it gets three faults in four.
        return "agent-src" if self.rng.random() < 0.75 else "agent-fs"


def reset(c: TrialContext, key: str) -> None:
    c.target = key
    c.storm()
    c.moment(0.1, 0.8)
    c.inject()
    n = c.rig.reset_connections(key)
    c.effective = n > 0
    c.detail["connections_reset"] = n
    time.sleep(0.5)
    c.snapshot()


def reset_agent(c: TrialContext) -> None:
    """TCP reset of an agent's connection to the process server (both ends), mid-storm."""
    reset(c, c.any_agent())


def reset_mt(c: TrialContext) -> None:
    """TCP reset of the master target's connection to the process server (both ends)."""
    reset(c, "mt-mt1")


def kill9(c: TrialContext, key: str) -> None:
    c.target = key
    c.storm()
    c.moment()
    c.inject()
    c.rig.dep.kill(key, signal.SIGKILL)
    c.effective = True
    time.sleep(c.rng.uniform(0.0, 1.0))
    if key != "ps":
        c.snapshot()
    c.rig.start(key)


def kill_ps(c: TrialContext) -> None:
    """kill -9 of the process server; started again after 0-1 s."""
    kill9(c, "ps")


def kill_mt(c: TrialContext) -> None:
    """kill -9 of the master target; started again after 0-1 s."""
    kill9(c, "mt-mt1")


def kill_agent(c: TrialContext) -> None:
    """kill -9 of an agent (an unclean stop: a resync is expected and counted); started again."""
    kill9(c, c.any_agent())


def stop(c: TrialContext, key: str) -> None:
    c.target = key
    c.storm()
    c.moment()
    c.inject()
    held = c.rng.uniform(1.0, 5.0)
    c.detail["stopped_seconds"] = round(held, 2)
    c.effective = c.rig.signal(key, signal.SIGSTOP)
    try:
        time.sleep(held)
        if key != "ps":
            c.snapshot()
    finally:
        c.rig.cont(key)


def stop_ps(c: TrialContext) -> None:
    """SIGSTOP of the process server for 1-5 s, then SIGCONT."""
    stop(c, "ps")


def stop_mt(c: TrialContext) -> None:
    """SIGSTOP of the master target for 1-5 s, then SIGCONT."""
    stop(c, "mt-mt1")


def stop_agent(c: TrialContext) -> None:
    """SIGSTOP of an agent for 1-5 s, then SIGCONT (its kernel trace buffer keeps recording)."""
    stop(c, c.any_agent())


def fill(c: TrialContext, mnt_name: str, key: str, words: tuple[str, ...]) -> None:
    rig = c.rig
    mnt = rig.cache_mnt if mnt_name == "cache" else rig.retention_mnt
    c.target = f"{mnt_name} volume"
    leave = c.rng.randint(0, 4) * MiB
    c.storm(24)
    c.moment()
    c.inject()
    c.detail["ballast_bytes"] = rig.ballast(mnt, leave)
    c.detail["free_bytes"] = rig.free_bytes(mnt)
    try:
        time.sleep(c.rng.uniform(2.0, 4.0))
        c.snapshot()
    finally:
        rig.remove_ballast(mnt)
    text = c.new_log(key).lower()
    c.effective = any(w in text for w in words)


def cache_full(c: TrialContext) -> None:
    """The process server's cache volume filled to 0-4 MiB free by a ballast file for 2-4 s, under a
    storm; then the ballast is deleted."""
    fill(c, "cache", "ps", ("no space", "enospc", "full"))


def retention_full(c: TrialContext) -> None:
    """The master target's retention volume filled to 0-4 MiB free by a ballast file for 2-4 s, under a
    storm; then the ballast is deleted."""
    fill(c, "retention", "mt-mt1", ("no space", "enospc", "full", "prun", "pressure"))


def cache_quota(c: TrialContext) -> None:
    """A cache quota (24 MiB) smaller than the churn: the process server restarted with it, a storm of
    64-128 MiB; recovery is judged with the small quota still in force (the churn has stopped: it must
    converge, not livelock); after judging the quota is restored (another restart)."""
    rig = c.rig
    c.target = "ps"
    c.inject()
    rig.dep.set_ps_option(cache_quota=SMALL_QUOTA)
    t = time.monotonic()
    rig.restart("ps")
    c.detail["restart_seconds"] = round(time.monotonic() - t, 2)
    c.storm(64, max(128, c.storm_max))
    rig.bursts.wait_storm(60)
    c.snapshot()
    text = c.new_log("ps").lower() + c.new_log("agent-src").lower() + c.new_log("agent-fs").lower()
    c.effective = "quota" in text or "busy" in text

    def restore() -> None:
        rig.dep.set_ps_option(cache_quota=rig.quota)
        rig.restart("ps")

    c.cleanup = restore


def damage_cache(c: TrialContext) -> None:
    """A damaged last record of the newest cache segment of a disk: the master target is stopped so that
    the cache holds what it acknowledged, the agents are stopped so nothing is being appended, the process
    server is killed (-9), bytes of the last record's payload are flipped, and it all starts again."""
    rig = c.rig
    machine = "src" if c.rng.random() < 0.7 else "fs"
    c.target = f"cache of {machine}/{'disk0' if machine == 'src' else 'disk1'}"
    rig.signal("mt-mt1", signal.SIGSTOP)
    stopped: list[str] = []
    try:
        c.storm(16, 48)
        rig.bursts.wait_storm(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # something must wait in the cache for the master target
            st = rig.status(timeout=3)
            d = rig.disk_status(st, machine) if st else None
            if d and d.get("backlog_records"):
                break
            time.sleep(0.2)
        for key in AGENTS:
            if rig.signal(key, signal.SIGSTOP):
                stopped.append(key)
        time.sleep(0.5)  # appends in progress finish and are acknowledged
        c.inject()
        rig.dep.kill("ps", signal.SIGKILL)
        info = rig.damage_last_cache_record(machine)
        c.effective = info is not None
        c.detail["damaged"] = info
        try:
            rig.start("ps")
        except StandbyError as exc:
            # One damaged record must not stop the process server for every disk (issue 9, finding 7). Do
            # what the operator is told to do so the campaign can go on, and report it.
            refused = str(exc)
            aside = rig.cache_dir.parent / f"aside-{c.number}"
            aside.mkdir(exist_ok=True)
            if info is not None:
                seg = rig.cache_dir / f"disk-{rig.disks[machine].disk_id}" / info["segment"]
                seg.rename(aside / seg.name)
            rig.start("ps")
            raise FaultFailure(f"the process server did not start after the damaged record ({refused}); "
                               f"started after moving the segment aside") from None
    finally:
        for key in stopped:
            rig.cont(key)
        rig.cont("mt-mt1")
    time.sleep(1.0)
    c.snapshot()


KINDS: dict[str, Callable[[TrialContext], None]] = {
    "reset-agent": reset_agent,
    "reset-mt": reset_mt,
    "kill-ps": kill_ps,
    "kill-mt": kill_mt,
    "kill-agent": kill_agent,
    "stop-ps": stop_ps,
    "stop-mt": stop_mt,
    "stop-agent": stop_agent,
    "cache-full": cache_full,
    "retention-full": retention_full,
    "cache-quota": cache_quota,
    "damage-cache": damage_cache,
}
