"""The VM steps of failover and failback on vSphere: power a VM off and on, put replica disks back into
the original VM (original location), or create a VM from them on the master target's host (alternate
location).

Each step checks what it can before changing anything (the VM powered off, its disks the expected ones,
the files there and attached to no VM, no VM of the new name), and a failure after a change puts back
what was there or says exactly what is left: a half-made recovered VM is never left behind silently, and
the replica disk files are never deleted by a cleanup (they are the machine's data)."""

from __future__ import annotations

from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode

from . import tasks
from .connect import Session
from .disks import (
    MAX_MT_DISKS,
    SCSI_UNITS,
    AttachedDisk,
    ReplicaDisk,
    amended,
    check_attachable,
    datacenter_of,
    devices_of,
    disk_spec,
    disks_of,
    free_slots,
    host_datastore,
    reconfigure,
    remove_spec,
    replicas_of,
    split_path,
)
from .objects import container, find_by_name, find_vm, properties
from .shape import VmShape, scsi_class


def _power(session: Session, vm: Any, want: str) -> str:
    from .api import vim

    p = properties(session, [vm], vim.VirtualMachine, ["name", "runtime.powerState"])[vm]
    if str(p.get("runtime.powerState")) == want:
        return f"VM {p['name']} was already {want}"
    method = vm.PowerOnVM_Task if want == "poweredOn" else vm.PowerOffVM_Task
    what = f"power {'on' if want == 'poweredOn' else 'off'} VM {p['name']}"
    tasks.wait(tasks.call(what, method), what)
    return f"VM {p['name']} {want}"


def power_off(session: Session, vm_key: str) -> str:
    """Power the VM off (a hard power-off: the recovered machine's shutdown step has already flushed and
    frozen what matters); a no-op when it is off. Returns what it did, in words."""
    return _power(session, find_vm(session, vm_key), "poweredOff")


def power_on(session: Session, vm_key: str) -> str:
    """Power the VM on; a no-op when it is on. Returns what it did, in words."""
    return _power(session, find_vm(session, vm_key), "poweredOn")


def powered_off(session: Session, vm_key: str, before: str,
                code: ErrorCode = ErrorCode.REFUSED) -> tuple[Any, dict[str, Any]]:
    """(the VM, its name, power state and devices) when it is powered off; RequestFailed(`code`) saying to
    power it off `before` what is about to happen otherwise."""
    from .api import vim

    vm = find_vm(session, vm_key)
    p = properties(session, [vm], vim.VirtualMachine, ["name", "runtime.powerState", "config.hardware.device"])[vm]
    state = str(p.get("runtime.powerState"))
    if state != "poweredOff":
        raise RequestFailed(code, f"VM {p['name']} is {state}: power it off before {before}")
    return vm, p


def reattach_to_original(session: Session, vm_key: str, files: list[str],
                         expected: list[str] | None) -> list[ReplicaDisk]:
    """Replace the disks of the powered-off VM `vm_key` by `files`, each in the controller/unit slot of
    the disk it replaces: files[i] takes the slot of expected[i] (or, when `expected` is None, of the
    VM's i-th disk by controller and unit). The files it had stay on the datastore.

    Refused, naming what differs: the VM powered on; its disks not exactly `expected`; a different
    number of files; a file missing or attached to another VM. The swap is one reconfigure (vCenter
    applies all of it or none); if it fails, what the VM has then is compared with what it had, and
    put back when it differs."""
    vm, p = powered_off(session, vm_key, "its disks are replaced")
    name = p["name"]
    current = disks_of(p.get("config.hardware.device") or [])
    have = [d.file for d in current]
    if expected is not None and sorted(expected) != sorted(have):
        extra, absent = sorted(set(have) - set(expected)), sorted(set(expected) - set(have))
        raise RequestFailed(ErrorCode.REFUSED, f"VM {name} does not have the disks expected: it has "
                                               f"{', '.join(extra) or 'no others'} not expected, and lacks "
                                               f"{', '.join(absent) or 'none'}; check it is the right VM")
    order = [next(d for d in current if d.file == f) for f in expected] if expected is not None else current
    if len(files) != len(order):
        raise RequestFailed(ErrorCode.BAD_INPUT, f"VM {name} has {len(order)} disks and {len(files)} files were given "
                                                 "to take their places")
    for dsname in {split_path(f)[0] for f in files}:
        host_datastore(session, vm, dsname)
    check_attachable(session, [f for f in files if f not in have], name)
    changes = [remove_spec(d) for d in order]
    changes += [disk_spec(f, d.controller_key, d.unit, -1 - i)
                for i, (f, d) in enumerate(zip(files, order, strict=True))]
    try:
        reconfigure(vm, changes, f"replace the disks of VM {name}")
    except RequestFailed as e:
        raise _put_back(session, vm, name, current, e) from None
    return replicas_of(session, vm, files)


def attach_at(session: Session, vm_key: str, placed: list[tuple[str, int, int]]) -> list[ReplicaDisk]:
    """Give the powered-off VM `vm_key` the disks `placed` ((file, controller key, unit) each) in those
    slots: the failback step that returns an original VM's own disks after they were lent to the master
    target. Refused, before any change, when the VM runs, a slot is taken, or a file is missing or
    attached to another VM. One reconfigure: all or none."""
    vm, p = powered_off(session, vm_key, "its disks are given back")
    name = p["name"]
    taken = {(d.controller_key, d.unit): d.file for d in disks_of(p.get("config.hardware.device") or [])}
    busy = [f"SCSI({ck}:{u}) has {taken[(ck, u)]}" for _, ck, u in placed if (ck, u) in taken]
    if busy:
        raise RequestFailed(ErrorCode.REFUSED, f"VM {name}: the slots of its disks are taken ({'; '.join(busy)}): "
                                               "remove those disks in vSphere, or check it is the right VM")
    files = [f for f, _, _ in placed]
    check_attachable(session, files, name)
    reconfigure(vm, [disk_spec(f, ck, u, -1 - i) for i, (f, ck, u) in enumerate(placed)],
                f"give VM {name} back its disks")
    return replicas_of(session, vm, files)


def _put_back(session: Session, vm: Any, name: str, before: list[AttachedDisk], cause: RequestFailed) -> RequestFailed:
    """After a failed swap: the VM's disks as before (as vCenter leaves them), or put back."""
    slots = {(d.controller_key, d.unit): d.file for d in before}
    try:
        now = disks_of(devices_of(session, vm))
        now_slots = {(d.controller_key, d.unit): d.file for d in now}
        if now_slots == slots:
            return amended(cause, f"VM {name} still has its disks as before ({', '.join(slots.values()) or 'none'})")
        stray = [remove_spec(d) for d in now if slots.get((d.controller_key, d.unit)) != d.file]
        back = [disk_spec(d.file, d.controller_key, d.unit, -1 - i) for i, d in enumerate(before)
                if now_slots.get((d.controller_key, d.unit)) != d.file]
        reconfigure(vm, stray + back, f"put back the disks of VM {name}")
    except RequestFailed as again:
        listed = ", ".join(f"{f} at SCSI({c}:{u})" for (c, u), f in slots.items())
        return amended(cause, f"putting back its disks failed too ({again}): in vSphere, give VM {name} these disks "
                              f"again (existing hard disks, no file deleted): {listed}")
    return amended(cause, f"VM {name} has its disks back as before ({', '.join(slots.values())})")


def _host_parts(session: Session, host: str, datastore: str, files: list[str]) -> tuple[Any, Any, Any, list[Any]]:
    """(host, its resource pool, the datacenter's VM folder, the host's networks); `datastore` and those of
    `files` must be mounted on the host."""
    from .api import vim

    h = find_by_name(session, vim.HostSystem, host, "host")
    hp = properties(session, [h], vim.HostSystem, ["parent", "datastore", "network"])[h]
    for name in sorted({datastore} | {split_path(f)[0] for f in files}):
        ds = find_by_name(session, vim.Datastore, name, "datastore")
        if ds not in (hp.get("datastore") or []):
            raise RequestFailed(ErrorCode.MISSING, f"datastore {name} is not mounted on host {host}: choose a host "
                                                   "that has it, or one of the host's datastores")
    ds = find_by_name(session, vim.Datastore, datastore, "datastore")
    pool = properties(session, [hp["parent"]], vim.ComputeResource, ["resourcePool"])[hp["parent"]]["resourcePool"]
    dc = datacenter_of(session, ds)
    folder = properties(session, [dc], vim.Datacenter, ["vmFolder"])[dc]["vmFolder"]
    return h, pool, folder, list(hp.get("network") or [])


def _nic_backing(session: Session, net: Any) -> Any:
    """A NIC backing on network `net`: a distributed port group's port, or a standard network by name."""
    from .api import vim

    if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
        p = properties(session, [net], vim.dvs.DistributedVirtualPortgroup,
                       ["key", "config.distributedVirtualSwitch"])[net]
        dvs = p["config.distributedVirtualSwitch"]
        uuid = properties(session, [dvs], vim.DistributedVirtualSwitch, ["uuid"])[dvs]["uuid"]
        port = vim.dvs.PortConnection(switchUuid=uuid, portgroupKey=p["key"])
        return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
    name = properties(session, [net], vim.Network, ["name"])[net]["name"]
    return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=name, network=net)


def _nic_networks(session: Session, shape: VmShape, host_nets: list[Any], host: str) -> list[Any]:
    """One network per NIC of the original: the one of the same name when the host has it, else the
    host's first."""
    from .api import vim

    if shape.networks and not host_nets:
        raise RequestFailed(ErrorCode.REFUSED, f"host {host} has no network for the VM's network adapters")
    kinds = {type(n) for n in host_nets} or {vim.Network}
    names: dict[str, Any] = {}
    for kind in kinds:
        objs = [n for n in host_nets if type(n) is kind]
        names.update({p.get("name"): n for n, p in properties(session, objs, kind, ["name"]).items()})
    return [names.get(n, host_nets[0]) for n in shape.networks]


def _new_vm_spec(session: Session, name: str, shape: VmShape, datastore: str, nets: list[Any],
                 n_disks: int) -> Any:
    """The new VM: the original's CPUs, memory, firmware and guest id, its SCSI controller type, enough
    controllers for the disks, and one VMXNET3 adapter per network."""
    from .api import vim

    kind = scsi_class(shape)
    changes = []
    for bus in range(max(1, -(-n_disks // (SCSI_UNITS - 1)))):
        ctrl = kind(key=-100 - bus, busNumber=bus, sharedBus="noSharing")
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=ctrl))
    for i, net in enumerate(nets):
        nic = vim.vm.device.VirtualVmxnet3(key=-200 - i, backing=_nic_backing(session, net),
                                           connectable=vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True))
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=nic))
    return vim.vm.ConfigSpec(
        name=name, numCPUs=shape.cpus, memoryMB=shape.memory_mb, numCoresPerSocket=shape.cores_per_socket,
        firmware=shape.firmware, guestId=shape.guest_id, files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"),
        deviceChange=changes)


def create_vm_from_disks(session: Session, name: str, like: VmShape, host: str, datastore: str, files: list[str],
                         power_on: bool = False) -> str:
    """Create VM `name` on `host` (its resource pool, the datacenter's VM folder, its files on
    `datastore`) of the shape `like` (vsphere.shape: read from the original at protect), attach `files` in
    order at units 0-6, 8-15 of its controllers, power it on if asked; returns its managed object id.

    Refused before creating anything: a VM of that name exists, more than MAX_MT_DISKS files, a file
    missing or attached to a VM, the datastore not on the host. If a step after CreateVM fails, the VM's
    disks are detached (their files kept) and the VM is destroyed, and the error says so."""
    from .api import vim

    names = properties(session, container(session, vim.VirtualMachine), vim.VirtualMachine, ["name"])
    if any(p.get("name") == name for p in names.values()):
        raise RequestFailed(ErrorCode.REFUSED, f"a VM named {name} exists already: choose another name or remove it")
    if not files or len(files) > MAX_MT_DISKS:
        raise RequestFailed(ErrorCode.BAD_INPUT, f"a VM is made of 1 to {MAX_MT_DISKS} disks, not {len(files)}")
    h, pool, folder, host_nets = _host_parts(session, host, datastore, files)
    check_attachable(session, files, name)
    nets = _nic_networks(session, like, host_nets, host)
    spec = _new_vm_spec(session, name, like, datastore, nets, len(files))
    what = f"create VM {name} on host {host}"
    vm = tasks.wait(tasks.call(what, folder.CreateVM_Task, config=spec, pool=pool, host=h), what)
    try:
        slots = free_slots(devices_of(session, vm), lsi_only=False)[:len(files)]
        specs = [disk_spec(f, ck, u, -1 - i) for i, (f, (ck, u)) in enumerate(zip(files, slots, strict=True))]
        reconfigure(vm, specs, f"attach {len(files)} disks to VM {name}")
        if power_on:
            _power(session, vm, "poweredOn")
    except RequestFailed as e:
        raise _discard(session, vm, name, e) from None
    return str(vm._moId)


def _discard(session: Session, vm: Any, name: str, cause: RequestFailed) -> RequestFailed:
    """Destroy the VM just created, its disks detached first: Destroy deletes the files of the disks a VM
    has, and these are the replica's."""
    try:
        _power(session, vm, "poweredOff")
        attached = disks_of(devices_of(session, vm))
        if attached:
            reconfigure(vm, [remove_spec(d) for d in attached], f"detach the disks of the new VM {name}")
        tasks.wait(tasks.call(f"destroy VM {name}", vm.Destroy_Task), f"destroy VM {name}")
    except RequestFailed as again:
        return amended(cause, f"removing the new VM {name} failed too ({again}): in vSphere, remove its hard disks "
                              "WITHOUT deleting their files (they are the replica), then delete the VM")
    return amended(cause, f"the new VM {name} was destroyed again; the replica disk files are kept")
