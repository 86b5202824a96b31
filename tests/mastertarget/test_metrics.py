"""The master target's metrics, pure: a snapshot of its state in, metric families out (and promtool's
word on the page)."""

from __future__ import annotations

import subprocess

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from standby.mastertarget.disk import ApplyStats
from standby.mastertarget.metrics import families
from tests.tools import need


def snap() -> dict:
    d0 = {"machine": "web01", "disk": "disk0", "journal_bytes": 1 << 20, "points": 12, "applied_seq": 340,
          "records": 300, "bytes": 9 << 20, "groups": 80, "seconds": 2.5, "failed": False, "halted": False}
    d1 = {**d0, "disk": "disk1", "points": None, "groups": 0, "seconds": 0.0, "records": 0, "bytes": 0,
          "failed": True}
    return {"disks": [d0, d1], "volume_free": 5 << 30, "volume_size": 20 << 30, "unopened": 1}


class Fixed:
    def collect(self):
        return families(snap())


def page() -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Fixed())
    return generate_latest(reg).decode()


def test_values_per_disk_and_for_the_volume():
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(page()) for s in f.samples}
    d0, d1 = (("disk", "disk0"), ("machine", "web01")), (("disk", "disk1"), ("machine", "web01"))
    assert got[("standby_mt_retention_journal_bytes", d0)] == 1 << 20
    assert got[("standby_mt_recovery_points", d0)] == 12
    assert ("standby_mt_recovery_points", d1) not in got  # no upkeep report yet: unknown, not 0
    assert got[("standby_mt_applied_bytes_total", d0)] == 9 << 20
    assert got[("standby_mt_apply_duration_seconds_count", d0)] == 80
    assert got[("standby_mt_apply_duration_seconds_sum", d0)] == 2.5
    assert got[("standby_mt_apply_failed", d1)] == 1
    assert got[("standby_mt_retention_volume_free_bytes", ())] == 5 << 30
    assert got[("standby_mt_disks_unopened", ())] == 1


def test_apply_stats_add_up():
    s = ApplyStats()
    s.applied(3, 4096, 0.5)
    s.applied(1, 0, 0.25)
    assert (s.records, s.bytes, s.groups, s.seconds) == (4, 4096, 2, 0.75)


def test_promtool_finds_nothing_to_say():
    need("promtool")
    res = subprocess.run(["promtool", "check", "metrics"], input=page(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def test_the_snapshot_reads_the_open_disks_the_last_report_and_the_volume(tmp_path):
    from types import SimpleNamespace

    from standby.mastertarget.metrics import snapshot

    stats = ApplyStats()
    stats.applied(2, 8192, 0.125)
    w = SimpleNamespace(state=SimpleNamespace(machine="web01", name="disk0", applied_seq=77), stats=stats,
                        journal=SimpleNamespace(bytes=4096), error=None, halted=False)
    mt = SimpleNamespace(workers={3: w}, failed={4: "cannot open"}, history={"3": {"points": 5}},
                         retention_dir=tmp_path)
    got = snapshot(mt)
    (d,) = got["disks"]
    assert d == {"machine": "web01", "disk": "disk0", "journal_bytes": 4096, "points": 5, "applied_seq": 77,
                 "records": 2, "bytes": 8192, "groups": 1, "seconds": 0.125, "failed": False, "halted": False}
    assert got["unopened"] == 1 and 0 < got["volume_free"] <= got["volume_size"]
    mt.retention_dir = tmp_path / "gone"
    assert snapshot(mt)["volume_free"] is None  # unknown, so absent from the page
