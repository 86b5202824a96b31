"""The agent's metrics, pure: its disks' reports in, metric families out (and promtool's word)."""

from __future__ import annotations

import subprocess

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from standby.agent.metrics import families
from tests.tools import need


def disks() -> list[dict]:
    d0 = {"machine": "web01", "disk": "disk0", "dirty_bytes": 65536, "tracking_lost": None, "events_lost": 0,
          "losses": 0, "points": 50, "app_points": 2, "epochs": 60, "inconsistent_epochs": 10,
          "bytes_shipped": 1 << 20, "tracker_cpu_seconds": 0.25, "resync": None, "error": None}
    d1 = {**d0, "disk": "disk1", "dirty_bytes": None, "tracking_lost": "cpu0: the kernel ring buffer reports "
          "dropped events 17", "events_lost": 17, "losses": 1, "resync": {"progress": 0.5}, "error": "broke"}
    return [d0, d1]


class Fixed:
    def collect(self):
        return families(disks())


def page() -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Fixed())
    return generate_latest(reg).decode()


def test_values_per_disk():
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(page()) for s in f.samples}
    d0, d1 = (("disk", "disk0"), ("machine", "web01")), (("disk", "disk1"), ("machine", "web01"))
    assert got[("standby_agent_dirty_bytes", d0)] == 65536
    assert ("standby_agent_dirty_bytes", d1) not in got
    assert got[("standby_agent_tracking_lost", d0)] == 0 and got[("standby_agent_tracking_lost", d1)] == 1
    assert got[("standby_agent_tracker_events_lost_total", d1)] == 17
    assert got[("standby_agent_tracking_losses_total", d1)] == 1
    assert got[("standby_agent_points_total", tuple(sorted((*d0, ("consistency", "crash-consistent")))))] == 48
    assert got[("standby_agent_points_total", tuple(sorted((*d0, ("consistency", "app-consistent")))))] == 2
    assert got[("standby_agent_resync_progress_ratio", d1)] == 0.5
    assert got[("standby_agent_replication_failed", d1)] == 1


def test_promtool_finds_nothing_to_say():
    need("promtool")
    res = subprocess.run(["promtool", "check", "metrics"], input=page(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def test_the_snapshot_is_each_disks_report_with_its_trackings_counters():
    from types import SimpleNamespace

    from standby.agent.metrics import snapshot

    rep = {"dirty_bytes": 4096, "tracking_lost": None, "points": 3, "app_points": 0}
    tracked = SimpleNamespace(name="disk0", report=lambda: dict(rep),
                              tracking=SimpleNamespace(losses=2, tracker=SimpleNamespace(events_lost=9)))
    fullscan = SimpleNamespace(name="disk1", report=lambda: dict(rep),
                               tracking=SimpleNamespace(losses=0, tracker=SimpleNamespace()))
    untracked = SimpleNamespace(name="disk2", report=lambda: dict(rep), tracking=None)
    agent = SimpleNamespace(cfg=SimpleNamespace(name="web01"), disks=[tracked, fullscan, untracked])
    got = {d["disk"]: d for d in snapshot(agent)}
    assert got["disk0"] == {**rep, "machine": "web01", "disk": "disk0", "losses": 2, "events_lost": 9}
    assert got["disk1"]["events_lost"] is None  # the full-scan tracker has no kernel count: absent
    assert got["disk2"]["losses"] is None and got["disk2"]["events_lost"] is None
