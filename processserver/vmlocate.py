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


def locate_vms(store: VCenterStore, registry: Registry, machines: list[str]) -> dict[str, VmPlace]:
    """{machine: its VM} for those of `machines` that are VMs: one listing per vCenter for all of them,
    stopping once each is found. Blocking (vSphere calls): run it in a thread."""
    from standby.vsphere.connect import connect
    from standby.vsphere.inventory import list_vms, match_machine

    uuids = {m: u for m, u in machine_uuids(registry).items() if m in machines}
    found: dict[str, VmPlace] = {}
    for name in store.names():
        if len(found) == len(uuids):
            break
        with connect(store.get(name)) as s:
            for vm in list_vms(s):
                m = match_machine(vm, {k: v for k, v in uuids.items() if k not in found})
                if m is not None:
                    found[m] = VmPlace(name, vm.instance_uuid, vm.name)
    return found

