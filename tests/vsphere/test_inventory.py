"""Discovery against the simulator: VMs with their disks and controllers, hosts with their datastore
mounts, and which standby machine a VM is by its BIOS UUID."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from standby.vsphere.connect import connect
from standby.vsphere.inventory import (
    DatastoreMount,
    host_info,
    list_vms,
    match_machine,
    system_uuid_forms,
    vm_host,
    vm_info,
)
from standby.vsphere.objects import container, find_by_name, find_vm
from standby.vsphere.tasks import wait

from .vmsetup import MT, add_controller, add_device, set_extra


def test_list_vms_reads_the_default_inventory(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        vms = list_vms(s)
        assert list_vms(s) == vms  # stable
    assert [v.name for v in vms] == ["DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1", "DC0_H0_VM0", "DC0_H0_VM1"]
    hosts = {"DC0_H0", "DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2"}
    for v in vms:
        assert v.power_state == "poweredOn" and v.host in hosts and v.datastores == ("LocalDS_0",)
        assert len(system_uuid_forms(v.bios_uuid)) == 2 and v.instance_uuid != v.bios_uuid
        assert v.tools_running and not v.has_snapshots and not v.enable_uuid and not v.template
        assert v.num_cpu >= 1 and v.memory_mb > 0 and v.nic_count == 1 and v.firmware == "bios"
        (disk,) = v.disks
        assert disk.file == f"[LocalDS_0] {v.name}/disk1.vmdk" and disk.datastore == "LocalDS_0"
        assert disk.controller == "pvscsi" and (disk.bus, disk.unit) == (0, 0) and disk.capacity_bytes > 0
        assert disk.uuid == ""  # the simulator sets no backing UUID of its own
        pv = [c for c in v.controllers if c.key == disk.controller_key]
        assert [(c.kind, c.bus) for c in pv] == [("pvscsi", 0)] and 0 in pv[0].units


def test_vm_info_sees_controllers_disks_extra_config_and_snapshots(vcsim) -> None:
    from standby.vsphere.api import vim

    dev = vim.vm.device
    with connect(vcsim.vcenter()) as s:
        vm = find_vm(s, MT)
        before = vm_info(s, vm)
        add_controller(vm, dev.VirtualLsiLogicController, bus=1, key=-10)
        add_controller(vm, dev.VirtualLsiLogicSASController, bus=2, key=-11)
        lsi = next(c for c in vm_info(s, vm).controllers if c.kind == "lsilogic")
        backing = dev.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[LocalDS_0] {MT}/replica1.vmdk", diskMode="persistent", thinProvisioned=True,
            uuid="6000C29a-0000-0000-0000-000000000001")
        add_device(vm, dev.VirtualDisk(key=-1, controllerKey=lsi.key, unitNumber=3, capacityInKB=2048,
                                       backing=backing), create=True)
        set_extra(vm, "disk.enableUUID", "true")  # the VMX matches keys and TRUE case-insensitively
        wait(vm.CreateSnapshot_Task(name="s1", memory=False, quiesce=False), "snapshot")
        after = vm_info(s, vm)
    assert not before.has_snapshots and after.has_snapshots and after.enable_uuid
    assert {(c.kind, c.bus) for c in after.controllers} >= {("lsilogic", 1), ("lsilogic-sas", 2), ("pvscsi", 0)}
    new = next(d for d in after.disks if d.file.endswith("replica1.vmdk"))
    assert (new.controller, new.controller_key, new.bus, new.unit) == ("lsilogic", lsi.key, 1, 3)
    assert new.capacity_bytes == 2048 * 1024 and new.datastore == "LocalDS_0"
    assert new.uuid.lower() == "6000c29a-0000-0000-0000-000000000001"
    assert next(c for c in after.controllers if c.key == lsi.key).units == (3,)
    assert dataclasses.replace(after, disks=before.disks, controllers=before.controllers, has_snapshots=False,
                               enable_uuid=False) == before


def test_host_mounts_with_and_without_a_mount_entry(vcsim) -> None:
    """The simulator keeps a mount entry for the shared datastore on the last host only; every host still
    has it in HostSystem.datastore and reports it mounted read/write (see inventory's docstring)."""
    from standby.vsphere.api import vim

    with connect(vcsim.vcenter()) as s:
        hosts = {h.name: h for h in map(lambda o: host_info(s, o), container(s, vim.HostSystem))}
        assert vm_host(s, find_vm(s, MT)) == hosts["DC0_H0"]
    assert set(hosts) == {"DC0_H0", "DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2"}
    for h in hosts.values():
        (m,) = h.datastores
        assert (m.name, m.type, m.access_mode) == ("LocalDS_0", "VMFS", "readWrite") and m.mounted and m.accessible
        assert m.free_bytes > 0 and m.writable


def test_nas_datastore_on_one_host_only(vcsim, tmp_path: Path) -> None:
    from standby.vsphere.api import vim

    (tmp_path / "nas1").mkdir()
    with connect(vcsim.vcenter()) as s:
        h1 = find_by_name(s, vim.HostSystem, "DC0_C0_H1", "host")
        h1.configManager.datastoreSystem.CreateNasDatastore(vim.host.NasVolume.Specification(
            remoteHost="nfs.example", remotePath="/export/nas1", localPath=str(tmp_path / "nas1"),
            accessMode="readWrite", type="NFS"))
        on_h1 = host_info(s, h1)
        on_h0 = host_info(s, find_by_name(s, vim.HostSystem, "DC0_H0", "host"))
    assert [m.name for m in on_h1.datastores] == ["LocalDS_0", "nas1"]
    assert on_h1.datastores[1].type == "NFS" and on_h1.datastores[1].writable
    assert [m.name for m in on_h0.datastores] == ["LocalDS_0"]


def test_readonly_or_unmounted_mount_is_not_writable() -> None:
    m = DatastoreMount("ds", "VMFS", "readWrite", True, True, 1)
    assert m.writable
    assert not dataclasses.replace(m, access_mode="readOnly").writable
    assert not dataclasses.replace(m, mounted=False).writable
    assert not dataclasses.replace(m, accessible=False).writable


def test_system_uuid_forms_swap_the_first_three_fields() -> None:
    forms = system_uuid_forms("265104DE-1472-547C-B873-6DC7883FB6CB ")
    assert forms == {"265104de-1472-547c-b873-6dc7883fb6cb", "de045126-7214-7c54-b873-6dc7883fb6cb"}
    assert system_uuid_forms("de045126-7214-7c54-b873-6dc7883fb6cb") == forms
    assert system_uuid_forms("not-a-uuid") == set() and system_uuid_forms("") == set()


def test_match_machine_by_bios_uuid_in_either_byte_order(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        vm, other = (vm_info(s, find_vm(s, name)) for name in (MT, "DC0_H0_VM1"))
    swapped = (system_uuid_forms(vm.bios_uuid) - {vm.bios_uuid}).pop()
    machines = {"web01": other.bios_uuid, "db01": vm.bios_uuid.upper(), "bad": "garbage"}
    assert match_machine(vm, machines) == "db01"
    assert match_machine(vm, {**machines, "db01": swapped}) == "db01"
    assert match_machine(other, machines) == "web01"
    assert match_machine(vm, {"web01": other.bios_uuid}) is None
    assert match_machine(vm, {"a": vm.bios_uuid, "b": swapped}) is None  # clones: ambiguous, no guess
