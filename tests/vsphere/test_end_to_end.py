"""A VM protected through vCenter, failed over to a new VM and failed back into the original VM.

The vSphere side is govmomi's simulator: it creates the replica VMDKs on the master target VM's host,
attaches and detaches them, creates the recovered VM and gives the original VM its disks back. The data
side is loop devices (tests/vsphere/guest.py): each simulator VMDK has an image file; the protected VM's
agent reads loop devices over its VMDKs' images, and a master target finds each VMDK attached to its VM as
<by-id dir>/wwn-0x<disk UUID>, a loop device over that VMDK's image, as Linux shows it with
disk.EnableUUID=TRUE. Real processes (process server, two master targets, two agents), real TLS.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from standby.vsphere.connect import connect
from standby.vsphere.vms import power_off
from tests.deploy import LocalDeployment

from .sites import (
    DR_MT_VM,
    HOME_MT_VM,
    SOURCE_VM,
    agent,
    cli,
    master_target,
    reattach_agent_disks,
    same,
    vm_of,
    write,
)

pytestmark = pytest.mark.root

def test_protect_failover_to_a_new_vm_and_fail_back_into_the_original(deployment: LocalDeployment, site,
                                                                      tmp_path: Path) -> None:
    vc, images = site["vc"], site["images"]
    src_before = vm_of(vc, SOURCE_VM)
    src_files = {f"sd{'ab'[i]}": d.file for i, d in enumerate(src_before.disks)}
    slots = {d.file: (d.controller_key, d.unit) for d in src_before.disks}
    dr = master_target(deployment, site, "mtdr", DR_MT_VM, tmp_path)
    web01 = agent(deployment, site, "web01", SOURCE_VM, src_files)
    for n, dev in enumerate(web01.values()):
        write(dev, n)

    # protect: replica VMDKs created on the master target VM's host and attached to it
    res = cli(deployment, "protect", "web01", "--mt", "mtdr")
    vmdks = {d["disk"]: d["vmdk"] for d in res["disks"]}
    assert vmdks == {"sda": "[LocalDS_0] standby-web01/sda.vmdk", "sdb": "[LocalDS_0] standby-web01/sdb.vmdk"}, res
    assert {d.file for d in vm_of(vc, DR_MT_VM).disks} >= set(vmdks.values())
    assert all(d["replica"].startswith(str(tmp_path / "by-id-mtdr") + "/wwn-0x6000c29") for d in res["disks"])
    deployment.wait_synced("web01", timeout=120)
    for n, dev in enumerate(web01.values()):
        write(dev, 10 + n)
    deployment.wait_caught_up("web01", time.time())
    for disk, dev in web01.items():
        assert same(dev, images.image(vmdks[disk])), f"replica of {disk} differs from the source"

    # failover, commit: the replicas leave the master target VM for a new VM shaped like the original
    cli(deployment, "failover", "web01", "--point", "latest")
    done = cli(deployment, "commit", "web01", "--vm", "alternate", "--power-on")
    assert "new VM web01-recovered" in done["vm"]["what"], done
    rec = vm_of(vc, "web01-recovered")
    assert rec.power_state == "poweredOn" and rec.num_cpu == src_before.num_cpu
    assert rec.memory_mb == src_before.memory_mb and rec.firmware == src_before.firmware
    assert [d.file for d in rec.disks] == [vmdks["sda"], vmdks["sdb"]]
    assert not set(vmdks.values()) & {d.file for d in vm_of(vc, DR_MT_VM).disks}
    assert dr.shows(set()), "the master target's guest no longer shows the replica disks"
    for disk, dev in web01.items():
        assert same(dev, images.image(vmdks[disk])), f"the recovered VM's {disk} is not the source at the point"

    # the original VM is down; the recovered one runs and writes
    deployment.kill("agent-web01", 15)
    with connect(vc) as s:
        power_off(s, SOURCE_VM)
    home = master_target(deployment, site, "mthome", HOME_MT_VM, tmp_path)
    rec_devs = agent(deployment, site, "web01-rec", "web01-recovered", vmdks)
    for n, dev in enumerate(rec_devs.values()):
        write(dev, 20 + n)

    # reprotect to the original location: the original VM lends its own disks to mthome's VM
    out = cli(deployment, "reprotect", "web01", "--agent", "web01-rec", "--mt", "mthome")
    assert out["mode"] == "checksum", out
    assert not vm_of(vc, SOURCE_VM).disks and set(src_files.values()) <= {d.file for d in vm_of(vc, HOME_MT_VM).disks}
    assert home.shows(set(src_files.values()))
    deployment.wait_for(lambda s: any(t["name"] == "web01" and t["state"].startswith("ready to fail back")
                                      for t in s["roundtrips"]), 240, "ready to fail back")
    for n, dev in enumerate(rec_devs.values()):
        write(dev, 30 + n)

    # planned failback, then commit: the disks go back into the original VM's slots
    assert cli(deployment, "failback", "web01")["phase"] == "synchronising"
    deployment.wait_for(lambda s: any(t["name"] == "web01" and t["state"].startswith("synchronising: ready")
                                      for t in s["roundtrips"]), 240, "ready to complete")
    result = cli(deployment, "failback", "web01", "--complete")["result"]
    assert result["no_data_loss"], result
    back = cli(deployment, "commit", "web01", "--power-on")
    assert "given back to the original VM" in back["vm"]["what"], back
    src_after = vm_of(vc, SOURCE_VM)
    assert {d.file: (d.controller_key, d.unit) for d in src_after.disks} == slots
    assert src_after.power_state == "poweredOn"
    assert home.shows(set()) and not set(src_files.values()) & {d.file for d in vm_of(vc, HOME_MT_VM).disks}
    for disk, dev in rec_devs.items():
        assert same(dev, images.image(src_files[disk])), f"the original VM's {disk} differs from the recovered one"

    # reverse replication: the recovered VM, shut down, lends its disks (the replicas) to mtdr's VM again
    deployment.kill("agent-web01-rec", 15)
    with connect(vc) as s:
        power_off(s, "web01-recovered")
    web01 = reattach_agent_disks(deployment, site, "web01", src_files)
    deployment.start("agent", "web01")
    for n, dev in enumerate(web01.values()):
        write(dev, 40 + n)
    out = cli(deployment, "reverse", "web01")
    assert {d["disk"]: d["vmdk"] for d in out["disks"]} == vmdks, out
    assert not vm_of(vc, "web01-recovered").disks and dr.shows(set(vmdks.values()))
    deployment.wait_synced("web01", timeout=120)
    deployment.wait_caught_up("web01", time.time())
    for disk, dev in web01.items():
        assert same(dev, images.image(vmdks[disk])), f"reverse replication: replica of {disk} differs"

    # and fail over again: the replicas go back into the recovered VM, in their slots
    cli(deployment, "failover", "web01", "--point", "latest")
    again = cli(deployment, "commit", "web01")
    assert "given back to the original VM web01-recovered" in again["vm"]["what"], again
    assert [d.file for d in vm_of(vc, "web01-recovered").disks] == [vmdks["sda"], vmdks["sdb"]]
