"""The metrics endpoints with the real tools (issue 11): a process server, a master target and an agent
replicating a loop device, each with `[metrics]` on; `promtool check metrics` is clean on each daemon's
page, and a real Prometheus server, started here on 127.0.0.1 with its own configuration, scrapes the
process server and answers a PromQL query with the disk's RPO."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from standby.admin.localdeploy import free_port
from standby.plumbing.config import load_toml, save_toml
from tests.conftest import needs_loop
from tests.deploy import LocalDeployment
from tests.tools import needs

from .conftest import MiB

pytestmark = [needs_loop, needs("promtool", "prometheus")]
SCRAPE_INTERVAL = 1


def set_metrics(conf: Path, port: int) -> None:
    raw = load_toml(conf)
    raw["metrics"] = {"port": port}
    save_toml(conf, raw)


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_for(fn, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def showing(text: str, wanted: list[str]) -> str | None:
    """`text` if every wanted line start is in it, else None (not yet)."""
    return text if all(w in text for w in wanted) else None


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


@pytest.fixture
def replicating(tmp_path: Path, make_loop):
    """A deployment with metrics on for each daemon, replicating one loop device in delta replication with
    a recovery point applied: (deployment, {daemon: metrics port})."""
    dep = LocalDeployment(tmp_path / "deploy", cache_quota=1 << 30)
    dep.init()
    ports = {"ps": free_port(), "mt": free_port(), "agent": free_port()}
    set_metrics(dep.ps_dir / "ps.toml", ports["ps"])
    dev = make_loop(32 * MiB, "source")
    try:
        dep.start("ps")
        set_metrics(dep.enroll("mt", "mt1") / "mt.toml", ports["mt"])
        dep.start("mt", "mt1")
        set_metrics(dep.enroll("agent", "src") / "agent.toml", ports["agent"])
        dep.add_disk("src", "disk0", dev)
        dep.start("agent", "src")
        dep.wait_disks_known("src", 1)
        dep.wait_mt_connected("mt1")
        dep.admin().call("protect", machine="src", mt="mt1", format="raw", replica_dir=str(tmp_path))
        dep.wait_for(lambda s: all(d["replication"] == "Delta" and d["rpo_seconds"] is not None for d in s["disks"]),
                     120, "delta replication with a recovery point")
        with open(dev, "r+b", buffering=0) as f:  # some churn: points, epochs, apply groups to count
            for i in range(8):
                f.seek(i * MiB)
                f.write(b"metrics" * 4096)
        yield dep, ports
    finally:
        dep.stop_all()
        for log in sorted(dep.logs.glob("*.log")):
            print(f"----- {log.name} (last 40 lines) -----")
            print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))


def test_promtool_is_clean_on_every_daemons_page(replicating):
    dep, ports = replicating
    wanted = {
        "ps": ['standby_disk_rpo_seconds{disk="disk0",machine="src"}', "standby_ps_cache_quota_bytes",
               'standby_disk_replication_state{disk="disk0",machine="src",state="Delta"} 1.0'],
        "mt": ['standby_mt_apply_duration_seconds_count{disk="disk0",machine="src"}',
               "standby_mt_retention_volume_free_bytes", 'standby_mt_recovery_points{disk="disk0",machine="src"}'],
        "agent": ['standby_agent_dirty_bytes{disk="disk0",machine="src"}',
                  'standby_agent_tracker_events_lost_total{disk="disk0",machine="src"} 0.0'],
    }
    for daemon, port in ports.items():
        url = f"http://127.0.0.1:{port}/metrics"
        # The master target's point count comes with its first upkeep report (every few seconds).
        text = wait_for(lambda u=url, w=wanted[daemon]: showing(get(u), w), 30,
                        f"{daemon}'s metrics to show {wanted[daemon]}")
        res = promtool(text)
        assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (daemon, res.stdout,
                                                                                           res.stderr)


def test_a_real_prometheus_scrapes_the_rpo(replicating, tmp_path: Path):
    dep, ports = replicating
    port = free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL}s\n"
        "scrape_configs:\n"
        "  - job_name: standby-ps\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{ports['ps']}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )
    log.close()
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": "standby_disk_rpo_seconds"})

        def rpo() -> list | None:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            res = json.loads(get(api))
            assert res["status"] == "success", res
            return res["data"]["result"] or None

        result = wait_for(rpo, 60, "Prometheus to answer with the disk's RPO")
        (series,) = result
        assert series["metric"]["machine"] == "src" and series["metric"]["disk"] == "disk0"
        assert series["metric"]["job"] == "standby-ps"
        value = float(series["value"][1])
        status_rpo = dep.status()["disks"][0]["rpo_seconds"]
        assert 0 <= value < 60 and status_rpo is not None and abs(value - status_rpo) < 30, (value, status_rpo)
        up = json.loads(get(f"http://127.0.0.1:{port}/api/v1/query?query=up"))["data"]["result"]
        assert [s["value"][1] for s in up] == ["1"]
        # README's alert expression matches the disk with the policy's threshold (scaled to 0 to fire now).
        expr = "standby_disk_rpo_seconds > on(instance, job) group_left() (standby_ps_rpo_threshold_seconds * 0)"
        fired = json.loads(get(f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert [s["metric"]["disk"] for s in fired["data"]["result"]] == ["disk0"], fired
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print((tmp_path / "prometheus.log").read_text(errors="replace")[-2000:])
