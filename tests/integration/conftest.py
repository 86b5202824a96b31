"""Fixtures for integration tests: a real deployment (three kinds of daemons as separate processes,
real TLS on 127.0.0.1) in the test's temporary directory, stopped even when the test fails; the
daemons' logs are printed at teardown so a failing test shows them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deploy import LocalDeployment
from tests.tools import need

MiB = 1024 * 1024


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    dep = LocalDeployment(tmp_path / "deploy", cache_quota=1 << 30)
    dep.init()
    dep.start("ps")
    try:
        yield dep
    finally:
        dep.stop_all()
        for log in sorted(dep.logs.glob("*.log")):
            text = log.read_text(errors="replace")
            print(f"----- {log.name} (last 60 lines) -----")
            print("\n".join(text.splitlines()[-60:]))


def fill_mixed(path: str, size: int, seed: int = 7) -> None:
    """Write a mix of random data, compressible text and untouched (zero) ranges to `path`."""
    import random

    rng = random.Random(seed)
    with open(path, "r+b", buffering=0) as f:
        pos = 0
        while pos < size:
            n = min(rng.choice([64 * 1024, 256 * 1024, MiB, 3 * MiB]), size - pos)
            kind = rng.random()
            if kind < 0.4:
                f.seek(pos)
                f.write(rng.randbytes(n))
            elif kind < 0.7:
                line = b"log line %012d\n" % pos
                f.seek(pos)
                f.write((line * (n // len(line) + 1))[:n])
            pos += n
        os.fsync(f.fileno())


def qemu_compare(source: str, replica: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    need("qemu-img")
    rfmt = "raw" if fmt in ("raw", "device") else "vmdk"
    return subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", rfmt, source, str(replica)], capture_output=True, text=True
    )


def qemu_info(replica: Path) -> dict:
    need("qemu-img")
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(replica)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


HAVE_QEMU = shutil.which("qemu-img") is not None


@pytest.fixture
def protected(deployment: LocalDeployment, make_loop: Callable[..., str], tmp_path: Path):
    """Factory: protected(fmt, size, batch='1M', replica=None, ..., **agent options) -> (source, replica).

    Starts master target mt1 and agent src with one loop-device disk filled with mixed data, protects it
    and returns without waiting for the sync."""

    def factory(
        fmt: str,
        size: int,
        batch: str = "1M",
        replica: str | None = None,
        fill: bool = True,
        start_mt: bool = True,
        existing: bool = False,
        **agent_options: object,
    ) -> tuple[str, Path]:
        dev = make_loop(size, "source")
        if fill:
            fill_mixed(dev, size)
        deployment.enroll("mt", "mt1")
        if start_mt:
            deployment.start("mt", "mt1")
        deployment.enroll("agent", "src")
        deployment.add_disk("src", "disk0", dev)
        deployment.set_agent_option("src", batch_size=batch, **agent_options)
        deployment.start("agent", "src")
        deployment.wait_disks_known("src", 1)
        if not start_mt:
            deployment.start("mt", "mt1")
        deployment.wait_mt_connected("mt1")
        rdir = tmp_path / "replicas"
        rdir.mkdir(exist_ok=True)
        replicas = {"disk0": replica} if replica else {}
        res = deployment.admin().call(
            "protect",
            machine="src",
            mt="mt1",
            format=fmt,
            replica_dir=None if replica else str(rdir),
            replicas=replicas,
            existing=existing,
        )
        return dev, Path(res["disks"][0]["replica"])

    return factory
