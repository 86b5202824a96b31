"""Shaping simulator VMs for a test through the vSphere API itself (ReconfigVM_Task, CreateSnapshot_Task):
the simulator's default VMs have only a ParaVirtual SCSI controller and no disk.EnableUUID."""

from __future__ import annotations

from typing import Any

from standby.vsphere.connect import Session
from standby.vsphere.objects import find_vm
from standby.vsphere.tasks import wait

MT = "DC0_H0_VM0"  # on the standalone host DC0_H0


def reconfig(vm: Any, **spec: Any) -> None:
    from standby.vsphere.api import vim

    wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(**spec)), "test reconfigure")


def add_device(vm: Any, device: Any, create: bool = False) -> None:
    from standby.vsphere.api import vim

    change = vim.vm.device.VirtualDeviceSpec(operation="add", device=device)
    if create:
        change.fileOperation = "create"
    reconfig(vm, deviceChange=[change])


def add_controller(vm: Any, kind: Any, bus: int = 1, key: int = -1) -> None:
    """A SCSI controller of class `kind` (vim.vm.device.VirtualLsiLogicController...) on `bus`."""
    add_device(vm, kind(key=key, busNumber=bus, sharedBus="noSharing"))


def set_extra(vm: Any, key: str, value: str) -> None:
    from standby.vsphere.api import vim

    reconfig(vm, extraConfig=[vim.option.OptionValue(key=key, value=value)])


def ready_master_target(session: Session, name: str = MT) -> Any:
    """The VM `name` made to pass the VM's own rules: an LSI Logic controller on bus 1 and EnableUUID."""
    from standby.vsphere.api import vim

    vm = find_vm(session, name)
    add_controller(vm, vim.vm.device.VirtualLsiLogicController)
    set_extra(vm, "disk.EnableUUID", "TRUE")
    return vm
