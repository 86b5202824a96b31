"""Tampering with the process server's cache, end to end with real daemons (promise 6).

Whoever holds the process server's disk can rewrite a cached record *and* its frame checksums — xxh64
and xxh32 are not MACs. The master target must still refuse such a record: reject it (the reason shows
in `standby status`), never ack it, and write nothing of it into the replica.

Each test replicates into the cache while the master target is stopped, stops the process server,
edits a segment file with `standby.proto.frames` (re-encoding the frame, so every checksum is right),
then restarts the process server and the master target.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from standby.proto.frames import HEADER_SIZE, Record, encode_frame, scan_records
from standby.proto.messages import SEAL_SIZE, Batch, ExtentKind, FrameType, decode_message
from tests.conftest import needs_loop
from tests.deploy import LocalDeployment

from .conftest import MiB, fill_mixed

pytestmark = [needs_loop]

SIZE = 8 * MiB
BATCH = MiB
N_BATCHES = SIZE // BATCH  # sequences 1..N_BATCHES are batches, N_BATCHES + 1 the initial-complete marker
TABLE_HEAD, TABLE_ENTRY = 20, 20  # messages._BATCH_HEAD / _EXTENT sizes (see the BATCH layout there)


@dataclass
class Disk:
    name: str
    source: str  # the loop device
    replica: Path  # the vmdk descriptor
    id: int = 0

    @property
    def flat(self) -> Path:
        return self.replica.with_name(self.replica.stem + "-flat.vmdk")


@dataclass
class Cached:
    dep: LocalDeployment
    disks: dict[str, Disk]

    def segment(self, disk: str) -> Path:
        segs = sorted((self.dep.ps_dir / "cache" / f"disk-{self.disks[disk].id}").glob("seg-*.log"))
        assert len(segs) == 1, segs
        return segs[0]

    def records(self, disk: str) -> tuple[bytes, list[Record]]:
        data = self.segment(disk).read_bytes()
        recs, end, problem = scan_records(data)
        assert problem is None and end == len(data), problem
        assert [r.header.sequence for r in recs] == list(range(1, N_BATCHES + 2))
        return data, recs

    def restart(self) -> None:
        self.dep.start("ps")
        self.dep.start("mt", "mt1")


def cache_without_applying(dep: LocalDeployment, make_loop: Callable[..., str], tmp_path: Path, names: list[str]):
    """Protect agent src's disks, but stop the master target at once: the whole initial replication of
    every disk ends up in the process server's cache, unapplied. Then stop agent and process server."""
    sources = {}
    for i, name in enumerate(names):
        sources[name] = make_loop(SIZE, f"source-{name}")
        fill_mixed(sources[name], SIZE, seed=11 + i)
    dep.enroll("mt", "mt1")
    dep.start("mt", "mt1")
    dep.enroll("agent", "src")
    for name in names:
        dep.add_disk("src", name, sources[name])
    dep.set_agent_option("src", batch_size="1M")
    dep.start("agent", "src")
    dep.wait_disks_known("src", len(names))
    dep.wait_mt_connected("mt1")
    rdir = tmp_path / "replicas"
    rdir.mkdir()
    # Protect while the agent is stopped, then stop the master target before the agent comes back: the
    # disk's data key cannot reach the master target before it is gone, so it never pulls anything.
    dep.kill("agent-src", signal.SIGTERM)
    res = dep.admin().call("protect", machine="src", mt="mt1", format="vmdk", replica_dir=str(rdir), replicas={})
    dep.kill("mt-mt1", signal.SIGTERM)
    dep.start("agent", "src")
    dep.wait_for(
        lambda s: all(d["received_seq"] == N_BATCHES + 1 for d in s["disks"]) and len(s["disks"]) == len(names),
        60,
        "every disk's initial replication to be cached",
    )
    st = dep.status()
    assert all(d["applied_seq"] == 0 and d["backlog_records"] == N_BATCHES + 1 for d in st["disks"]), st
    dep.kill("agent-src", signal.SIGTERM)
    dep.kill("ps", signal.SIGTERM)
    disks = {d["disk"]: Disk(d["disk"], sources[d["disk"]], Path(d["replica"])) for d in res["disks"]}
    db = sqlite3.connect(f"file:{dep.ps_dir / 'registry.sqlite'}?mode=ro", uri=True)
    try:
        for disk_id, name, applied in db.execute("SELECT id, name, applied_seq FROM disks WHERE machine='src'"):
            disks[name].id = disk_id
            assert applied == 0
    finally:
        db.close()
    return Cached(dep, disks)


def batch_of(rec: Record) -> Batch:
    msg = decode_message(rec.header, rec.payload)
    assert isinstance(msg, Batch)
    return msg


def pick_batch(recs: list[Record]) -> int:
    """Index of a batch in the middle of the stream that carries data (so 'written' would show)."""
    for i, r in enumerate(recs):
        if r.header.sequence >= 3 and r.header.type == FrameType.BATCH:
            if any(e.kind == ExtentKind.DATA for e in batch_of(r).extents) and r.header.sequence < N_BATCHES:
                return i
    raise AssertionError("no batch with data in the middle of the disk")


def rewrite(seg: Path, data: bytes, recs: list[Record], index: int, frame: bytes) -> None:
    r = recs[index]
    seg.write_bytes(data[: r.offset] + frame + data[r.end :])


def wait_rejected(dep: LocalDeployment, disk: str, timeout: float = 60) -> dict:
    st = dep.wait_for(
        lambda s: any(d["disk"] == disk and d["error"] and "failed authentication" in d["error"] for d in s["disks"]),
        timeout,
        f"the master target to reject a record of {disk}",
        interval=0.1,
    )
    return next(d for d in st["disks"] if d["disk"] == disk)


def read(path: Path | str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def assert_replica_stops_before(disk: Disk, seq: int) -> None:
    """Batches 1..seq-1 are in the replica exactly as on the source; from batch `seq` on, nothing."""
    good = (seq - 1) * BATCH
    assert read(disk.flat, 0, good) == read(disk.source, 0, good), "the batches before the rejected one are wrong"
    tail = read(disk.flat, good, SIZE - good)
    assert len(tail) == SIZE - good
    assert tail == bytes(SIZE - good), "the rejected batch (or a later one) was written"
    assert read(disk.source, good, BATCH) != bytes(BATCH), "test set-up: the tampered batch must carry data"


def assert_not_acked(c: Cached, disk: str, seq: int) -> None:
    d = next(d for d in c.dep.status()["disks"] if d["disk"] == disk)
    assert d["applied_seq"] == seq - 1, d
    assert d["replication"] == "Initial", d
    assert d["backlog_records"] == N_BATCHES + 2 - seq, d
    # The master target's own record of what it applied agrees.
    import json

    mt_state = json.loads((c.dep.root / "mt-mt1" / "disks" / f"{c.disks[disk].id}.json").read_text())
    assert mt_state["applied_seq"] == seq - 1, mt_state


def test_flipped_ciphertext_byte_with_recomputed_checksums_is_rejected(deployment, make_loop, tmp_path):
    c = cache_without_applying(deployment, make_loop, tmp_path, ["disk0"])
    seg = c.segment("disk0")
    data, recs = c.records("disk0")
    i = pick_batch(recs)
    rec, b = recs[i], batch_of(recs[i])
    seq = rec.header.sequence
    # Where is the first data extent's ciphertext inside the frame payload?
    pos = TABLE_HEAD + TABLE_ENTRY * len(b.extents) + SEAL_SIZE
    for e in b.extents:
        if e.kind == ExtentKind.DATA:
            break
        pos += len(e.payload)
    assert bytes(rec.payload[pos : pos + len(e.payload)]) == bytes(e.payload)
    payload = bytearray(rec.payload)
    payload[pos + 1 + 12 + len(e.payload) // 3] ^= 0x40  # past flags and nonce: the AES-GCM body
    frame = encode_frame(rec.header.type, rec.header.disk, seq, bytes(payload), rec.header.flags)
    assert len(frame) == rec.end - rec.offset
    with open(seg, "r+b") as f:  # in place, as an attacker would
        f.seek(rec.offset)
        f.write(frame)
    # Still a perfectly well-formed cache: every frame checksum verifies.
    _, again = c.records("disk0")
    assert bytes(again[i].payload) != bytes(rec.payload) and again[i].header.sequence == seq

    c.restart()
    d = wait_rejected(deployment, "disk0")
    assert f"rejected sequence {seq}" in d["error"], d["error"]
    assert f"offset {e.offset}" in d["error"], d["error"]
    # Quarantined (issue 9, finding 7: on 47f798a it retried every 5 s for ever with no way forward shown):
    # status says why and what to do; nothing more is applied meanwhile.
    assert d["applying"] == "quarantined" and "standby resync src" in d["error"], d
    assert_not_acked(c, "disk0", seq)
    time.sleep(6)  # longer than the master target's retry delay: nothing is retried into the replica
    assert_not_acked(c, "disk0", seq)
    assert deployment.log_text("mt-mt1").count(f"sequence {seq} rejected") == 1, deployment.log_text("mt-mt1")
    human = deployment.cli("status")
    assert "failed authentication" in human.stdout and "standby resync" in human.stdout, human.stdout
    deployment.kill("mt-mt1", signal.SIGTERM)  # replica closed, everything synced
    assert_replica_stops_before(c.disks["disk0"], seq)

    # The way forward: a resync sets the cached records aside (kept for inspection) and repairs the replica.
    deployment.start("mt", "mt1")
    deployment.start("agent", "src")
    res = deployment.cli("resync", "src")
    assert res.returncode == 0, res.stderr
    quarantine = c.dep.ps_dir / "cache" / f"disk-{c.disks['disk0'].id}" / "quarantine"
    assert any(quarantine.iterdir()), "the refused records must be kept, not deleted"
    st = deployment.wait_for(
        lambda s: (lambda x: x["replication"] == "Delta" and x["applied_seq"] == x["received_seq"] and not x["error"]
                   and x["applying"] == "running")(next(x for x in s["disks"] if x["disk"] == "disk0")),
        120,
        "the resync to repair the replica",
    )
    d = next(x for x in st["disks"] if x["disk"] == "disk0")
    assert any("quarantined" in p["text"] for p in d["cleared"]), d["cleared"]
    deployment.kill("agent-src", signal.SIGTERM)
    deployment.kill("mt-mt1", signal.SIGTERM)
    assert read(c.disks["disk0"].flat, 0, SIZE) == read(c.disks["disk0"].source, 0, SIZE)


def test_replayed_payload_from_another_sequence_is_rejected(deployment, make_loop, tmp_path):
    c = cache_without_applying(deployment, make_loop, tmp_path, ["disk0"])
    seg = c.segment("disk0")
    data, recs = c.records("disk0")
    i = pick_batch(recs)
    seq = recs[i].header.sequence
    donor = recs[i + 1]  # a genuine batch of the same disk and generation, one sequence later
    assert donor.header.type == FrameType.BATCH and bytes(donor.payload) != bytes(recs[i].payload)
    frame = encode_frame(FrameType.BATCH, recs[i].header.disk, seq, bytes(donor.payload))
    rewrite(seg, data, recs, i, frame)
    _, again = c.records("disk0")
    assert bytes(again[i].payload) == bytes(donor.payload)

    c.restart()
    d = wait_rejected(deployment, "disk0")
    assert f"rejected sequence {seq}" in d["error"], d["error"]
    assert_not_acked(c, "disk0", seq)
    deployment.kill("mt-mt1", signal.SIGTERM)
    assert_replica_stops_before(c.disks["disk0"], seq)


def test_record_moved_to_another_disk_is_rejected(deployment, make_loop, tmp_path):
    c = cache_without_applying(deployment, make_loop, tmp_path, ["disk0", "disk1"])
    seg0 = c.segment("disk0")
    data0, recs0 = c.records("disk0")
    _, recs1 = c.records("disk1")
    i = pick_batch(recs0)
    seq = recs0[i].header.sequence
    moved = recs1[i]  # disk1's batch with the same sequence (same generation, same disk offsets)
    assert moved.header.sequence == seq and moved.header.disk == c.disks["disk1"].id
    assert batch_of(moved).cursor == batch_of(recs0[i]).cursor
    frame = encode_frame(FrameType.BATCH, c.disks["disk0"].id, seq, bytes(moved.payload))
    rewrite(seg0, data0, recs0, i, frame)

    c.restart()
    d = wait_rejected(deployment, "disk0")
    assert f"rejected sequence {seq}" in d["error"], d["error"]
    # disk1 is untouched by all this and completes.
    deployment.wait_for(
        lambda s: any(x["disk"] == "disk1" and x["replication"] == "Delta" for x in s["disks"]),
        60,
        "disk1 to be up to date",
    )
    assert_not_acked(c, "disk0", seq)
    deployment.kill("mt-mt1", signal.SIGTERM)
    assert_replica_stops_before(c.disks["disk0"], seq)
    d1 = c.disks["disk1"]
    assert read(d1.flat, 0, SIZE) == read(d1.source, 0, SIZE)


def test_damaged_record_mid_segment_is_set_aside_and_the_disk_resynced(deployment, make_loop, tmp_path):
    """Control for the tests above: a flipped byte *without* recomputed checksums is caught by the process
    server itself. A crash mid-append can only tear the last record; a bad record followed by intact,
    acknowledged ones is damage: the process server keeps the intact records before it, sets the rest
    aside (kept in quarantine/, never deleted), still starts and serves every disk (issue 9, finding 7: on
    47f798a it refused to start at all), and has the disk resynced, which repairs the replica."""
    c = cache_without_applying(deployment, make_loop, tmp_path, ["disk0"])
    seg = c.segment("disk0")
    data, recs = c.records("disk0")
    r = recs[pick_batch(recs)]
    buf = bytearray(data)
    buf[r.offset + HEADER_SIZE + (r.end - r.offset - HEADER_SIZE) // 2] ^= 0x01
    seg.write_bytes(bytes(buf))
    deployment.start("ps")
    quarantine = seg.parent / "quarantine"
    [kept] = quarantine.iterdir()
    assert kept.read_bytes() == bytes(buf), "the damaged segment must be kept as it was"
    assert seg.stat().st_size == r.offset, "the intact records before the damage stay in place"
    d = deployment.status()["disks"][0]
    assert d["error"] and "damaged" in d["error"] and "resync" in d["error"], d
    assert d["resync_requested"] and d["resync_requested"]["mode"] == "checksum", d
    deployment.start("mt", "mt1")
    deployment.start("agent", "src")
    deployment.wait_for(
        lambda s: s["disks"][0]["replication"] == "Delta" and not s["disks"][0]["error"]
        and s["disks"][0]["applied_seq"] == s["disks"][0]["received_seq"],
        120,
        "the replica to be repaired",
    )
    deployment.kill("agent-src", signal.SIGTERM)
    deployment.kill("mt-mt1", signal.SIGTERM)
    disk = c.disks["disk0"]
    assert read(disk.flat, 0, SIZE) == read(disk.source, 0, SIZE)
