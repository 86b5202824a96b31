"""Replica disks against govmomi's simulator: created on the datastore (a local directory there, its
`summary.url`), attached to the master-target VM's LSI Logic controllers, refused before anything is
created, removed again when a later disk fails, detached keeping the files, attached elsewhere, deleted."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode
from standby.vsphere import disks
from standby.vsphere.connect import connect
from standby.vsphere.objects import find_by_name, find_vm, properties
from standby.vsphere.tasks import TaskFailed

MT = "DC0_H0_VM1"  # the master target in these tests; DC0_H0_VM0 is a protected machine's VM
DS = "LocalDS_0"
GIB = 2**30


def add_controller(session: Any, vm_key: str, kind: str, bus: int) -> None:
    """Add a SCSI controller of `kind` (VirtualLsiLogicController...) on `bus` to the VM: the simulator's
    VMs have a ParaVirtual one only."""
    from standby.vsphere.api import vim

    ctrl = getattr(vim.vm.device, kind)(key=-100 - bus, busNumber=bus, sharedBus="noSharing")
    disks.reconfigure(find_vm(session, vm_key), [vim.vm.device.VirtualDeviceSpec(operation="add", device=ctrl)],
                      f"add {kind}")


def controller_keys(session: Any, vm_key: str, kind: str) -> list[int]:
    return [d.key for d in disks.devices_of(session, find_vm(session, vm_key)) if type(d).__name__.endswith(kind)]


def ds_dir(session: Any) -> Path:
    from standby.vsphere.api import vim

    ds = find_by_name(session, vim.Datastore, DS, "datastore")
    return Path(properties(session, [ds], vim.Datastore, ["summary.url"])[ds]["summary.url"])


def files(session: Any, folder: str) -> list[str]:
    d = ds_dir(session) / folder
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_uuid_and_guest_device_name() -> None:
    u = disks.new_disk_uuid()
    assert re.fullmatch(r"6000C29[0-9a-f]-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", u)
    assert u != disks.new_disk_uuid()
    assert disks.guest_device_name("6000C294-0d5b-cd7e-9bf5-5f7c1d8d1b6d") == "wwn-0x6000c2940d5bcd7e9bf55f7c1d8d1b6d"
    with pytest.raises(RequestFailed):
        disks.guest_device_name("6000C294-0d5b")


def test_create_and_attach_on_lsi_controller(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        add_controller(s, MT, "VirtualLsiLogicController", 1)
        [lsi] = controller_keys(s, MT, "VirtualLsiLogicController")
        made = disks.create_and_attach(s, MT, DS, "standby/web01", [("sda", GIB), ("sdb", 10 * 2**20 + 512)])
        assert [(r.name, r.file, r.controller_key, r.unit) for r in made] == [
            ("sda", "[LocalDS_0] standby/web01/sda.vmdk", lsi, 0),
            ("sdb", "[LocalDS_0] standby/web01/sdb.vmdk", lsi, 1),
        ]
        assert made[1].capacity_bytes == 10 * 2**20 + 1024  # rounded up to whole KiB
        reported = {d.file: d for d in disks.disks_of(disks.devices_of(s, find_vm(s, MT)))}
        for r in made:
            assert re.fullmatch(r"6000C29[0-9a-f]-[-0-9a-f]{27}", r.uuid) and reported[r.file].uuid == r.uuid
            assert disks.guest_device_name(r.uuid) == "wwn-0x" + r.uuid.replace("-", "").lower()
        assert files(s, "standby/web01") == ["sda-flat.vmdk", "sda.vmdk", "sdb-flat.vmdk", "sdb.vmdk"]


def test_full_controller_then_next_one_and_refusal_when_none_has_room(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        add_controller(s, MT, "VirtualLsiLogicController", 1)
        made = disks.create_and_attach(s, MT, DS, "r", [(f"d{i}", 2**20) for i in range(15)])
        assert [r.unit for r in made] == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15]  # never 7
        with pytest.raises(RequestFailed) as e:
            disks.create_and_attach(s, MT, DS, "r", [("more", 2**20)])
        assert e.value.code == ErrorCode.REFUSED and "0 free units on LSI Logic" in str(e.value)
        assert "more.vmdk" not in files(s, "r") and len(files(s, "r")) == 30
        add_controller(s, MT, "VirtualLsiLogicSASController", 2)
        [sas] = controller_keys(s, MT, "VirtualLsiLogicSASController")
        [r] = disks.create_and_attach(s, MT, DS, "r", [("more", 2**20)])
        assert (r.controller_key, r.unit) == (sas, 0)


def test_paravirtual_controller_only_is_refused(vcsim) -> None:
    with connect(vcsim.vcenter()) as s, pytest.raises(RequestFailed) as e:
        disks.create_and_attach(s, MT, DS, "r", [("sda", GIB)])
    assert e.value.code == ErrorCode.REFUSED and "add an LSI Logic" in str(e.value)
    with connect(vcsim.vcenter()) as s:
        assert files(s, "r") == []


def test_sixty_disks_refused_before_anything_is_created(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        for bus in range(4):
            add_controller(s, MT, "VirtualLsiLogicController", bus)
        with pytest.raises(RequestFailed) as e:
            disks.create_and_attach(s, MT, DS, "r", [(f"d{i}", 2**20) for i in range(60)])  # + its own disk
        assert e.value.code == ErrorCode.REFUSED and "limit of 60" in str(e.value)
        assert not (ds_dir(s) / "r").exists()
        assert len(disks.create_and_attach(s, MT, DS, "r", [(f"d{i}", 2**20) for i in range(59)])) == 59


def test_unknown_vm_datastore_and_bad_sizes_refused(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        add_controller(s, MT, "VirtualLsiLogicController", 1)
        for vm, ds, size, code in [("nope", DS, GIB, ErrorCode.MISSING), (MT, "nods", GIB, ErrorCode.MISSING),
                                   (MT, DS, 1000, ErrorCode.BAD_INPUT), (MT, DS, 0, ErrorCode.BAD_INPUT)]:
            with pytest.raises(RequestFailed) as e:
                disks.create_and_attach(s, vm, ds, "r", [("sda", size)])
            assert e.value.code == code
        assert files(s, "r") == []


def test_existing_file_refused(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        add_controller(s, MT, "VirtualLsiLogicController", 1)
        disks.create_and_attach(s, MT, DS, "r", [("sda", GIB)])
        with pytest.raises(RequestFailed) as e:
            disks.create_and_attach(s, MT, DS, "r", [("sdb", GIB), ("sda", GIB)])
        assert e.value.code == ErrorCode.REPLICA_EXISTS and "[LocalDS_0] r/sda.vmdk already exist" in str(e.value)
        assert files(s, "r") == ["sda-flat.vmdk", "sda.vmdk"]


def test_failure_of_a_later_disk_removes_the_earlier_ones(vcsim) -> None:
    """vSphere refuses the 3rd disk (a file name longer than the file system allows): the first two are
    detached and deleted again, and the error names the step and the fault."""
    with connect(vcsim.vcenter()) as s:
        add_controller(s, MT, "VirtualLsiLogicController", 1)
        before = [d.file for d in disks.disks_of(disks.devices_of(s, find_vm(s, MT)))]
        with pytest.raises(TaskFailed) as e:
            disks.create_and_attach(s, MT, DS, "r", [("sda", GIB), ("sdb", GIB), ("x" * 300, GIB)])
        msg = str(e.value)
        assert "create disk [LocalDS_0] r/xxx" in msg and e.value.fault in msg
        assert "the 2 disks created before it were removed again, nothing is left" in msg
        assert files(s, "r") == []
        assert [d.file for d in disks.disks_of(disks.devices_of(s, find_vm(s, MT)))] == before


def test_detach_keeps_files_and_attach_existing_elsewhere(vcsim) -> None:
    with connect(vcsim.vcenter()) as s:
        add_controller(s, MT, "VirtualLsiLogicController", 1)
        made = disks.create_and_attach(s, MT, DS, "r", [("sda", GIB), ("sdb", GIB)])
        paths = [r.file for r in made]
        with pytest.raises(RequestFailed) as e:
            disks.detach(s, MT, [paths[0], "[LocalDS_0] r/nope.vmdk"])
        assert e.value.code == ErrorCode.BAD_INPUT and "has no disk [LocalDS_0] r/nope.vmdk" in str(e.value)
        with pytest.raises(RequestFailed) as e:  # still attached to the master target
            disks.attach_existing(s, "DC0_H0_VM0", paths)
        assert e.value.code == ErrorCode.IN_USE and f"attached to VM {MT}" in str(e.value)

        assert disks.detach(s, MT, paths) == paths
        assert not {d.file for d in disks.disks_of(disks.devices_of(s, find_vm(s, MT)))} & set(paths)
        assert files(s, "r") == ["sda-flat.vmdk", "sda.vmdk", "sdb-flat.vmdk", "sdb.vmdk"]

        with pytest.raises(RequestFailed) as e:
            disks.attach_existing(s, "DC0_H0_VM0", paths + ["[LocalDS_0] r/gone.vmdk"])
        assert e.value.code == ErrorCode.MISSING and "no such file [LocalDS_0] r/gone.vmdk" in str(e.value)
        with pytest.raises(RequestFailed) as e:
            disks.attach_existing(s, "DC0_H0_VM0", paths, lsi_only=True)
        assert e.value.code == ErrorCode.REFUSED and "0 free units on LSI Logic" in str(e.value)
        got = disks.attach_existing(s, "DC0_H0_VM0", paths)  # its ParaVirtual controller: unit 0 is its disk
        assert [(g.name, g.file, g.unit) for g in got] == [("sda", paths[0], 1), ("sdb", paths[1], 2)]
        # vSphere reads the UUID from the VMDK; govmomi's simulator keeps none in its files and reports ""
        assert got[0].uuid in (made[0].uuid, "")
        with pytest.raises(RequestFailed) as e:
            disks.delete_files(s, paths)
        assert e.value.code == ErrorCode.IN_USE
        disks.detach(s, "DC0_H0_VM0", paths)
        back = disks.attach_existing(s, MT, paths, lsi_only=True)  # reprotect: the master target's again
        assert [(g.controller_key, g.unit) for g in back] == [(r.controller_key, r.unit) for r in made]
        disks.detach(s, MT, paths)
        assert disks.delete_files(s, paths) == paths
        assert files(s, "r") == []
