"""Typed control requests and replies (`standby.proto.requests`): round trips of every op, the refusals
issue 9 finding 5 asks for, agreement with what today's daemons send, and a fuzz property.

Rule under test: whatever JSON a peer sends as a request's args, a reply's result or a MARKER's meta,
`parse_request` / `parse_reply` / `MarkerMeta.from_marker` return a typed, valid object or raise
BadRequest naming the op and the field — never any other exception.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math
import os
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.proto import requests as rq
from standby.proto.errors import LocalProtocolError, RemoteProtocolError
from standby.proto.messages import ROLES, meta_bytes
from standby.proto.requests import BadRequest

FAST = settings(max_examples=60, deadline=None)
FUZZ = settings(max_examples=300, deadline=None)

UID = "0b9c3f7e-52d4-4a57-9c1e-3f5a1d2b6c70"
T = 1_780_000_000.5  # a time in 2026
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
CSR = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
KEY = base64.b64encode(bytes(126)).decode()
NONCE = base64.b64encode(bytes(range(16))).decode()
SEALED = base64.b64encode(bytes(60)).decode()

FAILOVER_INFO = {
    "latest": 90,
    "at": 40,
    "target": 40,
    "point_time": T,
    "started_at": T + 5,
    "committed": False,
    "step": {"op": 1, "src": 40, "dst": 60},
}
POINT = {"sequence": 40, "time": T, "consistency": "app-consistent", "tag": "before upgrade", "history_bytes": 4096}
POINT_LIST = {"points": [POINT], "journal_bytes": 1 << 20, "applied_seq": 90, "alert": "", "failover": FAILOVER_INFO}
REPORT = {
    "tracker": "tracefs",
    "tracking_lost": None,
    "dirty_bytes": 8192,
    "tracker_cpu_seconds": 0.25,
    "epochs": 12,
    "points": 10,
    "inconsistent_epochs": 2,
    "last_inconsistent_reason": "block 7 written after the cut",
    "bytes_shipped": 1 << 20,
    "app_points": 1,
    "last_app_point": {"time": T, "freeze_seconds": 0.012, "tag": "nightly"},
    "resync": {
        "mode": "checksum",
        "reason": "unclean stop",
        "phase": "hashing",
        "progress": 0.5,
        "eta_seconds": None,
        "bytes_differing": 0,
        "bytes_shipped": 0,
        "hash_bytes": 4096,
        "elapsed": 3.5,
    },
    "resync_pending": ["checksum", "unclean stop"],
}
APP_DISK = {
    "disk": "sda",
    "sequence": 41,
    "consistency": "app-consistent",
    "time": T,
    "freeze_seconds": 0.02,
    "reason": "",
}
NO_POINT = {
    "disk": "sdb",
    "sequence": None,
    "consistency": None,
    "time": None,
    "freeze_seconds": None,
    "reason": "not in delta replication",
}
STATUS_DISK = {
    "machine": "web01",
    "disk": "sda",
    "path": "/dev/sda",
    "size": 1 << 30,
    "replication": "Delta",
    "disk_state": "UpToDate",
    "mt": "mt1",
    "replica": "/srv/r/web01-sda.vmdk",
    "format": "vmdk",
    "progress": 1.0,
    "bytes_done": 1 << 30,
    "rate": 0.0,
    "eta_seconds": 0.0,
    "compression_ratio": None,
    "bytes_received": 1,
    "bytes_data": 1,
    "bytes_wire": 1,
    "bytes_applied": 1,
    "received_seq": 9,
    "applied_seq": 9,
    "backlog_records": 0,
    "backlog_bytes": 0,
    "error": None,
    "applying": "running",
    "alerts": ["RPO 1000 s exceeds the 900 s threshold"],
    "resync": None,
    "failover": {"at": 3, "committed": False},
}

# (op, sender) -> (request args, reply result): what today's daemons send, field for field.
EXAMPLES: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {
    ("disk_open", "agent"): (
        {"name": "sda", "path": "/dev/sda", "size": 1 << 30, "uid": UID},
        {
            "disk": 3,
            "replication": "Initial",
            "protected": True,
            "generation": 1,
            "next_sequence": 1,
            "cursor": 0,
            "initial_complete": False,
            "key_needed": True,
            "seed": False,
            "resync": {"mode": "checksum", "reason": "requested by the operator"},
            "mt_cert": PEM,
        },
    ),
    ("disk_key", "agent"): ({"disk": 3, "wrapped_key": KEY}, {}),
    ("disk_report", "agent"): ({"disk": 3, "report": REPORT}, {"resync": None}),
    ("resync_begin", "agent"): (
        {"disk": 3, "generation": 2, "mode": "full", "reason": "disk resized"},
        {"generation": 2},
    ),
    ("resync_hashes", "agent"): (
        {"disk": 3, "generation": 2, "query": {"level": 1, "parents": [0, 5], "nonce": NONCE}},
        {"sealed": SEALED},
    ),
    ("about", "agent"): ({"system_uuid": "4213a1b2-5c6d-7e8f-9a0b-1c2d3e4f5a6b", "hostname": "web01.example.net"}, {}),
    ("about", "mt"): ({"system_uuid": "", "hostname": "mt01"}, {}),
    ("subscribe", "mt"): (
        {},
        {
            "disks": [
                {
                    "disk": 3,
                    "machine": "web01",
                    "name": "sda",
                    "uid": UID,
                    "size": 1 << 30,
                    "replica_path": "/srv/r/web01-sda.vmdk",
                    "replica_format": "vmdk",
                    "wrapped_key": KEY,
                    "seed": False,
                }
            ],
            "cache_dir": "/var/lib/standby/ps/cache",
            "host": "4c4c4544004d3610804cb4c04f4e3032",
        },
    ),
    ("pull", "mt"): ({"disk": 3, "applied_seq": 0}, {"received_seq": 12, "skip_to": 0}),
    ("mt_report", "mt"): (
        {
            "disks": {
                "3": {
                    "points": 4,
                    "oldest_point": T,
                    "newest_point": T + 60,
                    "journal_bytes": 1 << 20,
                    "alert": "",
                    "failed_over": None,
                }
            }
        },
        {},
    ),
    ("check_replica", "ps"): (
        {"path": "/srv/r/web01-sda.vmdk", "format": "vmdk", "size": 1 << 30, "existing": False},
        {},
    ),
    ("find_device", "ps"): (
        {"name": "wwn-0x6000c29a1b2c3d4e5f60718293a4b5c6", "size": 1 << 30, "wait": 60.0},
        {"path": "/dev/disk/by-id/wwn-0x6000c29a1b2c3d4e5f60718293a4b5c6"},
    ),
    ("resync_hashes", "ps"): (
        {"disk": 3, "generation": 2, "query": {"level": None, "parents": None, "nonce": NONCE}, "size": 1 << 30},
        {"sealed": SEALED},
    ),
    ("points", "ps"): ({"disk": 3}, {"disk": 3, **POINT_LIST}),
    ("failover", "ps"): (
        {"disk": 3, "sequence": 40},
        {
            "disk": 3,
            "sequence": 40,
            "time": T,
            "replica": "/srv/r/web01-sda.vmdk",
            "format": "vmdk",
            "bytes_written": 8192,
            "seconds": 0.5,
        },
    ),
    ("failover_commit", "ps"): (
        {"disk": 3},
        {"disk": 3, "sequence": 40, "time": T, "replica": "/srv/r/web01-sda.vmdk"},
    ),
    ("test_failover", "ps"): (
        {"disk": 3, "sequence": 40, "directory": None},
        {
            "disk": 3,
            "sequence": 40,
            "time": T,
            "path": "/srv/r/web01-sda-test-40.vmdk",
            "format": "raw",
            "copy_seconds": 1.5,
            "undo_groups": 3,
            "bytes_undone": 65536,
            "seconds": 2.0,
        },
    ),
    ("test_failover_cleanup", "ps"): ({"disk": 3}, {"disk": 3, "removed": ["/srv/r/web01-sda-test-40.vmdk"]}),
    ("wake", "ps"): ({}, {}),
    ("app_point", "ps"): ({"tag": "before upgrade"}, {"disks": [APP_DISK, NO_POINT], "warnings": ["pre-script slow"]}),
    ("status", "admin"): (
        {"machine": None},
        {
            "disks": [STATUS_DISK],
            "cache_bytes": 0,
            "cache_quota": 1 << 30,
            "master_targets": ["mt1"],
            "rpo_threshold": 900.0,
            "roundtrips": [{"name": "web01", "direction": "reverse", "phase": "reprotecting",
                            "state": "reprotecting 43 %", "history": [{"phase": "reprotecting", "started": T}]}],
        },
    ),
    ("machines", "admin"): ({}, {"machines": [
        {"name": "web01", "role": "agent", "enrolled_at": T, "system_uuid": "4213a1b2-5c6d-7e8f-9a0b-1c2d3e4f5a6b",
         "hostname": "web01.example.net", "reported_at": T + 60},
        {"name": "mt01", "role": "mt", "enrolled_at": T, "system_uuid": "", "hostname": "mt01", "reported_at": T},
        {"name": "db01", "role": "agent", "enrolled_at": T, "system_uuid": None, "hostname": None,
         "reported_at": None},
    ]}),
    ("protect", "admin"): (
        {
            "machine": "web01",
            "mt": "mt1",
            "format": "raw",
            "replica_dir": "/srv/r",
            "replicas": {"sdb": "/dev/sdx"},
            "existing": False,
            "datastore": None,
        },
        {"disks": [{"disk": "sda", "replica": "/srv/r/web01-sda.img"},
                   {"disk": "sdb", "replica": "/dev/disk/by-id/wwn-0x6000c29a", "vmdk": "[ds1] web01/sdb.vmdk"}]},
    ),
    ("pause", "admin"): ({"machine": "web01"}, {}),
    ("resume", "admin"): ({"machine": "web01"}, {}),
    ("resync", "admin"): ({"machine": "web01", "full": True, "disk": None}, {"disks": ["sda", "sdb"]}),
    ("points", "admin"): (
        {"machine": "web01"},
        {"machine": "web01", "disks": [{"disk": "sda", "disk_id": 3, **POINT_LIST}]},
    ),
    ("failover", "admin"): (
        {"machine": "web01", "point": "latest", "at": None},
        {
            "machine": "web01",
            "disks": [
                {
                    "disk": "sda",
                    "disk_id": 3,
                    "sequence": 40,
                    "time": T,
                    "replica": "/srv/r/web01-sda.vmdk",
                    "format": "vmdk",
                    "bytes_written": 0,
                    "seconds": 0.1,
                    "consistency": "crash-consistent",
                    "tag": "",
                }
            ],
        },
    ),
    ("commit", "admin"): (
        {"machine": "web01", "vm": "alternate", "vm_name": "web01-recovered", "power_on": True},
        {
            "machine": "web01",
            "disks": [{"disk": "sda", "disk_id": 3, "sequence": 40, "time": T, "replica": "/srv/r/web01-sda.vmdk"}],
            "vm": {"vm_uuid": "50123456-1234-1234-1234-123456789abc", "what": "new VM web01-recovered on host h1",
                   "files": ["[ds1] web01/sda.vmdk"]},
        },
    ),
    ("test_failover", "admin"): (
        {"machine": "web01", "point": None, "at": T, "directory": "/srv/test"},
        {
            "machine": "web01",
            "disks": [
                {
                    "disk": "sda",
                    "disk_id": 3,
                    "sequence": 40,
                    "time": T,
                    "path": "/srv/test/web01-sda.vmdk",
                    "format": "vmdk-sparse",
                    "copy_seconds": 1.0,
                    "undo_groups": 0,
                    "bytes_undone": 0,
                    "seconds": 1.2,
                    "consistency": "app-consistent",
                    "tag": "t",
                    "replication": "Delta",
                }
            ],
        },
    ),
    ("test_failover_cleanup", "admin"): (
        {"machine": "web01"},
        {"machine": "web01", "disks": [{"disk": "sda", "removed": []}]},
    ),
    ("app_point", "admin"): (
        {"machine": "web01", "tag": ""},
        {"machine": "web01", "disks": [APP_DISK], "warnings": []},
    ),
    ("unprotect", "admin"): (
        {"machine": "web01", "delete_replicas": False},
        {"machine": "web01", "disks": [{"disk": "sda", "mt": "mt01", "replica": "/srv/r/web01-sda.vmdk",
                                        "journal": "/mnt/retention/u.unprotected-3", "removed": []}]},
    ),
    ("forget", "admin"): ({"machine": "web01"}, {}),
    ("reprotect", "admin"): (
        {"machine": "web01", "agent": "web01-rec", "mt": "mt-home", "location": "original", "format": None,
         "replica_dir": None, "replicas": {"sda": "/dev/sdb"}, "full": False, "existing": False,
         "rpo_threshold": None},
        {"machine": "web01", "agent": "web01-rec", "mt": "mt-home", "mode": "checksum",
         "disks": [{"disk": "sda", "replica": "/dev/sdb"}]},
    ),
    ("failback", "admin"): (
        {"machine": "web01", "action": "complete", "sync": "before-shutdown"},
        {"machine": "web01", "phase": "failed-back", "message": "failed back with no data loss",
         "result": {"downtime_seconds": 2.5, "bytes_after_shutdown": 4096, "no_data_loss": True}},
    ),
    ("reverse", "admin"): (
        {"machine": "web01"},
        {"machine": "web01", "mt": "mt01", "disks": [{"disk": "sda", "replica": "/srv/r/web01-sda.vmdk"}]},
    ),
    ("vcenter_add", "admin"): (
        {"name": "vc1", "host": "vcenter.example.com", "port": 443, "user": "administrator@vsphere.local",
         "password": "s3cret", "fingerprint": None, "replace": False},
        {"name": "vc1", "fingerprint": "sha256:" + "ab" * 32, "pinned_now": True,
         "about": "VMware vCenter Server 6.5.0 build-5973321"},
    ),
    ("vcenter_list", "admin"): (
        {},
        {"vcenters": [{"name": "vc1", "host": "vcenter.example.com", "port": 443, "user": "admin",
                       "fingerprint": "sha256:" + "ab" * 32, "added_at": 1.7e9}]},
    ),
    ("vcenter_remove", "admin"): ({"name": "vc1"}, {}),
    ("vcenter_vms", "admin"): (
        {"name": "vc1"},
        {"vcenter": "vc1", "vms": [{"name": "web01", "power_state": "poweredOn", "machine": "web01",
                                    "disks": [{"file": "[ds1] web01/web01.vmdk", "capacity_bytes": 1 << 30}]}]},
    ),
    ("mt_check", "admin"): (
        {"mt": "mt01", "machines": ["web01"], "fix": False},
        {"mt": "mt01", "vcenter": "vc1", "vm": "mt01-vm",
         "findings": [{"rule": "enable-uuid", "title": "disk.EnableUUID is TRUE", "ok": False,
                       "detail": "disk.EnableUUID is not set", "fix": "set disk.EnableUUID=TRUE"}],
         "fixed": []},
    ),
    ("shutdown", "ps"): ({"tag": "failback-final"},
                         {"disks": [APP_DISK], "warnings": [], "shutdown_script": "/etc/standby/stop-workload"}),
    ("start_workload", "ps"): ({}, {"started": False, "reason": "no start_script in agent.toml"}),
    ("release", "ps"): (
        {"disks": [3], "delete": True},
        {"disks": [{"disk": 3, "replica": "/srv/r/web01-sda.vmdk", "journal": None,
                    "removed": ["/srv/r/web01-sda.vmdk", "/srv/r/web01-sda-flat.vmdk"]}]},
    ),
    ("ca", "enroll"): ({}, {"ca_pem": PEM}),
    ("enroll", "enroll"): (
        {"name": "web01", "role": "agent", "passphrase": "correct horse", "csr": CSR, "replace": False},
        {"cert_pem": PEM, "ca_pem": PEM},
    ),
}

# The three MARKER metas the agent writes, and the journal's own.
METAS = [
    {"generation": 1, "kind": "initial-complete", "time": T},
    {
        "generation": 2,
        "kind": "resync-complete",
        "mode": "checksum",
        "reason": "unclean stop",
        "bytes_differing": 4096,
        "time": T,
    },
    {"generation": 2, "kind": "point", "consistency": "crash-consistent", "time": T},
    {"generation": 2, "kind": "point", "consistency": "crash-consistent", "time": T, "tag": "x"},
    {"generation": 2, "kind": "point", "consistency": "app-consistent", "time": T, "tag": "x", "freeze_seconds": 0.01},
    {"generation": 2, "kind": "batch", "first": 7},
    {"generation": 2, "kind": "batch", "consistency": "crash-consistent", "time": 1_780_000_000, "first": 7},
]


def bad(exc: pytest.ExceptionInfo[BadRequest], code: str, *parts: str) -> None:
    assert exc.value.code == code, (exc.value.code, str(exc.value))
    for p in parts:
        assert p in str(exc.value), (p, str(exc.value))


# ---- the table --------------------------------------------------------------------------------------


def test_every_op_has_an_example_and_the_table_is_consistent():
    assert set(EXAMPLES) == set(rq.OPS)
    for (op, sender), spec in rq.OPS.items():
        assert spec.op == op and spec.sender == sender
        assert sender in ROLES and all(s in ROLES for s in spec.served_by)
        assert issubclass(spec.request, rq.Wire) and issubclass(spec.reply, rq.Wire)


def test_today_ops_by_sender():
    """The inventory of issue 9: every request op that exists, by who sends it."""
    by_sender: dict[str, set[str]] = {}
    for op, sender in rq.OPS:
        by_sender.setdefault(sender, set()).add(op)
    assert by_sender == {
        "agent": {"disk_open", "disk_key", "disk_report", "resync_begin", "resync_hashes", "about"},
        "mt": {"subscribe", "pull", "mt_report", "about"},
        "ps": {
            "check_replica",
            "find_device",
            "resync_hashes",
            "points",
            "failover",
            "failover_commit",
            "test_failover",
            "test_failover_cleanup",
            "wake",
            "app_point",
            "release",
            "shutdown",
            "start_workload",
        },
        "admin": {
            "status",
            "machines",
            "protect",
            "pause",
            "resume",
            "resync",
            "points",
            "failover",
            "commit",
            "test_failover",
            "test_failover_cleanup",
            "app_point",
            "unprotect",
            "forget",
            "reprotect",
            "failback",
            "reverse",
            "vcenter_add",
            "vcenter_list",
            "vcenter_remove",
            "vcenter_vms",
            "mt_check",
        },
        "enroll": {"ca", "enroll"},
    }
    assert rq.OPS[("wake", "ps")].served_by == ("agent", "mt")
    assert rq.OPS[("app_point", "ps")].served_by == ("agent",)


def test_constants_agree_with_the_daemons():
    from standby.admin.cli import FORMATS
    from standby.agent.appoint import MAX_TAG
    from standby.agent.resync import PARENTS_PER_QUERY

    assert rq.REPLICA_FORMATS == FORMATS
    assert rq.MAX_TAG == MAX_TAG
    assert rq.MAX_HASH_PARENTS == PARENTS_PER_QUERY
    assert rq.ROLES == ROLES


# ---- round trips --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: f"{k[1]}-{k[0]}")
def test_round_trip(key):
    op, sender = key
    args, result = EXAMPLES[key]
    spec = rq.OPS[key]
    req = rq.parse_request(op, args, sender, spec.served_by[0])
    assert type(req) is spec.request
    assert req.to_wire() == args  # the same JSON today's senders send
    assert spec.request.from_wire(json.loads(json.dumps(req.to_wire()))) == req
    rep = rq.parse_reply(op, result, sender)
    assert type(rep) is spec.reply
    assert rep.to_wire() == result
    assert rq.parse_reply(op, json.loads(json.dumps(rep.to_wire())), sender) == rep


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: f"{k[1]}-{k[0]}")
def test_messages_are_frozen_and_slotted(key):
    req = rq.parse_request(key[0], EXAMPLES[key][0], key[1])
    assert not hasattr(req, "__dict__")
    for f in dataclasses.fields(req):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(req, f.name, None)


def test_optional_keys_keep_todays_defaults():
    """Keys today's senders leave out (or handlers default) may be left out."""
    p = rq.parse_request("protect", {"machine": "demo", "mt": "mt1", "replica_dir": "/tmp/r"}, "admin")
    assert isinstance(p, rq.Protect)
    assert (p.format, p.replicas, p.existing) == ("vmdk", None, False)
    assert rq.parse_request("status", {}, "admin") == rq.Status(None)
    assert rq.parse_request("resync", {"machine": "a"}, "admin") == rq.Resync("a", False, None)
    assert rq.parse_request("app_point", {}, "ps") == rq.AppPoint("")
    assert rq.parse_request("check_replica", {"path": "/r/x", "format": "raw", "size": 512}, "ps").existing is False
    t = rq.parse_request("test_failover", {"disk": 1, "sequence": 2}, "ps")
    assert isinstance(t, rq.TestFailover) and t.directory is None
    e = rq.parse_request("enroll", {"name": "a", "role": "mt", "passphrase": "p", "csr": CSR}, "enroll")
    assert isinstance(e, rq.Enroll) and e.replace is False
    opened = dict(EXAMPLES[("disk_open", "agent")][1])
    for k in ("seed", "resync", "mt_cert"):
        del opened[k]
    o = rq.parse_reply("disk_open", opened, "agent")
    assert isinstance(o, rq.DiskOpened) and (o.seed, o.resync, o.mt_cert) == (False, None, None)
    assert "mt_cert" not in o.to_wire()  # sent only when a key is needed, as today
    assert rq.parse_reply("pull", {"received_seq": 3}, "mt") == rq.Pulled(3, 0)
    assert rq.parse_reply("subscribe", {"disks": []}, "mt") == rq.Assignments((), None, None)


def test_typed_access_and_nested_objects():
    r = rq.parse_request("disk_report", EXAMPLES[("disk_report", "agent")][0], "agent")
    assert isinstance(r, rq.DiskReport)
    assert isinstance(r.report.resync, rq.ResyncProgress) and r.report.resync.phase == "hashing"
    assert r.report.resync_pending == ("checksum", "unclean stop")
    k = rq.parse_request("disk_key", EXAMPLES[("disk_key", "agent")][0], "agent")
    assert isinstance(k, rq.DiskKey) and k.wrapped_key_bytes == bytes(126)
    s = rq.parse_reply("subscribe", EXAMPLES[("subscribe", "mt")][1], "mt")
    assert isinstance(s, rq.Assignments) and s.disks[0].uid == UID and s.disks[0].wrapped_key_bytes == bytes(126)
    m = rq.parse_request("mt_report", EXAMPLES[("mt_report", "mt")][0], "mt")
    assert isinstance(m, rq.MTReport) and m.disks["3"].points == 4 and m.disks["3"].error is None
    failing = {"disks": {"3": {**EXAMPLES[("mt_report", "mt")][0]["disks"]["3"], "error": "replica gone"}}}
    m = rq.parse_request("mt_report", failing, "mt")
    assert isinstance(m, rq.MTReport) and m.disks["3"].error == "replica gone" and m.to_wire() == failing


# ---- agreement with what today's code produces ---------------------------------------------------------


def test_the_agents_resync_progress_report_is_valid():
    from standby.agent.resync import Progress

    prog = Progress("checksum", "unclean stop", 1 << 30)
    assert rq.ResyncProgress.from_wire(prog.report()).phase == "waiting"
    prog.phase, prog.done, prog.finished = "complete", 1 << 30, prog.started + 2
    assert rq.ResyncProgress.from_wire(prog.report()).progress == 1.0


def test_the_agents_app_point_lines_are_valid():
    from standby.agent.appoint import AppPoints
    from standby.agent.delta import CutOrder

    assert rq.AppPointDisk.from_wire(AppPoints._entry("sda", None)).sequence is None

    async def finished() -> dict[str, Any]:
        order = CutOrder()
        order.finish(reason="no point: block written after the cut")
        return AppPoints._entry("sdb", order)

    assert rq.AppPointDisk.from_wire(asyncio.run(finished())).reason.startswith("no point")


def test_the_master_targets_failover_state_is_valid():
    from standby.mastertarget.recovery import FailoverState

    fo = FailoverState(90, 90, 90, 0.0, T)  # as failover() first makes it: point_time not set yet
    assert rq.FailoverInfo.from_wire(vars(fo)).point_time == 0.0
    fo.point_time, fo.step = T, {"op": 0, "src": 90, "dst": 40}
    assert rq.FailoverInfo.from_wire(dataclasses.asdict(fo)).step == rq.FailoverStep(0, 90, 40)


def test_the_agents_hash_query_is_relayed_byte_for_byte():
    """The master target seals its answer over the canonical JSON of the query, and the agent opens it over
    its own: a query that went through HashQuery must produce exactly the same bytes."""
    from standby.agent.resync import Progress, query
    from standby.proto.envelope import seal_hashes

    key, uid = os.urandom(32), uuid.UUID(UID)
    seen: list[tuple[str, dict[str, Any]]] = []

    class Link:
        async def request(self, op: str, timeout: float | None = 60.0, **args: Any) -> dict[str, Any]:
            seen.append((op, args))
            relay = rq.parse_request(op, args, "agent")
            assert isinstance(relay, rq.ResyncHashes)
            fwd = rq.RelayResyncHashes(relay.disk, relay.generation, relay.query, 1 << 30).to_wire()
            at_mt = rq.parse_request("resync_hashes", json.loads(json.dumps(fwd)), "ps", "mt")
            assert isinstance(at_mt, rq.RelayResyncHashes)
            qbytes = json.dumps(at_mt.query.to_wire(), sort_keys=True, separators=(",", ":")).encode()
            sealed = seal_hashes(key, uid.bytes, at_mt.generation, qbytes, b"h" * 32)
            return rq.SealedHashes(base64.b64encode(sealed).decode()).to_wire()

    class Disk:
        id = 3

    Disk.key, Disk.uid = key, uid  # type: ignore[attr-defined]

    class Shipper:
        link, d = Link(), Disk()

    prog = Progress("checksum", "x", 1 << 30)
    assert asyncio.run(query(Shipper(), 2, None, None, prog)) == b"h" * 32  # type: ignore[arg-type]
    assert asyncio.run(query(Shipper(), 2, 1, [0, 7], prog)) == b"h" * 32  # type: ignore[arg-type]
    assert [op for op, _ in seen] == ["resync_hashes", "resync_hashes"]


@pytest.mark.parametrize("meta", METAS, ids=lambda m: m["kind"])
def test_marker_meta_round_trip_keeps_the_sealed_bytes(meta):
    cm = rq.MarkerMeta.from_marker(meta)
    assert cm.kind == meta["kind"] and cm.generation == meta["generation"]
    assert meta_bytes(cm.to_wire()) == meta_bytes(meta)  # an int time stays an int: the seal covers the JSON


# ---- refusals: finding 5 and the bounds table ------------------------------------------------------------


def test_finding5_disk_open_refusals_name_op_field_and_value():
    good = EXAMPLES[("disk_open", "agent")][0]
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("disk_open", {**good, "size": -5}, "agent")
    assert str(exc.value) == "disk_open: size must be a positive multiple of 512 bytes (at most 1 PiB), got -5"
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("disk_open", {**good, "name": "../x"}, "agent")
    bad(exc, "bad-input", "disk_open: name", "'../x'")
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("disk_open", {**good, "uid": "not-a-uuid"}, "agent")
    bad(exc, "bad-input", "disk_open: uid must be a UUID", "'not-a-uuid'")
    for v in ([1], None, "1073741824", {"a": 1}, True, 1073741824.0):
        with pytest.raises(BadRequest) as exc:
            rq.parse_request("disk_open", {**good, "size": v}, "agent")
        bad(exc, "bad-input", "disk_open: size")


def test_finding5_marker_meta_time_refusals():
    point = {"generation": 2, "kind": "point", "consistency": "crash-consistent"}
    for t in (10**400, json.loads("1e400"), math.inf, -math.inf, math.nan, [], None, "1780000000", {}, True, 0, -1):
        with pytest.raises(BadRequest) as exc:
            rq.MarkerMeta.from_marker({**point, "time": t})
        bad(exc, "bad-marker", "marker meta:")
    with pytest.raises(BadRequest) as exc:
        rq.MarkerMeta.from_marker(point)
    bad(exc, "bad-marker", "a point needs a time")
    with pytest.raises(BadRequest) as exc:
        rq.MarkerMeta.from_marker({**point, "time": T, "generation": 2**32})
    bad(exc, "bad-marker", "generation")
    with pytest.raises(BadRequest) as exc:
        rq.MarkerMeta.from_marker({**point, "time": T, "kind": "pointless"})
    bad(exc, "bad-marker", "kind must be one of")
    with pytest.raises(BadRequest) as exc:
        rq.MarkerMeta.from_marker({**point, "time": T, "evil": 1})
    bad(exc, "bad-marker", "evil is not a field")


def test_finding5_subscribe_with_a_poisoned_disk_fails_that_disk_alone():
    good = EXAMPLES[("subscribe", "mt")][1]
    d0 = good["disks"][0]
    poisoned = {**d0, "disk": 4, "uid": "not-a-uuid", "name": "sdb"}
    worse = {"disk": [5]}
    res = {**good, "disks": [poisoned, d0, worse]}
    with pytest.raises(BadRequest) as exc:
        rq.parse_reply("subscribe", res, "mt")
    bad(exc, "bad-reply", "subscribe reply: disks[0].uid must be a UUID")
    ok, refused = rq.parse_subscribe(res)
    assert [d.disk for d in ok.disks] == [3]
    assert [i for i, _ in refused] == [4, None]
    assert "disks[0].uid" in refused[0][1] and "not-a-uuid" in refused[0][1]
    with pytest.raises(BadRequest):
        rq.parse_subscribe({"disks": "all"})
    with pytest.raises(BadRequest):
        rq.parse_subscribe({**good, "extra": 1})


TIME_BAD = [10**400, json.loads("1e400"), math.nan, math.inf, [], None, "1780000000", {}, True, 0, 9e9]
INT_BAD = [True, False, -1, 2**63, 1.0, "5", None, [], {}]
NAME_BAD = ["../x", ".", "..", "a/b", "", "x" * 64, "web01\n", "é", " a", ".hidden", 5, None]
PATH_BAD = ["relative/x", "/a/../b", "/a\x00b", "/a\nb", "/" + "a" * 5000, "/\ud800", "", 5, None, ["/a"]]
UUID_BAD = ["not-a-uuid", UID.upper(), "{" + UID + "}", "urn:uuid:" + UID, UID.replace("-", ""), "", 5, None]


def refused(op: str, sender: str, key: str, value: Any) -> BadRequest:
    args = dict(EXAMPLES[(op, sender)][0])
    args[key] = value
    with pytest.raises(BadRequest) as exc:
        rq.parse_request(op, args, sender)
    bad(exc, "bad-input", f"{op}: {key}")
    return exc.value


@pytest.mark.parametrize("v", TIME_BAD, ids=repr)
def test_times_are_finite_and_in_range(v):
    if v is not None:  # null: not given (the point is)
        refused("failover", "admin", "at", v)
    with pytest.raises(BadRequest):
        rq.parse_reply("failover", {**EXAMPLES[("failover", "ps")][1], "time": v}, "ps")


@pytest.mark.parametrize("v", INT_BAD, ids=repr)
def test_integers_are_integers_in_range(v):
    refused("pull", "mt", "applied_seq", v)
    refused("pull", "mt", "disk", v)
    refused("resync_begin", "agent", "generation", v)


def test_integer_bounds():
    refused("pull", "mt", "disk", 0)
    refused("pull", "mt", "disk", 2**32)
    assert rq.parse_request("pull", {"disk": 2**32 - 1, "applied_seq": 2**63 - 1}, "mt")
    refused("resync_begin", "agent", "generation", 2**32)  # packed u32 in the AEAD data: struct.error today
    refused("disk_open", "agent", "size", 0)
    refused("disk_open", "agent", "size", 511)
    refused("disk_open", "agent", "size", 2**50 + 512)
    assert rq.parse_request("disk_open", {**EXAMPLES[("disk_open", "agent")][0], "size": 2**50}, "agent")


@pytest.mark.parametrize("v", NAME_BAD, ids=repr)
def test_names(v):
    refused("disk_open", "agent", "name", v)
    refused("protect", "admin", "machine", v)
    refused("enroll", "enroll", "name", v)


def test_admin_is_not_an_enrollable_name():
    e = refused("enroll", "enroll", "name", "admin")
    assert "reserved" in str(e)
    refused("enroll", "enroll", "role", "admin")


@pytest.mark.parametrize("v", PATH_BAD, ids=repr)
def test_paths(v):
    refused("disk_open", "agent", "path", v)
    refused("check_replica", "ps", "path", v)
    if v is not None:  # None means "beside each replica"
        refused("test_failover", "admin", "directory", v)


@pytest.mark.parametrize("v", UUID_BAD, ids=repr)
def test_uuids(v):
    refused("disk_open", "agent", "uid", v)


def test_enums_and_booleans():
    refused("resync_begin", "agent", "mode", "partial")
    refused("check_replica", "ps", "format", "qcow2")
    refused("protect", "admin", "format", "VMDK")
    refused("check_replica", "ps", "existing", "false")  # a non-empty string is truthy: "false" meant yes
    refused("enroll", "enroll", "replace", "false")
    refused("resync", "admin", "full", 1)


def test_text_bounds():
    refused("app_point", "ps", "tag", "x" * 201)
    refused("app_point", "ps", "tag", "two\nlines")
    refused("app_point", "ps", "tag", 5)
    refused("resync_begin", "agent", "reason", "x" * 5000)
    refused("resync_begin", "agent", "reason", "nul\x00")
    refused("resync_begin", "agent", "reason", "x" * 10**6)
    refused("enroll", "enroll", "passphrase", "p" * 2000)
    refused("enroll", "enroll", "csr", "not a pem")
    assert rq.parse_request("app_point", {"tag": "x" * 200}, "ps")


def test_base64_fields():
    refused("disk_key", "agent", "wrapped_key", "not base64!")
    refused("disk_key", "agent", "wrapped_key", "")
    refused("disk_key", "agent", "wrapped_key", base64.b64encode(bytes(2000)).decode())
    refused("disk_key", "agent", "wrapped_key", "AAA")  # bad padding
    refused("disk_key", "agent", "wrapped_key", "ÄÄÄÄ")
    # Any length in bounds passes: the access test sends "AAAA" and must get "forbidden", not "bad-input".
    assert rq.parse_request("disk_key", {"disk": 1, "wrapped_key": "AAAA"}, "agent")


def test_hash_query_shape():
    base = EXAMPLES[("resync_hashes", "agent")][0]
    for q in (
        {"level": 1, "parents": None, "nonce": NONCE},
        {"level": None, "parents": [1], "nonce": NONCE},
        {"level": 1, "parents": [], "nonce": NONCE},
        {"level": 1, "parents": list(range(513)), "nonce": NONCE},
        {"level": 17, "parents": [1], "nonce": NONCE},
        {"level": 1, "parents": [-1], "nonce": NONCE},
        {"level": 1, "parents": ["1"], "nonce": NONCE},
        {"level": 1, "parents": [1]},
        {"level": 1, "parents": [1], "nonce": NONCE, "extra": 1},
        [1, 2],
    ):
        with pytest.raises(BadRequest) as exc:
            rq.parse_request("resync_hashes", {**base, "query": q}, "agent")
        bad(exc, "bad-input", "resync_hashes: query")


def test_unknown_missing_and_non_object_args():
    for op, sender in EXAMPLES:
        args = EXAMPLES[(op, sender)][0]
        with pytest.raises(BadRequest) as exc:
            rq.parse_request(op, {**args, "surprise": 1}, sender)
        bad(exc, "bad-input", f"{op}: surprise is not a field")
        for k in args:
            spec = rq.OPS[(op, sender)]
            required = next(f for f in dataclasses.fields(spec.request) if f.name == k).default is dataclasses.MISSING
            if required:
                with pytest.raises(BadRequest) as exc:
                    rq.parse_request(op, {x: v for x, v in args.items() if x != k}, sender)
                bad(exc, "bad-input", f"{op}: {k} is missing")
        for v in (None, [], "x", 5):
            with pytest.raises(BadRequest) as exc:
                rq.parse_request(op, v, sender)
            bad(exc, "bad-input", f"{op}: must be an object")


def test_nested_errors_have_a_path():
    args = EXAMPLES[("disk_report", "agent")][0]
    report = {**args["report"], "resync": {**args["report"]["resync"], "progress": math.nan}}
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("disk_report", {**args, "report": report}, "agent")
    bad(exc, "bad-input", "disk_report: report.resync.progress must be a fraction", "nan")
    res = EXAMPLES[("app_point", "ps")][1]
    with pytest.raises(BadRequest) as exc:
        rq.parse_reply("app_point", {**res, "disks": [APP_DISK, {**NO_POINT, "time": []}]}, "ps")
    bad(exc, "bad-reply", "app_point reply: disks[1].time must be a time")
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("mt_report", {"disks": {"x": {}}}, "mt")
    bad(exc, "bad-input", "mt_report: disks['x'] must be a disk id")


def test_status_disks_are_lenient_but_checked():
    """Status is for display: a disk registered before names were checked must still show, but a value
    the CLI formats must have its type."""
    res = EXAMPLES[("status", "admin")][1]
    legacy = {**STATUS_DISK, "disk": "../x", "size": 0, "new_field": {"any": [1, "json"]}}
    assert rq.parse_reply("status", {**res, "disks": [legacy]}, "admin")
    for k, v in (("size", -5), ("progress", math.inf), ("alerts", "x"), ("error", 5), ("extra", 10**400)):
        with pytest.raises(BadRequest) as exc:
            rq.parse_reply("status", {**res, "disks": [{**STATUS_DISK, k: v}]}, "admin")
        bad(exc, "bad-reply", f"status reply: disks[0].{k}")
    deep: Any = 1
    for _ in range(20):
        deep = [deep]
    with pytest.raises(BadRequest) as exc:
        rq.parse_reply("status", {**res, "disks": [{**STATUS_DISK, "deep": deep}]}, "admin")
    bad(exc, "bad-reply", "nests deeper")
    missing = {k: v for k, v in STATUS_DISK.items() if k != "applying"}
    with pytest.raises(BadRequest) as exc:
        rq.parse_reply("status", {**res, "disks": [missing]}, "admin")
    bad(exc, "bad-reply", "disks[0].applying is missing")


def test_failover_needs_exactly_one_of_point_and_at():
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("failover", {"machine": "a"}, "admin")
    bad(exc, "bad-input", "exactly one of point and at")
    with pytest.raises(BadRequest):
        rq.parse_request("test_failover", {"machine": "a", "point": "latest", "at": T}, "admin")
    refused("failover", "admin", "point", "")


# ---- codes: unknown, forbidden, served elsewhere; local vs remote ------------------------------------


def test_unknown_and_forbidden_requests():
    for op in ("nope", "", None, 5, ["disk_open"]):
        with pytest.raises(BadRequest) as exc:
            rq.parse_request(op, {}, "agent")
        bad(exc, "unknown-request", "unknown request")
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("status", {}, "agent")  # an agent is not the admin
    bad(exc, "forbidden", "status")
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("disk_open", EXAMPLES[("disk_open", "agent")][0], "mt")
    bad(exc, "forbidden")
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("enroll", EXAMPLES[("enroll", "enroll")][0], "admin")
    bad(exc, "forbidden")
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("app_point", {"tag": ""}, "ps", "mt")  # served by agents, not master targets
    bad(exc, "unknown-request", "app_point")
    assert isinstance(rq.parse_request("wake", {}, "ps", "agent"), rq.Wake)
    assert isinstance(rq.parse_request("wake", {}, "ps", "mt"), rq.Wake)


def test_the_same_op_name_from_two_senders_is_two_messages():
    assert isinstance(rq.parse_request("points", {"machine": "web01"}, "admin"), rq.AdminPoints)
    assert isinstance(rq.parse_request("points", {"disk": 3}, "ps"), rq.Points)
    with pytest.raises(BadRequest):
        rq.parse_request("points", {"disk": 3}, "admin")
    with pytest.raises(BadRequest):
        rq.parse_request("points", {"machine": "web01"}, "ps")


def test_error_kinds():
    assert issubclass(BadRequest, RemoteProtocolError) and issubclass(rq.InvalidMessage, LocalProtocolError)
    with pytest.raises(rq.InvalidMessage) as exc:
        rq.DiskOpen("../x", "/dev/sda", 512, UID)  # we tried to build it: our bug
    assert exc.value.code == "bad-input" and str(exc.value).startswith("disk_open: name must be a name")
    with pytest.raises(rq.InvalidMessage):
        rq.MarkerMeta(1, "point")
    with pytest.raises(LocalProtocolError):
        rq.parse_reply("status", {}, "agent")  # we never send that as an agent
    with pytest.raises(BadRequest) as bexc:
        rq.parse_reply("pull", {"received_seq": -1}, "mt")
    bad(bexc, "bad-reply", "pull reply: received_seq")


def test_huge_values_are_shown_short():
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("pull", {"disk": 10**5000, "applied_seq": 0}, "mt")  # repr() would refuse this int
    assert "about 5001 digits" in str(exc.value)
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("resync_begin", {"disk": 1, "generation": 1, "mode": "x" * 10**6, "reason": ""}, "agent")
    assert len(str(exc.value)) < 300


# ---- fuzz: nothing but BadRequest, whatever the JSON ---------------------------------------------------

SPECIAL_VALUES: list[Any] = [
    10**400,
    2**63,
    2**64,
    2**32,
    -1,
    0,
    1,
    512,
    1 << 30,
    T,
    math.nan,
    math.inf,
    -math.inf,
    1e400,
    "",
    "\ud800",
    "../x",
    "not-a-uuid",
    UID,
    "/",
    "/a/../b",
    "\x00",
    "latest",
    "checksum",
    "point",
    "vmdk",
    True,
    False,
    None,
]
SPECIAL = st.sampled_from(SPECIAL_VALUES)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | SPECIAL
)
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10), kids, max_size=5),
    max_leaves=25,
)
KEYS = sorted(EXAMPLES)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


PIECES = st.sampled_from(["\ud800", "\x00", "\n", "/", "..", "/../", "é", "-", "A", "0", " "]) | st.text(max_size=3)


def _near(value: Any, data: st.DataObject) -> Any:
    """A value close to a valid one: a few characters of a string changed, an integer pushed over a bound,
    or arbitrary JSON."""
    if isinstance(value, str) and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(value)))
        j = data.draw(st.integers(i, min(len(value), i + 3)))
        return value[:i] + data.draw(PIECES) + value[j:]
    if type(value) is int and data.draw(st.booleans()):
        return data.draw(st.sampled_from([value - 1, value + 1, -value - 1, value + 2**32, value * 2**63, 10**400]))
    if type(value) is float and data.draw(st.booleans()):
        return data.draw(st.sampled_from([value * 1e300, -value, value * 1e-300, math.nan]))
    return data.draw(JSON)


def _mutate(value: Any, data: st.DataObject) -> Any:
    """Change one value somewhere inside `value` (a valid example): near-valid or arbitrary JSON; or drop or
    add a key."""
    if isinstance(value, dict) and value:
        k = data.draw(st.sampled_from(sorted(value)))
        how = data.draw(st.sampled_from(["replace", "recurse", "drop", "add"]))
        out = dict(value)
        if how == "replace":
            out[k] = _near(value[k], data)
        elif how == "recurse":
            out[k] = _mutate(value[k], data)
        elif how == "drop":
            del out[k]
        else:
            out[data.draw(st.text(max_size=8))] = data.draw(JSON)
        return out
    if isinstance(value, list) and value:
        i = data.draw(st.integers(0, len(value) - 1))
        return [*value[:i], _mutate(value[i], data), *value[i + 1 :]]
    return _near(value, data)


def _only_bad_request(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except BadRequest as exc:
        assert exc.code in ("bad-input", "bad-reply", "bad-marker", "unknown-request", "forbidden")
        assert str(exc)
        return exc


SUBSTITUTES: list[Any] = [
    *SPECIAL_VALUES,
    "/\ud800",
    "/a\nb",
    UID[:-2] + "zz",
    UID.upper(),
    "x" * 37,
    "x" * 5000,
    "A" * 4097,
    "AAA=",
    "====",
    512.5,
    -0.0,
    2**50 + 512,
    [],
    [None],
    [[]],
    {},
    {"": None},
    [{"level": 1}],
]


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a JSON value: paths of dict keys and list indexes (the value itself included)."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _leaves(v, (*path, i))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    return [*value[:head], _replace(value[head], rest, new), *value[head + 1 :]]


@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"{k[1]}-{k[0]}")
def test_every_place_of_every_message_takes_any_value_safely(key):
    """A deterministic mutation loop: each place of each example (args and result) gets each hostile value,
    each key is dropped, each object gets an unknown key. Refused with BadRequest, or a valid message."""
    op, sender = key
    args, result = EXAMPLES[key]
    for example, parse in (
        (args, lambda v: rq.parse_request(op, v, sender)),
        (result, lambda v: rq.parse_reply(op, v, sender)),
    ):
        variants = [_replace(example, p, v) for p in _leaves(example) for v in SUBSTITUTES]
        for p in [q for q in _leaves(example) if q]:
            parent = example
            for k in p[:-1]:
                parent = parent[k]
            if isinstance(parent, dict):
                variants.append(_replace(example, p[:-1], {k: v for k, v in parent.items() if k != p[-1]}))
                variants.append(_replace(example, p[:-1], {**parent, "unknown": 1}))
        for v in variants:
            got = _only_bad_request(parse, v)
            if not isinstance(got, BadRequest):
                assert parse(json.loads(json.dumps(got.to_wire()))) == got
    if op == "subscribe":
        for p in _leaves(result):
            for v in SUBSTITUTES:
                _only_bad_request(rq.parse_subscribe, _replace(result, p, v))


def test_every_place_of_every_marker_meta_takes_any_value_safely():
    for meta in METAS:
        for p in _leaves(meta):
            for v in SUBSTITUTES:
                _only_bad_request(rq.MarkerMeta.from_marker, _replace(meta, p, v))


@FUZZ
@given(key=st.sampled_from(KEYS), data=st.data())
def test_fuzz_requests_never_raise_anything_but_bad_request(key, data):
    op, sender = key
    spec = rq.OPS[key]
    names = _field_names(spec.request)
    keys = st.sampled_from(names) | st.text(max_size=8) if names else st.text(max_size=8)
    args = data.draw(st.dictionaries(keys, JSON, max_size=8) | JSON | st.just(_mutate(EXAMPLES[key][0], data)))
    role = data.draw(st.sampled_from([sender, sender, *ROLES]))
    got = _only_bad_request(rq.parse_request, op, args, role)
    if not isinstance(got, BadRequest):
        assert type(got) is spec.request or rq.OPS[(op, role)].request is type(got)
        assert type(got).from_wire(json.loads(json.dumps(got.to_wire()))) == got


@FUZZ
@given(key=st.sampled_from(KEYS), data=st.data())
def test_fuzz_replies_never_raise_anything_but_bad_request(key, data):
    op, sender = key
    result = data.draw(JSON | st.just(_mutate(EXAMPLES[key][1], data)))
    got = _only_bad_request(rq.parse_reply, op, result, sender)
    if not isinstance(got, BadRequest):
        assert rq.parse_reply(op, json.loads(json.dumps(got.to_wire())), sender) == got
    if op == "subscribe":
        _only_bad_request(rq.parse_subscribe, result)


@FUZZ
@given(data=st.data())
def test_fuzz_marker_meta_never_raises_anything_but_bad_request(data):
    keys = st.sampled_from(_field_names(rq.MarkerMeta)) | st.text(max_size=8)
    meta = data.draw(
        st.dictionaries(keys, JSON, max_size=8) | JSON | st.just(_mutate(data.draw(st.sampled_from(METAS)), data))
    )
    got = _only_bad_request(rq.MarkerMeta.from_marker, meta)
    if not isinstance(got, BadRequest):
        assert rq.MarkerMeta.from_marker(json.loads(json.dumps(got.to_wire()))) == got


@FAST
@given(text=st.text(max_size=200))
def test_fuzz_request_args_from_raw_json_text(text):
    """Whatever json.loads makes of a peer's bytes (1e400 -> inf, huge ints, lone surrogates)."""
    try:
        args = json.loads(text)
    except (ValueError, RecursionError):
        return
    for key in KEYS:
        _only_bad_request(rq.parse_request, key[0], args, key[1])


# ---- vSphere: find_device (ps -> mt) and about (agent, mt -> ps) ------------------------------------------

FILE_NAME_BAD = ["a/b", "/abs", "../wwn-0x1", "..", ".", "", "wwn\n", "nul\x00", "x" * 256, "\ud800", 5, None]


@pytest.mark.parametrize("v", FILE_NAME_BAD, ids=repr)
def test_find_device_takes_a_file_name_only(v):
    """The master target looks the name up in its own by-id directory: a '/' or '..' would lead out of it."""
    e = refused("find_device", "ps", "name", v)
    assert "file name" in str(e) or "must be" in str(e)


def test_find_device_wait_is_bounded():
    for v in (-1, 300.5, 301, math.nan, math.inf, "5", None, True):
        refused("find_device", "ps", "wait", v)
    args = EXAMPLES[("find_device", "ps")][0]
    assert rq.parse_request("find_device", {**args, "wait": 0}, "ps", "mt") == rq.FindDevice(args["name"], 1 << 30, 0)
    assert rq.parse_request("find_device", {**args, "wait": 300}, "ps", "mt")
    refused("find_device", "ps", "size", 511)
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("find_device", args, "ps", "agent")  # served by master targets only
    bad(exc, "unknown-request")
    with pytest.raises(BadRequest) as exc:
        rq.parse_reply("find_device", {"path": "wwn-0x1"}, "ps")
    bad(exc, "bad-reply", "find_device reply: path")


def test_about_system_uuid_is_canonical_or_empty():
    for sender in ("agent", "mt"):
        for v in UUID_BAD[:-2]:
            if v != "":
                refused("about", sender, "system_uuid", v)
        refused("about", sender, "system_uuid", None)
        refused("about", sender, "hostname", "two\nlines")
        refused("about", sender, "hostname", "h" * 256)
        assert rq.parse_request("about", {"system_uuid": "", "hostname": ""}, sender, "ps") == rq.About("", "")
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("about", {"system_uuid": "", "hostname": ""}, "admin")
    bad(exc, "forbidden")


def test_machines_reply_of_an_older_process_server_still_parses():
    old = {"machines": [{"name": "web01", "role": "agent", "enrolled_at": T}]}
    got = rq.parse_reply("machines", old, "admin")
    assert isinstance(got, rq.MachineList)
    assert (got.machines[0].system_uuid, got.machines[0].hostname, got.machines[0].reported_at) == (None, None, None)
