"""A VM's shape: what a VM made at failover takes from the original (CPUs, cores per socket, memory,
firmware, guest id, SCSI controller type, one network per adapter).

It is read when the machine is protected and kept by the process server, because a failover happens when
the original site, and maybe its vCenter, is gone: the recovered VM must not need the original to answer."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .connect import Session
from .disks import disks_of
from .objects import container, find_vm, properties

DEFAULT_SCSI = "VirtualLsiLogicController"  # when the original has none: the one most guests have a driver for


@dataclass(frozen=True)
class VmShape:
    cpus: int
    cores_per_socket: int
    memory_mb: int
    firmware: str  # bios or efi
    guest_id: str
    scsi: str  # the pyVmomi class name of the controller its disks are on
    networks: tuple[str, ...]  # per network adapter: the name of its network or distributed port group

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "networks": list(self.networks)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> VmShape:
        return cls(**{**raw, "networks": tuple(raw["networks"])})


def shape_of(session: Session, vm_key: str) -> VmShape:
    from .api import vim

    vm = find_vm(session, vm_key)
    p = properties(session, [vm], vim.VirtualMachine, [
        "config.hardware.numCPU", "config.hardware.numCoresPerSocket", "config.hardware.memoryMB",
        "config.firmware", "config.guestId", "config.hardware.device"])[vm]
    devices = p.get("config.hardware.device") or []
    scsi = [d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)]
    used = {d.controller_key for d in disks_of(devices)}
    ctrl = next((c for c in scsi if c.key in used), scsi[0] if scsi else None)
    return VmShape(
        cpus=int(p.get("config.hardware.numCPU") or 1),
        cores_per_socket=int(p.get("config.hardware.numCoresPerSocket") or 1),
        memory_mb=int(p.get("config.hardware.memoryMB") or 1024),
        firmware=str(p.get("config.firmware") or "bios"),
        guest_id=str(p.get("config.guestId") or "otherGuest64"),
        scsi=type(ctrl).__name__.rpartition(".")[2] if ctrl is not None else DEFAULT_SCSI,
        networks=tuple(_network_names(session, devices)),
    )


def _network_names(session: Session, devices: list[Any]) -> list[str]:
    from .api import vim

    nics = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    groups: dict[str, str] = {}
    if any(getattr(d.backing, "port", None) for d in nics):
        pgs = container(session, vim.dvs.DistributedVirtualPortgroup)
        groups = {p["key"]: p["name"] for p in
                  properties(session, pgs, vim.dvs.DistributedVirtualPortgroup, ["key", "name"]).values()}
    names = []
    for d in nics:
        port = getattr(d.backing, "port", None)
        names.append(groups.get(port.portgroupKey, "") if port else str(getattr(d.backing, "deviceName", "") or ""))
    return names


def scsi_class(shape: VmShape) -> Any:
    """The controller class a shape names; LSI Logic for a name that is not a SCSI controller of pyVmomi's."""
    from .api import vim

    cls = getattr(vim.vm.device, shape.scsi, None)
    ok = isinstance(cls, type) and issubclass(cls, vim.vm.device.VirtualSCSIController)
    return cls if ok else getattr(vim.vm.device, DEFAULT_SCSI)
