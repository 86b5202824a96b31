"""Discovery: what vCenter knows about its VMs, their disks and the datastores their hosts mount.

Everything is read through `objects.properties`, one PropertyCollector round trip per object kind (VMs,
then the hosts and datastores they name), never by attribute access; the results are small frozen
dataclasses, sorted so that two listings of the same inventory compare equal.

Datastore mounts. vCenter keeps a datastore's mounts twice: `HostSystem.datastore` (the datastores a host
has) and `Datastore.host` (one mount entry per host, with its access mode). A real vCenter keeps the two in
step. govmomi's simulator does not: it creates a shared datastore once per host under the same moref, so
only the last host's mount entry survives, and `CreateNasDatastore` records no mount entry at all and
ignores the spec's access mode (simulator/host_datastore_system.go). We therefore take "in
`host.datastore`" as mounted, and the access mode and accessibility from the datastore's mount entry for
that host when there is one; without one (seen only in the simulator) accessibility comes from
`summary.accessible` and the access mode is taken as readWrite, which is what the simulator itself
models (every datastore it creates is read/write; `summary.multipleHostAccess`, unset there, says
nothing about the mode either)."""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from .connect import Session
from .objects import container, properties

DISK_CONTROLLERS = ("lsilogic", "lsilogic-sas", "pvscsi", "buslogic", "ide", "sata", "nvme", "other")
TOOLS_RUNNING = "guestToolsRunning"


@dataclass(frozen=True)
class DiskInfo:
    label: str
    file: str  # "[datastore] dir/name.vmdk"
    datastore: str
    capacity_bytes: int
    controller: str  # one of DISK_CONTROLLERS
    controller_key: int
    bus: int
    unit: int
    uuid: str  # the backing's uuid, "" when unset


@dataclass(frozen=True)
class ControllerInfo:
    key: int
    kind: str  # one of DISK_CONTROLLERS
    bus: int
    units: tuple[int, ...]  # unit numbers in use by its devices (disks, CD-ROMs)


@dataclass(frozen=True)
class VmInfo:
    name: str
    moid: str
    power_state: str  # poweredOn, poweredOff, suspended
    bios_uuid: str  # config.uuid: what the guest reads as its system UUID
    instance_uuid: str
    guest_os: str
    host: str
    datastores: tuple[str, ...]  # every datastore its files or disks are on
    firmware: str  # bios, efi
    num_cpu: int
    memory_mb: int
    nic_count: int
    disks: tuple[DiskInfo, ...]
    controllers: tuple[ControllerInfo, ...]  # disk controllers only (SCSI, IDE, SATA, NVMe)
    has_snapshots: bool
    tools_running: bool
    enable_uuid: bool  # extraConfig disk.EnableUUID is TRUE: the guest sees each disk's UUID
    template: bool


@dataclass(frozen=True)
class DatastoreMount:
    name: str
    type: str  # VMFS, NFS, NFS41, vsan, vvol, OTHER
    access_mode: str  # readWrite, readOnly
    mounted: bool
    accessible: bool
    free_bytes: int

    @property
    def writable(self) -> bool:
        return self.mounted and self.accessible and self.access_mode == "readWrite"


@dataclass(frozen=True)
class HostInfo:
    name: str
    moid: str
    datastores: tuple[DatastoreMount, ...]


VM_PATHS = [
    "name", "config.uuid", "config.instanceUuid", "config.guestFullName", "config.firmware",
    "config.hardware.numCPU", "config.hardware.memoryMB", "config.hardware.device", "config.extraConfig",
    "config.template", "runtime.host", "runtime.powerState", "datastore", "snapshot",
    "guest.toolsRunningStatus",
]


def list_vms(session: Session) -> list[VmInfo]:
    """Every VM (and template) of the inventory, sorted by name then moid."""
    from .api import vim

    return vm_infos(session, container(session, vim.VirtualMachine))


def vm_info(session: Session, vm_obj: Any) -> VmInfo:
    return vm_infos(session, [vm_obj])[0]


def vm_host(session: Session, vm_obj: Any) -> HostInfo:
    """The host the VM runs on (or is registered on), with its datastore mounts."""
    from .api import vim

    host = properties(session, [vm_obj], vim.VirtualMachine, ["runtime.host"])[vm_obj].get("runtime.host")
    if host is None:
        return HostInfo("", "", ())
    return host_info(session, host)


def host_info(session: Session, host_obj: Any) -> HostInfo:
    from .api import vim

    p = properties(session, [host_obj], vim.HostSystem, ["name", "datastore"])[host_obj]
    dss = list(p.get("datastore") or [])
    dp = properties(session, dss, vim.Datastore, ["name", "summary", "host"])
    mounts = [_mount(host_obj, dp[ds]) for ds in dss]
    return HostInfo(str(p.get("name", "")), host_obj._moId, tuple(sorted(mounts, key=lambda m: m.name)))


def _mount(host_obj: Any, p: dict[str, Any]) -> DatastoreMount:
    """How `host_obj` mounts the datastore whose properties are `p` (see the module docstring)."""
    summary = p.get("summary")
    accessible = bool(getattr(summary, "accessible", False))
    mode = "readWrite"
    for entry in p.get("host") or []:
        if entry.key == host_obj:
            info = entry.mountInfo
            mode = str(info.accessMode)
            accessible = bool(info.accessible) if info.accessible is not None else accessible
            mounted = bool(info.mounted) if info.mounted is not None else True
            break
    else:
        mounted = True
    return DatastoreMount(
        name=str(p.get("name", "")), type=str(getattr(summary, "type", "") or ""), access_mode=mode,
        mounted=mounted, accessible=accessible, free_bytes=int(getattr(summary, "freeSpace", 0) or 0),
    )


def vm_infos(session: Session, vms: list[Any]) -> list[VmInfo]:
    """The VMs `vms`, sorted by name then moid, in three round trips whatever their number: the VMs, then
    their hosts' and datastores' names."""
    from .api import vim

    props = properties(session, vms, vim.VirtualMachine, VM_PATHS)
    hosts = {p["runtime.host"] for p in props.values() if p.get("runtime.host") is not None}
    host_names = {h: str(p.get("name", "")) for h, p in properties(session, list(hosts), vim.HostSystem,
                                                                     ["name"]).items()}
    dss: set[Any] = set()
    for p in props.values():
        dss.update(p.get("datastore") or [])
        dss.update(d.backing.datastore for d in _disks(p) if getattr(d.backing, "datastore", None))
    ds_names = {d: str(p.get("name", "")) for d, p in properties(session, list(dss), vim.Datastore,
                                                                   ["name"]).items()}
    infos = [_vm(vm, props[vm], host_names, ds_names) for vm in vms]
    return sorted(infos, key=lambda v: (v.name, v.moid))


def _vm(vm: Any, p: dict[str, Any], host_names: dict[Any, str], ds_names: dict[Any, str]) -> VmInfo:
    from .api import vim

    devices = list(p.get("config.hardware.device") or [])
    kinds = {d.key: _controller_kind(d) for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    controllers = tuple(sorted(
        (ControllerInfo(d.key, kinds[d.key], int(d.busNumber),
                        tuple(sorted({x.unitNumber for x in devices
                                      if x.controllerKey == d.key and x.unitNumber is not None})))
         for d in devices if kinds.get(d.key, "other") != "other"),
        key=lambda c: (c.kind, c.bus, c.key)))
    buses = {d.key: int(d.busNumber) for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    disks = tuple(sorted((_disk(d, kinds, buses, ds_names) for d in _disks(p)),
                         key=lambda d: (d.controller, d.bus, d.unit, d.label)))
    snapshot = p.get("snapshot")
    names = {ds_names.get(d, "") for d in p.get("datastore") or []} | {d.datastore for d in disks}
    return VmInfo(
        name=str(p.get("name", "")),
        moid=vm._moId,
        power_state=str(p.get("runtime.powerState", "")),
        bios_uuid=str(p.get("config.uuid") or ""),
        instance_uuid=str(p.get("config.instanceUuid") or ""),
        guest_os=str(p.get("config.guestFullName") or ""),
        host=host_names.get(p.get("runtime.host"), ""),
        datastores=tuple(sorted(n for n in names if n)),
        firmware=str(p.get("config.firmware") or ""),
        num_cpu=int(p.get("config.hardware.numCPU") or 0),
        memory_mb=int(p.get("config.hardware.memoryMB") or 0),
        nic_count=sum(isinstance(d, vim.vm.device.VirtualEthernetCard) for d in devices),
        disks=disks,
        controllers=controllers,
        has_snapshots=bool(snapshot is not None and snapshot.rootSnapshotList),
        tools_running=p.get("guest.toolsRunningStatus") == TOOLS_RUNNING,
        enable_uuid=extra_config(p.get("config.extraConfig"), "disk.EnableUUID").upper() == "TRUE",
        template=bool(p.get("config.template")),
    )


def extra_config(options: Any, key: str) -> str:
    """The value of extraConfig `key`, matched case-insensitively as the VMX file does; "" when absent.
    The last entry wins: vCenter keeps one entry per key, but govmomi's simulator appends every write."""
    values = [str(o.value).strip() for o in options or [] if str(o.key).lower() == key.lower()]
    return values[-1] if values else ""


def _disks(p: dict[str, Any]) -> list[Any]:
    from .api import vim

    return [d for d in p.get("config.hardware.device") or [] if isinstance(d, vim.vm.device.VirtualDisk)]


def _disk(d: Any, kinds: dict[int, str], buses: dict[int, int], ds_names: dict[Any, str]) -> DiskInfo:
    b = d.backing
    file = str(getattr(b, "fileName", "") or "")
    ds = ds_names.get(getattr(b, "datastore", None), "")
    if not ds and file.startswith("["):
        ds = file[1:].partition("]")[0]
    capacity = d.capacityInBytes if d.capacityInBytes else (d.capacityInKB or 0) * 1024
    return DiskInfo(
        label=str(d.deviceInfo.label if d.deviceInfo else ""), file=file, datastore=ds,
        capacity_bytes=int(capacity), controller=kinds.get(d.controllerKey, "other"),
        controller_key=int(d.controllerKey or 0), bus=buses.get(d.controllerKey, 0),
        unit=int(d.unitNumber if d.unitNumber is not None else -1), uuid=str(getattr(b, "uuid", "") or ""),
    )


def _controller_kind(c: Any) -> str:
    """One of DISK_CONTROLLERS; "other" for controllers that hold no disks (PCI, PS/2, SIO, USB)."""
    from .api import vim

    dev = vim.vm.device
    for cls, kind in ((dev.VirtualLsiLogicController, "lsilogic"), (dev.VirtualLsiLogicSASController, "lsilogic-sas"),
                      (dev.ParaVirtualSCSIController, "pvscsi"), (dev.VirtualBusLogicController, "buslogic"),
                      (dev.VirtualIDEController, "ide"), (dev.VirtualSATAController, "sata"),
                      (dev.VirtualNVMEController, "nvme")):
        if isinstance(c, cls):
            return kind
    return "other"


def system_uuid_forms(uuid: str) -> set[str]:
    """The lowercase forms under which a machine whose firmware UUID is `uuid` may show it: as given, and
    with the first three fields byte-swapped. SMBIOS 2.6 declared those three fields little-endian, and
    Linux decodes /sys/class/dmi/id/product_uuid (and dmidecode prints it) by the SMBIOS version the
    firmware reports, so depending on the VM's virtual hardware and firmware a guest shows vSphere's
    `config.uuid` either as-is or with those bytes swapped. Both forms name the same VM. Empty when
    `uuid` is not a UUID, so that a malformed value never matches anything."""
    try:
        u = uuidlib.UUID(uuid.strip())
    except (ValueError, AttributeError):
        return set()
    return {str(u), str(uuidlib.UUID(bytes_le=u.bytes))}


def match_machine(vm: VmInfo, machines: dict[str, str]) -> str | None:
    """The standby machine (name -> system UUID as the machine reads it) that is `vm`, by BIOS UUID in either
    byte order (see system_uuid_forms). None when none matches, or when several do: cloned machines that
    share a UUID cannot be told apart by it, and guessing would replicate the wrong one."""
    forms = system_uuid_forms(vm.bios_uuid)
    hits = sorted(name for name, uuid in machines.items() if forms & system_uuid_forms(uuid))
    return hits[0] if len(hits) == 1 else None
