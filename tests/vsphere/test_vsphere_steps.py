"""The process server's vSphere steps where they refuse or fail: nothing is left half done, and the same
command can be run again. Simulator plus loop devices, like test_end_to_end.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from standby.vsphere.connect import connect
from standby.vsphere.objects import find_by_name
from standby.vsphere.vms import power_off
from tests.deploy import LocalDeployment

from .sites import DR_MT_VM, SOURCE_VM, agent, cli, master_target, same, vm_of, write
from .vmsetup import set_extra

pytestmark = pytest.mark.root


def _datastore_dir(site: dict[str, Any]) -> Path:
    from standby.vsphere.api import vim

    with connect(site["vc"]) as s:
        return Path(find_by_name(s, vim.Datastore, "LocalDS_0", "datastore").summary.url)


def _protected(deployment: LocalDeployment, site: dict[str, Any], tmp_path: Path) -> tuple[dict[str, str], dict]:
    """web01 protected into mtdr's VM and caught up: (its devices, {disk: replica VMDK})."""
    files = {f"sd{'ab'[i]}": d.file for i, d in enumerate(vm_of(site["vc"], SOURCE_VM).disks)}
    master_target(deployment, site, "mtdr", DR_MT_VM, tmp_path)
    devs = agent(deployment, site, "web01", SOURCE_VM, files)
    for n, dev in enumerate(devs.values()):
        write(dev, n)
    res = cli(deployment, "protect", "web01", "--mt", "mtdr")
    deployment.wait_synced("web01", timeout=120)
    deployment.wait_caught_up("web01", time.time())
    return devs, {d["disk"]: d["vmdk"] for d in res["disks"]}


def test_protect_refused_by_a_precheck_creates_nothing(deployment: LocalDeployment, site, tmp_path: Path) -> None:
    with connect(site["vc"]) as s:
        from standby.vsphere.objects import find_vm

        set_extra(find_vm(s, DR_MT_VM), "disk.EnableUUID", "FALSE")
    files = {f"sd{'ab'[i]}": d.file for i, d in enumerate(vm_of(site["vc"], SOURCE_VM).disks)}
    master_target(deployment, site, "mtdr", DR_MT_VM, tmp_path)
    agent(deployment, site, "web01", SOURCE_VM, files)
    before = vm_of(site["vc"], DR_MT_VM).disks
    r = deployment.cli("protect", "web01", "--mt", "mtdr")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "fails the vSphere prechecks" in r.stderr and "enable-uuid" in r.stderr and "--fix" in r.stderr
    assert vm_of(site["vc"], DR_MT_VM).disks == before
    assert not (_datastore_dir(site) / "standby-web01").exists()
    assert deployment.status()["disks"][0]["replication"] == "Off"


def test_protect_removes_what_it_created_when_the_guest_never_shows_a_disk(deployment: LocalDeployment, site,
                                                                           tmp_path: Path) -> None:
    deployment.set_ps_option(vsphere_device_wait=2.0)
    deployment.kill("ps", 15)
    deployment.wait_listening(deployment.start("ps"))
    files = {f"sd{'ab'[i]}": d.file for i, d in enumerate(vm_of(site["vc"], SOURCE_VM).disks)}
    guest = master_target(deployment, site, "mtdr", DR_MT_VM, tmp_path)
    guest.stop()  # the master target's guest does not see hot-added disks (no rescan)
    agent(deployment, site, "web01", SOURCE_VM, files)
    before = vm_of(site["vc"], DR_MT_VM).disks
    r = deployment.cli("protect", "web01", "--mt", "mtdr")
    assert r.returncode == 2, r.stdout + r.stderr  # missing
    assert "Rescan the SCSI bus" in r.stderr and "removed again" in r.stderr, r.stderr
    assert vm_of(site["vc"], DR_MT_VM).disks == before
    assert not list((_datastore_dir(site) / "standby-web01").glob("*.vmdk"))
    assert deployment.status()["disks"][0]["replication"] == "Off"


def test_a_failed_commit_puts_the_disks_back_and_runs_again(deployment: LocalDeployment, site,
                                                            tmp_path: Path) -> None:
    devs, vmdks = _protected(deployment, site, tmp_path)
    shape = vm_of(site["vc"], SOURCE_VM)
    deployment.kill("agent-web01", 15)
    with connect(site["vc"]) as s:  # the protected site is lost: its VM is gone (the shape was kept at protect)
        from standby.vsphere.objects import find_vm
        from standby.vsphere.tasks import wait

        power_off(s, SOURCE_VM)
        wait(find_vm(s, SOURCE_VM).Destroy_Task(), "destroy the source VM")
    cli(deployment, "failover", "web01", "--point", "latest")
    r = deployment.cli("commit", "web01", "--vm-name", "DC0_H0_VM1")  # a VM of that name exists
    assert r.returncode == 1, r.stdout + r.stderr
    assert "exists already" in r.stderr and "attached to the master target VM again" in r.stderr, r.stderr
    assert set(vmdks.values()) <= {d.file for d in vm_of(site["vc"], DR_MT_VM).disks}
    done = cli(deployment, "commit", "web01", "--vm-name", "web01-dr")
    assert "new VM web01-dr" in done["vm"]["what"], done
    assert [d.file for d in vm_of(site["vc"], "web01-dr").disks] == [vmdks["sda"], vmdks["sdb"]]
    dr = vm_of(site["vc"], "web01-dr")
    assert dr.power_state == "poweredOff"  # not asked to power on
    assert (dr.num_cpu, dr.memory_mb, dr.firmware, dr.nic_count) == (shape.num_cpu, shape.memory_mb, shape.firmware,
                                                                    shape.nic_count)
    for disk, dev in devs.items():
        assert same(dev, site["images"].image(vmdks[disk]))


def test_commit_into_the_original_vm(deployment: LocalDeployment, site, tmp_path: Path) -> None:
    devs, vmdks = _protected(deployment, site, tmp_path)
    own = [d.file for d in vm_of(site["vc"], SOURCE_VM).disks]
    slots = [(d.controller_key, d.unit) for d in vm_of(site["vc"], SOURCE_VM).disks]
    cli(deployment, "failover", "web01", "--point", "latest")
    r = deployment.cli("commit", "web01", "--vm", "original")
    assert r.returncode == 1 and "poweredOn" in r.stderr and "power it off" in r.stderr, r.stderr
    deployment.kill("agent-web01", 15)
    with connect(site["vc"]) as s:
        power_off(s, SOURCE_VM)
    out = json.loads(deployment.cli("commit", "web01", "--vm", "original", "--power-on", "--json").stdout)
    assert "in place of the disks of the original VM" in out["vm"]["what"], out
    after = vm_of(site["vc"], SOURCE_VM)
    assert [d.file for d in after.disks] == [vmdks["sda"], vmdks["sdb"]]
    assert [(d.controller_key, d.unit) for d in after.disks] == slots and after.power_state == "poweredOn"
    ds = _datastore_dir(site)
    assert all((ds / f.split("] ")[1]).exists() for f in own), "the original VM's own disk files are kept"


@pytest.mark.parametrize("delete", [False, True], ids=["kept", "deleted"])
def test_unprotect_takes_the_replica_vmdks_off_the_master_target_vm(deployment: LocalDeployment, site,
                                                                     tmp_path: Path, delete: bool) -> None:
    _, vmdks = _protected(deployment, site, tmp_path)
    r = deployment.cli("unprotect", "web01", *(["--delete-replicas"] if delete else []))
    assert r.returncode == 0, r.stdout + r.stderr
    word = "deleted" if delete else "detached from the master target VM, kept"
    assert all(f"in vSphere: {f} {word}" in r.stdout for f in vmdks.values()), r.stdout
    assert not set(vmdks.values()) & {d.file for d in vm_of(site["vc"], DR_MT_VM).disks}
    folder = _datastore_dir(site) / "standby-web01"
    assert {p.name for p in folder.glob("*.vmdk") if "-flat" not in p.name} == (set() if delete else
                                                                                {"sda.vmdk", "sdb.vmdk"})
