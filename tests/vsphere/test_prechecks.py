"""Master-target prechecks against the simulator: every rule with a passing and a failing case, the
refusal's text, and `fix` changing disk.EnableUUID and nothing else."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from standby.vsphere.connect import connect
from standby.vsphere.inventory import DatastoreMount, extra_config, vm_host, vm_info
from standby.vsphere.objects import find_vm, properties
from standby.vsphere.prechecks import MAX_DISKS, RULES, Facts, check_master_target, evaluate, fix, refusal
from standby.vsphere.tasks import wait

from .vmsetup import MT, add_controller, add_device, ready_master_target, set_extra

PROTECTED = "DC0_C0_RP0_VM0"  # on a cluster host; its disk on LocalDS_0, which every host mounts
IDS = ["enable-uuid", "no-snapshots", "lsi-logic", "disk-limit", "tools-running", "vmfs-datastore",
       "datastore-mounted"]


def by_rule(findings: list) -> dict:
    assert [f.rule for f in findings] == IDS  # every rule, in a fixed order
    return {f.rule: f for f in findings}


def failed(findings: list) -> set[str]:
    return {f.rule for f in findings if not f.ok}


def test_rules_are_the_documented_ones() -> None:
    assert [r.id for r in RULES] == IDS and all(r.title and "\n" not in r.title for r in RULES)


def test_ready_master_target_passes_every_rule(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        ready_master_target(s)
        findings = check_master_target(s, MT, [PROTECTED], new_disks=3)
    assert failed(findings) == set() and refusal(findings) is None
    rules = by_rule(findings)
    assert all(f.fix == "" for f in findings)
    assert "LocalDS_0" in rules["datastore-mounted"].detail and "LocalDS_0" in rules["vmfs-datastore"].detail
    assert "1 disks attached" in rules["disk-limit"].detail and "3 to attach" in rules["disk-limit"].detail


def test_default_vm_fails_enable_uuid_and_lsi_logic(vcsim) -> None:
    """The simulator's VMs have a ParaVirtual controller only and no disk.EnableUUID."""
    with connect(vcsim.vcenter()) as s:
        findings = check_master_target(s, MT)
    assert failed(findings) == {"enable-uuid", "lsi-logic"}
    rules = by_rule(findings)
    assert "pvscsi" in rules["lsi-logic"].detail and "ParaVirtual is not supported" in rules["lsi-logic"].detail
    assert rules["datastore-mounted"].detail == "no protected VMs given"


def test_enable_uuid_false_fails_and_lowercase_true_passes(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        vm = ready_master_target(s)
        set_extra(vm, "disk.EnableUUID", "FALSE")
        off = by_rule(check_master_target(s, MT))["enable-uuid"]
        set_extra(vm, "disk.enableuuid", "true")
        on = by_rule(check_master_target(s, MT))["enable-uuid"]
    assert not off.ok and "not TRUE" in off.detail and "`standby mt check MT --fix`" in off.fix
    assert on.ok


def test_snapshot_fails_no_snapshots(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        vm = ready_master_target(s)
        wait(vm.CreateSnapshot_Task(name="before-upgrade", memory=False, quiesce=False), "snapshot")
        findings = check_master_target(s, MT)
    assert failed(findings) == {"no-snapshots"}
    assert "delta files" in by_rule(findings)["no-snapshots"].detail


def test_lsi_logic_sas_passes(vcsim) -> None:
    from standby.vsphere.api import vim

    with connect(vcsim.vcenter()) as s:
        vm = find_vm(s, MT)
        set_extra(vm, "disk.EnableUUID", "TRUE")
        assert failed(check_master_target(s, MT)) == {"lsi-logic"}
        add_controller(vm, vim.vm.device.VirtualLsiLogicSASController, bus=2)
        findings = check_master_target(s, MT)
    assert failed(findings) == set() and "bus 2" in by_rule(findings)["lsi-logic"].detail


def test_disk_limit_counts_attached_and_new_disks(vcsim) -> None:
    from standby.vsphere.api import vim

    dev = vim.vm.device
    with connect(vcsim.vcenter()) as s:
        vm = ready_master_target(s)
        lsi = next(c for c in vm_info(s, vm).controllers if c.kind == "lsilogic")
        backing = dev.VirtualDisk.FlatVer2BackingInfo(fileName=f"[LocalDS_0] {MT}/r1.vmdk", diskMode="persistent")
        add_device(vm, dev.VirtualDisk(key=-1, controllerKey=lsi.key, unitNumber=0, capacityInKB=1024,
                                       backing=backing), create=True)
        attached = len(vm_info(s, vm).disks)
        assert attached == 2
        at_limit = check_master_target(s, MT, new_disks=MAX_DISKS - attached)
        over = check_master_target(s, MT, new_disks=MAX_DISKS - attached + 1)
        way_over = check_master_target(s, MT, new_disks=61)
    assert failed(at_limit) == set()
    assert failed(over) == {"disk-limit"} and failed(way_over) == {"disk-limit"}
    assert "= 61" in by_rule(over)["disk-limit"].detail and "over the limit of 60" in by_rule(over)["disk-limit"].detail


def test_tools_not_running_fails(start_vcsim) -> None:
    with connect(start_vcsim("-tools=false").vcenter()) as s:
        ready_master_target(s)
        findings = check_master_target(s, MT)
    assert failed(findings) == {"tools-running"}
    assert "VMware Tools" in by_rule(findings)["tools-running"].fix


def test_no_vmfs_datastore_fails(start_vcsim) -> None:
    with connect(start_vcsim("-vmfs=false").vcenter()) as s:
        ready_master_target(s)
        findings = check_master_target(s, MT, [PROTECTED])
    assert failed(findings) == {"vmfs-datastore"}
    assert "LocalDS_0 (OTHER, readWrite)" in by_rule(findings)["vmfs-datastore"].detail


def test_protected_vm_on_a_datastore_the_mt_host_lacks_fails(vcsim, tmp_path: Path) -> None:
    """A NAS datastore on the protected VM's host only, and a disk of the protected VM on it."""
    from standby.vsphere.api import vim

    dev = vim.vm.device
    (tmp_path / "nas1").mkdir()
    with connect(vcsim.vcenter()) as s:
        ready_master_target(s)
        vm = find_vm(s, PROTECTED)
        host = properties(s, [vm], vim.VirtualMachine, ["runtime.host"])[vm]["runtime.host"]
        host.configManager.datastoreSystem.CreateNasDatastore(vim.host.NasVolume.Specification(
            remoteHost="nfs.example", remotePath="/export/nas1", localPath=str(tmp_path / "nas1"),
            accessMode="readOnly", type="NFS"))
        pv = next(c for c in vm_info(s, vm).controllers if c.kind == "pvscsi")
        backing = dev.VirtualDisk.FlatVer2BackingInfo(fileName="[nas1] data.vmdk", diskMode="persistent")
        add_device(vm, dev.VirtualDisk(key=-1, controllerKey=pv.key, unitNumber=1, capacityInKB=1024,
                                       backing=backing), create=True)
        assert vm_info(s, vm).datastores == ("LocalDS_0", "nas1")
        findings = check_master_target(s, MT, [PROTECTED, "DC0_H0_VM1"])
    assert failed(findings) == {"datastore-mounted"}
    f = by_rule(findings)["datastore-mounted"]
    assert f.detail == f"host DC0_H0 does not mount read/write: nas1 (VM {PROTECTED})"
    assert "host DC0_H0" in f.fix


def test_read_only_mount_fails_datastore_mounted(vcsim) -> None:
    """The simulator ignores a NAS spec's accessMode (it has no read-only mounts), so the read-only case
    runs the rules on the real facts with the mount turned read-only."""
    with connect(vcsim.vcenter()) as s:
        ready_master_target(s)
        mt = find_vm(s, MT)
        facts = Facts(vm_info(s, mt), vm_host(s, mt), (vm_info(s, find_vm(s, PROTECTED)),))
    assert failed(evaluate(facts)) == set()
    ro = tuple(dataclasses.replace(m, access_mode="readOnly") for m in facts.host.datastores)
    findings = evaluate(dataclasses.replace(facts, host=dataclasses.replace(facts.host, datastores=ro)))
    assert failed(findings) == {"vmfs-datastore", "datastore-mounted"}
    assert "LocalDS_0 (VMFS, readOnly)" in by_rule(findings)["vmfs-datastore"].detail
    unmounted = DatastoreMount("LocalDS_0", "VMFS", "readWrite", False, True, 1)
    findings = evaluate(dataclasses.replace(facts, host=dataclasses.replace(facts.host, datastores=(unmounted,))))
    assert failed(findings) == {"vmfs-datastore", "datastore-mounted"}


def test_refusal_names_every_failed_rule_and_its_fix(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        text = refusal(check_master_target(s, MT, new_disks=61))
    assert text is not None
    lines = text.splitlines()
    assert lines[0] == "the master target fails 3 precheck(s):"
    assert lines[1].startswith("- enable-uuid: disk.EnableUUID is not TRUE on VM DC0_H0_VM0")
    assert lines[1].endswith("; fix: set disk.EnableUUID=TRUE in the VM's advanced configuration, or run "
                             "`standby mt check MT --fix`")
    assert lines[2].startswith("- lsi-logic: ") and "fix: power off VM DC0_H0_VM0 and add an LSI Logic" in lines[2]
    assert lines[3].startswith("- disk-limit: ") and "fix: protect fewer disks" in lines[3]


def test_fix_sets_enable_uuid_and_nothing_else(vcsim) -> None:
    from standby.vsphere.api import vim

    paths = ["config.hardware.device", "config.extraConfig", "snapshot", "runtime.powerState"]
    with connect(vcsim.vcenter()) as s:
        vm = find_vm(s, MT)
        before, raw = vm_info(s, vm), properties(s, [vm], vim.VirtualMachine, paths)[vm]
        changed = fix(s, MT)
        after, raw_after = vm_info(s, vm), properties(s, [vm], vim.VirtualMachine, paths)[vm]
        again = fix(s, MT)
        findings = check_master_target(s, MT)
    assert len(changed) == 1 and "disk.EnableUUID=TRUE on VM DC0_H0_VM0" in changed[0]
    assert "powered off and on again" in changed[0]
    assert again == []
    assert not before.enable_uuid and after == dataclasses.replace(before, enable_uuid=True)
    assert str(raw_after["config.hardware.device"]) == str(raw["config.hardware.device"])  # no value __eq__
    assert raw_after["runtime.powerState"] == raw["runtime.powerState"] and "snapshot" not in raw_after
    assert [(o.key, o.value) for o in raw_after["config.extraConfig"]] == \
        [(o.key, o.value) for o in raw["config.extraConfig"]] + [("disk.EnableUUID", "TRUE")]
    assert failed(findings) == {"lsi-logic"}  # the rule fix leaves to the operator


@pytest.mark.parametrize("power", ["poweredOn", "poweredOff"])
def test_fix_keeps_the_existing_key_spelling(vcsim, power: str) -> None:
    from standby.vsphere.api import vim

    with connect(vcsim.vcenter()) as s:
        vm = find_vm(s, MT)
        set_extra(vm, "disk.enableUUID", "FALSE")
        if power == "poweredOff":
            wait(vm.PowerOffVM_Task(), "power off")
        changed = fix(s, MT)
        extra = properties(s, [vm], vim.VirtualMachine, ["config.extraConfig"])[vm]["config.extraConfig"]
    # vCenter replaces the value of an existing key; the simulator appends a second entry, so look at the
    # last one: written under the VM's own spelling, never as a second, differently spelled key.
    assert [o.key for o in extra if o.key.lower() == "disk.enableuuid"][-1] == "disk.enableUUID"
    assert extra_config(extra, "disk.EnableUUID") == "TRUE"
    assert ("next powered on" in changed[0]) == (power == "poweredOff")
