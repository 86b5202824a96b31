"""The process server's metrics, pure: a status dictionary in, metric families out — the names, the values
taken from status, what is left out when status does not know, and promtool's word on the page."""

from __future__ import annotations

import subprocess

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from standby.processserver.metrics import families
from tests.tools import need

NOW = 1_700_000_100.0


def disk(name: str = "disk0", **over: object) -> dict:
    d = {
        "machine": "web01", "disk": name, "size": 1 << 30, "replication": "Delta", "disk_state": "UpToDate",
        "mt": "mt01", "replica": f"/srv/replicas/web01-{name}.vmdk", "format": "vmdk", "progress": 1.0,
        "received_seq": 120, "applied_seq": 117, "rate": 2048.0, "receive_rate": 4096.0, "bytes_received": 10_000,
        "bytes_wire": 4_000, "bytes_applied": 9_000, "backlog_records": 3, "cache_bytes": 65_536,
        "refused_records": 0, "problems": [], "journal_bytes": 1 << 20, "history_points": 42, "rpo_seconds": 1.5,
        "latest_point_time": NOW - 0.5, "points_last_minute": 55, "dirty_bytes": 8192, "backlog_bytes": 12_288,
        "resync": None, "applying": "running",
    }
    d.update(over)
    return d


def status(*disks: dict) -> dict:
    return {"disks": list(disks), "cache_bytes": 65_536, "cache_quota": 1 << 30, "master_targets": ["mt01"],
            "rpo_threshold": 900.0}


class Fixed:
    def __init__(self, st: dict) -> None:
        self.st = st

    def collect(self):
        return families(self.st, NOW)


def page(st: dict) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Fixed(st))
    return generate_latest(reg).decode()


def samples(st: dict) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(page(st)) for s in f.samples}


def test_per_disk_values_come_from_status():
    got = samples(status(disk()))
    lab = (("disk", "disk0"), ("machine", "web01"))
    assert got[("standby_disk_rpo_seconds", lab)] == 1.5
    assert got[("standby_disk_last_point_age_seconds", lab)] == 0.5
    assert got[("standby_disk_points_per_minute", lab)] == 55
    assert got[("standby_disk_dirty_bytes", lab)] == 8192
    assert got[("standby_disk_cache_backlog_bytes", lab)] == 12_288
    assert got[("standby_disk_cache_backlog_records", lab)] == 3
    assert got[("standby_disk_applied_sequence", lab)] == 117
    assert got[("standby_disk_received_sequence", lab)] == 120
    assert got[("standby_disk_applied_bytes_total", lab)] == 9_000
    assert got[("standby_disk_replication_state", (*lab, ("state", "Delta")))] == 1
    assert got[("standby_disk_replication_state", (*lab, ("state", "Resync")))] == 0
    assert got[("standby_disk_applying_state", (*lab, ("state", "running")))] == 1
    assert got[("standby_ps_cache_bytes", ())] == 65_536
    assert got[("standby_ps_cache_quota_bytes", ())] == 1 << 30
    assert got[("standby_ps_master_target_connected", (("mt", "mt01"),))] == 1


def test_unknown_values_are_absent_not_zero():
    """Failed over: no RPO; no fresh agent report: no dirty bytes; no point yet: no age."""
    got = samples(status(disk(rpo_seconds=None, dirty_bytes=None, latest_point_time=None, replication="FailedOver",
                              applying="failed-over")))
    names = {n for n, _ in got}
    assert "standby_disk_rpo_seconds" not in names
    assert "standby_disk_dirty_bytes" not in names
    assert "standby_disk_last_point_age_seconds" not in names
    lab = (("disk", "disk0"), ("machine", "web01"))
    assert got[("standby_disk_replication_state", (*lab, ("state", "FailedOver")))] == 1
    assert got[("standby_disk_applying_state", (*lab, ("state", "failed-over")))] == 1


def test_alerts_resync_progress_and_an_unprotected_disk():
    rpo = {"key": "rpo", "text": "RPO 1000 s is over the threshold", "since": NOW - 100, "level": "alert"}
    got = samples(status(
        disk(problems=[rpo], replication="Resync", resync={"progress": 0.25, "phase": "hashing"}),
        disk("disk1", mt=None, replica=None, format=None, applying="-", replication="Off", rpo_seconds=None),
    ))
    lab0, lab1 = (("disk", "disk0"), ("machine", "web01")), (("disk", "disk1"), ("machine", "web01"))
    assert got[("standby_disk_alert", (*lab0, ("problem", "rpo"), ("severity", "alert")))] == 1
    assert got[("standby_disk_resync_progress_ratio", lab0)] == 0.25
    assert ("standby_disk_resync_progress_ratio", lab1) not in got
    assert got[("standby_disk_applying_state", (*lab1, ("state", "none")))] == 1
    assert got[("standby_disk_info", tuple(sorted((*lab1, ("format", ""), ("mt", ""), ("replica", "")))))] == 1


def test_promtool_finds_nothing_to_say():
    need("promtool")
    text = page(status(disk(), disk("disk1", replication="Initial", progress=0.3, rpo_seconds=None)))
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr
