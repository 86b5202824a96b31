"""Many agents and disks at once through one process server into one master target."""

from __future__ import annotations

from tests.conftest import needs_loop, needs_qemu_img

from .conftest import MiB, fill_mixed, qemu_compare

pytestmark = [needs_loop, needs_qemu_img]


def test_two_agents_three_disks_concurrently(deployment, make_loop, tmp_path):
    sources = {}
    deployment.enroll("mt", "mt1")
    deployment.start("mt", "mt1")
    for agent, disks in (("a1", ("sda", "sdb")), ("a2", ("vda",))):
        deployment.enroll("agent", agent)
        for i, disk in enumerate(disks):
            dev = make_loop(24 * MiB + i * 4096, f"{agent}-{disk}")
            fill_mixed(dev, 24 * MiB + i * 4096, seed=sum(map(ord, agent + disk)))
            deployment.add_disk(agent, disk, dev)
            sources[(agent, disk)] = dev
        deployment.set_agent_option(agent, batch_size="1M")
        deployment.start("agent", agent)
    deployment.wait_disks_known("a1", 2)
    deployment.wait_disks_known("a2", 1)
    deployment.wait_mt_connected("mt1")
    rdir = tmp_path / "replicas"
    rdir.mkdir()
    admin = deployment.admin()
    admin.call("protect", machine="a1", mt="mt1", format="vmdk", replica_dir=str(rdir))
    admin.call("protect", machine="a2", mt="mt1", format="vmdk-sparse", replica_dir=str(rdir))
    deployment.wait_synced("a1", timeout=120)
    st = deployment.wait_synced("a2", timeout=120)
    assert len(st["disks"]) == 3
    for d in st["disks"]:
        assert d["error"] is None
        res = qemu_compare(sources[(d["machine"], d["disk"])], d["replica"], d["format"])
        assert res.returncode == 0, (d, res.stdout, res.stderr)
