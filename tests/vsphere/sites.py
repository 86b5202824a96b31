"""What the vSphere tests with data share: the simulator readied as two sites (a source VM with two
16 MiB disks, two master target VMs), master targets and agents that run "inside" those VMs (their system
UUID is the VM's BIOS UUID), and the data side on loop devices (guest.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from standby.vsphere.connect import VCenter, connect
from standby.vsphere.disks import create_and_attach, detach
from standby.vsphere.inventory import VmInfo, vm_info
from standby.vsphere.objects import find_vm
from tests.deploy import LocalDeployment
from tests.tools import need

from .guest import Guest, Images
from .vmsetup import add_controller, ready_master_target

MiB = 1 << 20
SIZE = 16 * MiB
SOURCE_VM = "DC0_C0_RP0_VM0"  # the protected machine, web01
DR_MT_VM = "DC0_H0_VM0"  # the recovery site's master target, mtdr
HOME_MT_VM = "DC0_C0_RP0_VM1"  # the original site's master target, mthome


def vm_of(vc: VCenter, key: str) -> VmInfo:
    with connect(vc) as s:
        return vm_info(s, find_vm(s, key))


def cli(dep: LocalDeployment, *args: str) -> dict[str, Any]:
    r = dep.cli(*args, "--json", timeout=600)
    assert r.returncode == 0, f"{args}: {r.stdout} {r.stderr}"
    return json.loads(r.stdout)


def write(dev: str, seed: int, count: int = 40) -> None:
    rng = random.Random(seed)
    fd = os.open(dev, os.O_WRONLY)
    try:
        for _ in range(count):
            os.pwrite(fd, rng.randbytes(64 * 1024), rng.randrange(SIZE // 4096 - 16) * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)


def same(a: Path | str, b: Path | str) -> bool:
    return Path(a).read_bytes() == Path(b).read_bytes()


def attach(image: Path, loops: list[str]) -> str:
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()
    loops.append(dev)
    return dev


def make_site(deployment: LocalDeployment, vcsim, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The body of the `site` fixture (conftest): the simulator readied (two master target VMs, a source VM
    with two 16 MiB disks on an LSI Logic controller), its vCenter added, and the images of the source VM's
    disks."""
    need("losetup")
    if os.geteuid() != 0:
        pytest.skip("needs root for loop devices")
    vc = vcsim.vcenter()
    images = Images(tmp_path / "images")
    with connect(vc) as s:
        ready_master_target(s, DR_MT_VM)
        ready_master_target(s, HOME_MT_VM)
        from standby.vsphere.api import vim

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


def master_target(dep: LocalDeployment, site: dict[str, Any], name: str, vm: str, tmp: Path) -> Guest:
    by_id = tmp / f"by-id-{name}"
    guest = Guest(site["vc"], vm, by_id, site["images"]).start()
    site["guests"].append(guest)
    dep.enroll("mt", name)
    dep.set_mt_config(name, system_uuid=vm_of(site["vc"], vm).bios_uuid, disk_by_id_dir=str(by_id))
    dep.start("mt", name)
    dep.wait_mt_connected(name)
    return guest


def agent(dep: LocalDeployment, site: dict[str, Any], name: str, vm: str, files: dict[str, str]) -> dict[str, str]:
    """Agent `name` in VM `vm`: its disks are loop devices over the images of the VM's VMDKs `files`."""
    dep.enroll("agent", name)
    devs = {disk: attach(site["images"].image(f, SIZE), site["loops"]) for disk, f in files.items()}
    for disk, dev in devs.items():
        dep.add_disk(name, disk, dev)
    dep.set_agent_option(name, cut_interval=0.3, system_uuid=vm_of(site["vc"], vm).bios_uuid)
    dep.start("agent", name)
    dep.wait_disks_known(name, len(devs))
    return devs




def reattach_agent_disks(dep: LocalDeployment, site: dict[str, Any], name: str,
                         files: dict[str, str]) -> dict[str, str]:
    """The VM of agent `name` powered on again: its disks are new loop devices over the same images (the
    old ones may hold pages cached before another VM wrote the image; a real guest sees its disks afresh
    after a power cycle). agent.toml points at them; the agent is not started."""
    from standby.plumbing.config import load_toml, save_toml

    conf = dep.root / f"agent-{name}" / "agent.toml"
    raw = load_toml(conf)
    devs = {disk: attach(site["images"].image(f, SIZE), site["loops"]) for disk, f in files.items()}
    for entry in raw["disks"]:
        entry["path"] = devs[entry["name"]]
    save_toml(conf, raw)
    return devs
