"""Which vCenter VM a standby machine is: the VM whose BIOS UUID is the system UUID the machine's agent
or master target reported (proto `about`), in any added vCenter. A machine matched by none is physical,
or its vCenter is not added: the product then works as without vCenter."""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry
from .vcenters import VCenterStore


@dataclass(frozen=True)
class VmPlace:
    vcenter: str
    vm: str  # the VM's instance UUID (unique in a vCenter, unlike its name)
    name: str


def machine_uuids(registry: Registry) -> dict[str, str]:
    """{machine name: its reported system UUID} for machines that reported one."""
    return {m["name"]: m["system_uuid"] for m in registry.machines() if m.get("system_uuid")}


def locate_vm(store: VCenterStore, registry: Registry, machine: str) -> VmPlace | None:
    """Blocking (vSphere calls): run it in a thread."""
    from standby.vsphere.connect import connect
    from standby.vsphere.inventory import list_vms, match_machine

    uuid = machine_uuids(registry).get(machine)
    if not uuid:
        return None
    for name in store.names():
        with connect(store.get(name)) as s:
            for vm in list_vms(s):
                if match_machine(vm, {machine: uuid}) == machine:
                    return VmPlace(name, vm.instance_uuid, vm.name)
    return None
