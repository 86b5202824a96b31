"""A VM protected through vCenter, failed over to a new VM and failed back into the original VM.

The vSphere side is govmomi's simulator: it creates the replica VMDKs on the master target VM's host,
attaches and detaches them, creates the recovered VM and gives the original VM its disks back. The data
side is loop devices (tests/vsphere/guest.py): each simulator VMDK has an image file; the protected VM's
agent reads loop devices over its VMDKs' images, and a master target finds each VMDK attached to its VM as
<by-id dir>/wwn-0x<disk UUID>, a loop device over that VMDK's image, as Linux shows it with
disk.EnableUUID=TRUE. Real processes (process server, two master targets, two agents), real TLS.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from standby.vsphere.connect import VCenter, connect
from standby.vsphere.disks import create_and_attach, detach
from standby.vsphere.inventory import VmInfo, vm_info
from standby.vsphere.objects import find_vm
from standby.vsphere.vms import power_off
from tests.deploy import LocalDeployment
from tests.tools import need

from .guest import Guest, Images
from .vmsetup import add_controller, ready_master_target

MiB = 1 << 20
SIZE = 16 * MiB
SOURCE_VM = "DC0_C0_RP0_VM0"  # the protected machine, web01
DR_MT_VM = "DC0_H0_VM0"  # the recovery site's master target, mtdr
HOME_MT_VM = "DC0_C0_RP0_VM1"  # the original site's master target, mthome
pytestmark = pytest.mark.root


def _vm(vc: VCenter, key: str) -> VmInfo:
    with connect(vc) as s:
        return vm_info(s, find_vm(s, key))


def _cli(dep: LocalDeployment, *args: str) -> dict[str, Any]:
    r = dep.cli(*args, "--json", timeout=600)
    assert r.returncode == 0, f"{args}: {r.stdout} {r.stderr}"
    return json.loads(r.stdout)


def _write(dev: str, seed: int, count: int = 40) -> None:
    rng = random.Random(seed)
    fd = os.open(dev, os.O_WRONLY)
    try:
        for _ in range(count):
            os.pwrite(fd, rng.randbytes(64 * 1024), rng.randrange(SIZE // 4096 - 16) * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)


def _same(a: Path | str, b: Path | str) -> bool:
    return Path(a).read_bytes() == Path(b).read_bytes()


def _attach(image: Path, loops: list[str]) -> str:
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()
    loops.append(dev)
    return dev


@pytest.fixture
def site(deployment: LocalDeployment, vcsim, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The simulator readied (two master target VMs, a source VM with two 16 MiB disks on an LSI Logic
    controller), its vCenter added, and the images of the source VM's disks."""
    need("losetup")
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices")
    vc = vcsim.vcenter()
    images = Images(tmp_path / "images")
    with connect(vc) as s:
        ready_master_target(s, DR_MT_VM)
        ready_master_target(s, HOME_MT_VM)
        from pyVmomi import vim

        src = find_vm(s, SOURCE_VM)
        add_controller(src, vim.vm.device.VirtualLsiLogicController)
        detach(s, SOURCE_VM, [d.file for d in vm_info(s, src).disks])  # its system disk: not replicated here
        for d in create_and_attach(s, SOURCE_VM, "LocalDS_0", "web01", [("sda", SIZE), ("sdb", SIZE)]):
            images.know(d.file, d.uuid, SIZE)
    pw = tmp_path / "vc-password"
    pw.write_text(vcsim.password)
    r = deployment.cli("vcenter", "add", "vc1", "--host", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
                       "--password-file", str(pw))
    assert r.returncode == 0, r.stderr
    loops: list[str] = []
    guests: list[Guest] = []
    try:
        yield {"vc": vc, "images": images, "loops": loops, "guests": guests}
    finally:
        deployment.stop_all()
        for g in guests:
            g.stop()
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
        for g in guests:
            assert not g.errors, g.errors


def _master_target(dep: LocalDeployment, site: dict[str, Any], name: str, vm: str, tmp: Path) -> Guest:
    by_id = tmp / f"by-id-{name}"
    guest = Guest(site["vc"], vm, by_id, site["images"]).start()
    site["guests"].append(guest)
    dep.enroll("mt", name)
    dep.set_mt_config(name, system_uuid=_vm(site["vc"], vm).bios_uuid, disk_by_id_dir=str(by_id))
    dep.start("mt", name)
    dep.wait_mt_connected(name)
    return guest


def _agent(dep: LocalDeployment, site: dict[str, Any], name: str, vm: str, files: dict[str, str]) -> dict[str, str]:
    """Agent `name` in VM `vm`: its disks are loop devices over the images of the VM's VMDKs `files`."""
    dep.enroll("agent", name)
    devs = {disk: _attach(site["images"].image(f, SIZE), site["loops"]) for disk, f in files.items()}
    for disk, dev in devs.items():
        dep.add_disk(name, disk, dev)
    dep.set_agent_option(name, cut_interval=0.3, system_uuid=_vm(site["vc"], vm).bios_uuid)
    dep.start("agent", name)
    dep.wait_disks_known(name, len(devs))
    return devs


def test_protect_failover_to_a_new_vm_and_fail_back_into_the_original(deployment: LocalDeployment, site,
                                                                      tmp_path: Path) -> None:
    vc, images = site["vc"], site["images"]
    src_before = _vm(vc, SOURCE_VM)
    src_files = {f"sd{'ab'[i]}": d.file for i, d in enumerate(src_before.disks)}
    slots = {d.file: (d.controller_key, d.unit) for d in src_before.disks}
    dr = _master_target(deployment, site, "mtdr", DR_MT_VM, tmp_path)
    web01 = _agent(deployment, site, "web01", SOURCE_VM, src_files)
    for n, dev in enumerate(web01.values()):
        _write(dev, n)

    # protect: replica VMDKs created on the master target VM's host and attached to it
    res = _cli(deployment, "protect", "web01", "--mt", "mtdr")
    vmdks = {d["disk"]: d["vmdk"] for d in res["disks"]}
    assert vmdks == {"sda": "[LocalDS_0] standby-web01/sda.vmdk", "sdb": "[LocalDS_0] standby-web01/sdb.vmdk"}, res
    assert {d.file for d in _vm(vc, DR_MT_VM).disks} >= set(vmdks.values())
    assert all(d["replica"].startswith(str(tmp_path / "by-id-mtdr") + "/wwn-0x6000c29") for d in res["disks"])
    deployment.wait_synced("web01", timeout=120)
    for n, dev in enumerate(web01.values()):
        _write(dev, 10 + n)
    deployment.wait_caught_up("web01", time.time())
    for disk, dev in web01.items():
        assert _same(dev, images.image(vmdks[disk])), f"replica of {disk} differs from the source"

    # failover, commit: the replicas leave the master target VM for a new VM shaped like the original
    _cli(deployment, "failover", "web01", "--point", "latest")
    done = _cli(deployment, "commit", "web01", "--vm", "alternate", "--power-on")
    assert "new VM web01-recovered" in done["vm"]["what"], done
    rec = _vm(vc, "web01-recovered")
    assert rec.power_state == "poweredOn" and rec.num_cpu == src_before.num_cpu
    assert rec.memory_mb == src_before.memory_mb and rec.firmware == src_before.firmware
    assert [d.file for d in rec.disks] == [vmdks["sda"], vmdks["sdb"]]
    assert not set(vmdks.values()) & {d.file for d in _vm(vc, DR_MT_VM).disks}
    assert not dr.devices(), "the master target's guest no longer shows the replica disks"
    for disk, dev in web01.items():
        assert _same(dev, images.image(vmdks[disk])), f"the recovered VM's {disk} is not the source at the point"

    # the original VM is down; the recovered one runs and writes
    deployment.kill("agent-web01", 15)
    with connect(vc) as s:
        power_off(s, SOURCE_VM)
    home = _master_target(deployment, site, "mthome", HOME_MT_VM, tmp_path)
    rec_devs = _agent(deployment, site, "web01-rec", "web01-recovered", vmdks)
    for n, dev in enumerate(rec_devs.values()):
        _write(dev, 20 + n)

    # reprotect to the original location: the original VM lends its own disks to mthome's VM
    out = _cli(deployment, "reprotect", "web01", "--agent", "web01-rec", "--mt", "mthome")
    assert out["mode"] == "checksum", out
    assert not _vm(vc, SOURCE_VM).disks and set(src_files.values()) <= {d.file for d in _vm(vc, HOME_MT_VM).disks}
    assert set(home.devices()) == set(src_files.values())
    deployment.wait_for(lambda s: any(t["name"] == "web01" and t["state"].startswith("ready to fail back")
                                      for t in s["roundtrips"]), 240, "ready to fail back")
    for n, dev in enumerate(rec_devs.values()):
        _write(dev, 30 + n)

    # planned failback, then commit: the disks go back into the original VM's slots
    assert _cli(deployment, "failback", "web01")["phase"] == "synchronising"
    deployment.wait_for(lambda s: any(t["name"] == "web01" and t["state"].startswith("synchronising: ready")
                                      for t in s["roundtrips"]), 240, "ready to complete")
    result = _cli(deployment, "failback", "web01", "--complete")["result"]
    assert result["no_data_loss"], result
    back = _cli(deployment, "commit", "web01", "--power-on")
    assert "given back to the original VM" in back["vm"]["what"], back
    src_after = _vm(vc, SOURCE_VM)
    assert {d.file: (d.controller_key, d.unit) for d in src_after.disks} == slots
    assert src_after.power_state == "poweredOn"
    assert not home.devices() and not set(src_files.values()) & {d.file for d in _vm(vc, HOME_MT_VM).disks}
    for disk, dev in rec_devs.items():
        assert _same(dev, images.image(src_files[disk])), f"the original VM's {disk} differs from the recovered one"
