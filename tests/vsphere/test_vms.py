"""Failover and failback VM steps against govmomi's simulator: power off and on, the replica disks put
into the original VM (refused while it runs or when its disks are not the expected ones, put back when
vSphere fails), and a VM created from them on the master target's host like the original."""

from __future__ import annotations

from typing import Any

import pytest

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode
from standby.vsphere import disks, tasks, vms
from standby.vsphere.connect import connect
from standby.vsphere.objects import container, find_by_name, find_vm, properties
from standby.vsphere.shape import VmShape, shape_of

from .test_disks import DS, GIB, MT, add_controller, ds_dir

ORIGINAL = "DC0_H0_VM0"  # the protected machine's VM; its disk: [LocalDS_0] DC0_H0_VM0/disk1.vmdk


def replicas(s: Any, names: list[str]) -> list[str]:
    """Replica disks made on the master target and detached again, as at failover."""
    add_controller(s, MT, "VirtualLsiLogicController", 1)
    made = disks.create_and_attach(s, MT, DS, "standby/web01", [(n, GIB) for n in names])
    return disks.detach(s, MT, [r.file for r in made])


def disk_slots(s: Any, vm_key: str) -> list[tuple[int, int, str]]:
    return [(d.controller_key, d.unit, d.file) for d in disks.disks_of(disks.devices_of(s, find_vm(s, vm_key)))]


def power_state(s: Any, vm_key: str) -> str:
    from standby.vsphere.api import vim

    vm = find_vm(s, vm_key)
    return str(properties(s, [vm], vim.VirtualMachine, ["runtime.powerState"])[vm]["runtime.powerState"])


def test_power_off_and_on_report_what_they_did(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        assert vms.power_off(s, ORIGINAL) == f"VM {ORIGINAL} poweredOff" and power_state(s, ORIGINAL) == "poweredOff"
        assert vms.power_off(s, ORIGINAL) == f"VM {ORIGINAL} was already poweredOff"
        assert vms.power_on(s, ORIGINAL) == f"VM {ORIGINAL} poweredOn" and power_state(s, ORIGINAL) == "poweredOn"
        assert vms.power_on(s, ORIGINAL) == f"VM {ORIGINAL} was already poweredOn"


def test_reattach_to_original_and_back(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        [replica] = replicas(s, ["sda"])
        [(ckey, unit, own)] = disk_slots(s, ORIGINAL)
        with pytest.raises(RequestFailed) as e:
            vms.reattach_to_original(s, ORIGINAL, [replica], [own])
        assert e.value.code == ErrorCode.REFUSED and f"VM {ORIGINAL} is poweredOn" in str(e.value)
        assert disk_slots(s, ORIGINAL) == [(ckey, unit, own)]

        vms.power_off(s, ORIGINAL)
        with pytest.raises(RequestFailed) as e:
            vms.reattach_to_original(s, ORIGINAL, [replica], ["[LocalDS_0] other/disk.vmdk"])
        assert e.value.code == ErrorCode.REFUSED
        assert f"it has {own} not expected, and lacks [LocalDS_0] other/disk.vmdk" in str(e.value)
        with pytest.raises(RequestFailed) as e:
            vms.reattach_to_original(s, ORIGINAL, [replica, replica], [own])
        assert e.value.code == ErrorCode.BAD_INPUT

        [got] = vms.reattach_to_original(s, ORIGINAL, [replica], [own])
        assert (got.file, got.controller_key, got.unit) == (replica, ckey, unit)
        assert disk_slots(s, ORIGINAL) == [(ckey, unit, replica)]
        assert (ds_dir(s) / "DC0_H0_VM0" / "disk1.vmdk").exists()  # the original's file is kept

        vms.reattach_to_original(s, ORIGINAL, [own], [replica])  # failback: the original disk again
        assert disk_slots(s, ORIGINAL) == [(ckey, unit, own)]
        assert (ds_dir(s) / "standby/web01/sda.vmdk").exists()


def test_reattach_failure_leaves_the_original_disks(vcsim) -> None:
    """A descriptor without its extent: the listing shows the file, vSphere cannot open it."""
    with connect(vcsim.vcenter()) as s:
        (ds_dir(s) / "broken").mkdir()
        (ds_dir(s) / "broken" / "sda.vmdk").write_text("# Disk DescriptorFile\n")
        before = disk_slots(s, ORIGINAL)
        vms.power_off(s, ORIGINAL)
        with pytest.raises(RequestFailed) as e:
            vms.reattach_to_original(s, ORIGINAL, ["[LocalDS_0] broken/sda.vmdk"], None)
        assert f"replace the disks of VM {ORIGINAL} failed in vSphere: FileNotFound" in str(e.value)
        assert "as before" in str(e.value)
        assert disk_slots(s, ORIGINAL) == before


def set_like(s: Any) -> None:
    """Give the original VM values the simulator's defaults do not have, so copying them is seen."""
    from standby.vsphere.api import vim

    spec = vim.vm.ConfigSpec(numCPUs=4, numCoresPerSocket=2, memoryMB=3072, firmware="efi", guestId="ubuntu64Guest")
    tasks.wait(find_vm(s, ORIGINAL).ReconfigVM_Task(spec), "set up the original VM")


def test_create_vm_from_disks_like_the_original(vcsim) -> None:
    from standby.vsphere.api import vim

    with connect(vcsim.vcenter()) as s:
        set_like(s)
        files = replicas(s, ["sda", "sdb"])
        moid = vms.create_vm_from_disks(s, "web01-rec", shape_of(s, ORIGINAL), "DC0_H0", DS, files, power_on=True)
        vm = find_vm(s, "web01-rec")
        assert vm._moId == moid
        paths = ["config.hardware.numCPU", "config.hardware.numCoresPerSocket", "config.hardware.memoryMB",
                 "config.firmware", "config.guestId", "runtime.powerState", "runtime.host", "config.hardware.device",
                 "network"]
        new, old = (properties(s, [v], vim.VirtualMachine, paths)[v] for v in (vm, find_vm(s, ORIGINAL)))
        for p in paths[:5]:
            assert new[p] == old[p], p
        assert (new["config.hardware.numCPU"], new["config.firmware"]) == (4, "efi")
        assert str(new["runtime.powerState"]) == "poweredOn"
        assert new["runtime.host"] == find_by_name(s, vim.HostSystem, "DC0_H0", "host")
        nics = [d for d in new["config.hardware.device"] if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        old_nics = [d for d in old["config.hardware.device"] if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        assert len(nics) == len(old_nics) >= 1 and all(isinstance(n, vim.vm.device.VirtualVmxnet3) for n in nics)
        assert list(new["network"]) == list(old["network"])
        ctrls = [d for d in new["config.hardware.device"] if isinstance(d, vim.vm.device.VirtualSCSIController)]
        assert [type(c) for c in ctrls] == [vim.vm.device.ParaVirtualSCSIController]  # the original's type
        assert [(u, f) for _, u, f in disk_slots(s, "web01-rec")] == [(0, files[0]), (1, files[1])]


def test_create_vm_refusals_and_cleanup(vcsim) -> None:
    from standby.vsphere.api import vim

    with connect(vcsim.vcenter()) as s:
        files = replicas(s, ["sda"])
        with pytest.raises(RequestFailed) as e:
            vms.create_vm_from_disks(s, "DC0_H0_VM1", shape_of(s, ORIGINAL), "DC0_H0", DS, files)
        assert e.value.code == ErrorCode.REFUSED and "a VM named DC0_H0_VM1 exists already" in str(e.value)
        with pytest.raises(RequestFailed) as e:
            vms.create_vm_from_disks(s, "web01-rec", shape_of(s, ORIGINAL), "DC0_H0", DS,
                                     files + ["[LocalDS_0] r/gone.vmdk"])
        assert e.value.code == ErrorCode.MISSING and "no such file [LocalDS_0] r/gone.vmdk" in str(e.value)
        with pytest.raises(RequestFailed) as e:
            vms.create_vm_from_disks(s, "web01-rec", shape_of(s, ORIGINAL), "DC0_H0", "nods", files)
        assert e.value.code == ErrorCode.MISSING and "no datastore 'nods'" in str(e.value)

        # a descriptor without its extent passes the listing, and vSphere fails to attach it after CreateVM
        (ds_dir(s) / "broken").mkdir()
        (ds_dir(s) / "broken" / "sdb.vmdk").write_text("# Disk DescriptorFile\n")
        names_before = sorted(p["name"] for p in properties(s, container(s, vim.VirtualMachine), vim.VirtualMachine,
                                                            ["name"]).values())
        with pytest.raises(RequestFailed) as e:
            vms.create_vm_from_disks(s, "web01-rec", shape_of(s, ORIGINAL), "DC0_H0", DS,
                                     files + ["[LocalDS_0] broken/sdb.vmdk"])
        assert "attach 2 disks to VM web01-rec failed in vSphere: FileNotFound" in str(e.value)
        assert "the new VM web01-rec was destroyed again; the replica disk files are kept" in str(e.value)
        names = sorted(p["name"] for p in properties(s, container(s, vim.VirtualMachine), vim.VirtualMachine,
                                                     ["name"]).values())
        assert names == names_before
        assert (ds_dir(s) / "standby/web01/sda.vmdk").exists() and (ds_dir(s) / "standby/web01/sda-flat.vmdk").exists()


def test_a_shape_round_trips_through_json_and_names_a_scsi_class(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        shape = shape_of(s, ORIGINAL)
    assert VmShape.from_json(shape.to_json()) == shape
    assert shape.scsi == "ParaVirtualSCSIController" and len(shape.networks) >= 1 and shape.cpus >= 1
    from standby.vsphere.api import vim
    from standby.vsphere.shape import scsi_class

    assert scsi_class(shape) is vim.vm.device.ParaVirtualSCSIController
    odd = VmShape.from_json({**shape.to_json(), "scsi": "VirtualE1000"})  # not a SCSI controller: LSI Logic
    assert scsi_class(odd) is vim.vm.device.VirtualLsiLogicController
