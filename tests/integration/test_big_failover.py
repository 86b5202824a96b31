"""A failover that rolls back more than 1 GiB of distinct incompressible blocks, and forward again (issue 9,
finding 2 and its "Done when"). On 47f798a a roll-back of more than ~32 MiB of distinct incompressible
blocks packed a redo record over the frame limit: no reply, the command hung, and status then named as
the failover point a sequence that was no point at all.

Oracles: the write-order records (the replica at the point equals the source at one cut of them, the same
cut before and after the round trip), the burst region's contents regenerated from their seeds, and byte
equality with the source after moving forward to the newest state.
"""

from __future__ import annotations

import json
import os
import random
import time

from tests import writeorder
from tests.conftest import needs_loop

from .conftest import MiB
from .test_delta import disk, start_workload, stop_workload

pytestmark = [needs_loop]

SLOTS = 1024  # 4 MiB of write-order records at the start of the disk
REGION = (8 * MiB, 8 * MiB + 1100 * MiB)  # 1100 MiB of incompressible blocks, each rewritten once
SIZE = 1280 * MiB
CHUNK = 4 * MiB


def pattern(seed: int, off: int) -> bytes:
    return random.Random(seed * 1_000_003 + off).randbytes(CHUNK)


def write_region(dev: str, seed: int) -> None:
    with open(dev, "r+b", buffering=0) as f:
        for off in range(*REGION, CHUNK):
            f.seek(off)
            f.write(pattern(seed, off))
        os.fsync(f.fileno())


def region_is(path: str, seed: int) -> bool:
    with open(path, "rb") as f:
        for off in range(*REGION, CHUNK):
            f.seek(off)
            if f.read(CHUNK) != pattern(seed, off):
                return False
    return True


def cli_json(dep, *args: str, timeout: float = 600) -> dict:
    res = dep.cli(*args, "--json", timeout=timeout)
    assert res.returncode == 0, f"{args}: {res.stdout} {res.stderr}"
    return json.loads(res.stdout)


def test_failover_back_over_a_gib_of_incompressible_blocks_and_forward_again(deployment, protected, tmp_path):
    dev, replica = protected("raw", SIZE, fill=False, batch="8M", cut_interval=0.5)
    write_region(dev, 1)  # before the sync: old contents of the region are incompressible too
    deployment.wait_synced("src", timeout=600)
    end = time.time()
    deployment.wait_caught_up("src", end, timeout=600)
    log = tmp_path / "writes.log"
    proc = start_workload(dev, log, SLOTS, rate=100, seconds=900)
    try:
        time.sleep(2.0)
        mark = time.time()
        deployment.wait_caught_up("src", mark, timeout=120)
        points = json.loads(deployment.cli("points", "src", "--json").stdout)["disks"][0]["points"]
        before = [p for p in points if mark <= p["time"]]
        assert before, points
        p0 = before[0]
        write_region(dev, 2)  # every block of the region rewritten once: > 1 GiB of distinct blocks
        time.sleep(1.0)
    finally:
        stop_workload(proc)
    last = writeorder.WriteLog.read(log).last
    deployment.wait_caught_up("src", time.time(), timeout=600)

    t0 = time.monotonic()
    res = cli_json(deployment, "failover", "src", "--point", str(p0["sequence"]))
    back = time.monotonic() - t0
    d = res["disks"][0]
    assert d["sequence"] == p0["sequence"] and d["bytes_written"] >= 1024 * MiB, d
    v = writeorder.check(str(replica), 0, SLOTS, log)
    assert v.consistent and v.cut_lo is not None, v.to_json()
    cut = v.cut_lo
    assert 0 < cut < last
    assert region_is(str(replica), 1), "the region must hold its contents at the point"
    st = disk(deployment.status())
    assert st["failover"]["point"] == p0["sequence"], st["failover"]
    assert f"FAILED-OVER to point {p0['sequence']}" in deployment.cli("status").stdout

    t0 = time.monotonic()
    listed = json.loads(deployment.cli("points", "src", "--json").stdout)["disks"][0]["points"]
    latest = listed[-1]["sequence"]
    cli_json(deployment, "failover", "src", "--point", str(latest))
    forward = time.monotonic() - t0
    assert writeorder.check(str(replica), 0, SLOTS, log).cut_lo == last
    assert region_is(str(replica), 2)
    with open(dev, "rb") as a, open(replica, "rb") as b:
        for _ in range(0, SIZE, 64 * MiB):
            assert a.read(64 * MiB) == b.read(64 * MiB), "the newest state must equal the source"
    # And back once more: the same point gives the same cut.
    cli_json(deployment, "failover", "src", "--point", str(p0["sequence"]))
    assert writeorder.check(str(replica), 0, SLOTS, log).cut_lo == cut
    print(f"failover over {d['bytes_written'] / MiB:.0f} MiB: back {back:.1f} s, forward {forward:.1f} s")
