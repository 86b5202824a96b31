"""`standby status` lines (standby.admin.cli.format_status): units and the words a new user read wrong."""

from __future__ import annotations

from typing import Any

from standby.admin.cli import format_status

MiB = 1 << 20


def disk(**over: Any) -> dict[str, Any]:
    d = {"machine": "web01", "disk": "sda", "replication": "Delta", "disk_state": "UpToDate", "size": 1 << 30,
         "progress": 1.0, "rate": 0, "eta_seconds": None, "mt": "mt01", "replica": "/r/web01-sda.vmdk",
         "format": "vmdk", "bytes_received": 120 * MiB, "bytes_data": 64 * MiB, "bytes_wire": 64 * MiB,
         "bytes_applied": 120 * MiB, "compression_ratio": 1.0, "backlog_records": 13, "rpo_seconds": 1.5,
         "points_last_minute": 40, "dirty_bytes": 0, "backlog_bytes": 0, "tracker": "tracefs",
         "tracker_cpu_seconds": 0.1, "applying": "running", "alerts": [], "error": None}
    d.update(over)
    return d


def status(*disks: dict[str, Any]) -> str:
    return format_status({"disks": list(disks), "cache_bytes": 0, "cache_quota": 1 << 30,
                          "master_targets": ["mt01"]})


def test_what_made_the_wire_smaller_and_the_backlog_unit() -> None:
    text = status(disk())
    # 120 MiB received, 64 MiB on the wire: 56 MiB of zeros never sent, the data itself did not compress.
    assert "received:120.0 MiB wire:64.0 MiB (zeros-not-sent:56.0 MiB data-compressed:1.00x)" in text
    assert "backlog:13-records" in text


def test_no_rpo_while_failed_over() -> None:
    text = status(disk(replication="Committed", rpo_seconds=None))
    assert "rpo:-(failed-over:nothing-replicates)" in text
    assert "rpo:1.5s" in status(disk())
