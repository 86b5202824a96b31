"""Replica disks on datastores: created as VMDKs and attached to the master-target VM, detached again at
failover, attached to another VM, deleted.

Every refusal happens before anything is created: the 60-disk limit, a free unit on an LSI Logic
controller for each disk, a datastore mounted on the VM's host, no file of that name yet. A disk is
created by one reconfigure of the VM per disk (`fileOperation=create`), so a failure names the disk it
happened to; the disks created before it are removed again, or the error says exactly which files are
left and how to remove them (issue 13: nothing is left half done).

A disk's UUID is what ties the VMDK to the block device the master target's guest sees: with
`disk.EnableUUID=TRUE` the guest's SCSI VPD page 0x83 carries it as an NAA identifier, and udev names the
device after it (guest_device_name)."""

from __future__ import annotations

import posixpath
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode

from . import tasks
from .connect import Session
from .objects import container, find_by_name, find_vm, properties

MAX_MT_DISKS = 60  # the documents' master-target limit: 4 SCSI controllers x 15 units
SCSI_UNITS = 16  # units 0-15 on one SCSI bus; the controller itself sits on one of them (7)
MAX_VMDK_BYTES = 62 * 2**40  # VMFS 5/6: the largest VMDK is 62 TB
LSI_NAMES = ("VirtualLsiLogicController", "VirtualLsiLogicSASController")
_PATH = re.compile(r"^\[([^\]]+)\]\s*(.+)$")


@dataclass
class ReplicaDisk:
    """One VMDK attached to a VM: `name` is the standby disk it is the replica of (for a disk attached by
    attach_existing, the file's name without .vmdk)."""

    name: str
    file: str  # "[datastore] folder/name.vmdk"
    uuid: str  # the backing's UUID, "6000C29x-..." ("" when vSphere reports none)
    capacity_bytes: int
    controller_key: int
    unit: int


@dataclass
class AttachedDisk:
    """A VirtualDisk device as the VM reports it (the `device` is the pyVmomi object, for a remove spec)."""

    file: str
    key: int
    controller_key: int
    unit: int
    uuid: str
    capacity_bytes: int
    device: Any


def new_disk_uuid() -> str:
    """A disk UUID in VMware's form: 6000C29 is NAA type 6 (IEEE registered extended) followed by VMware's
    OUI 00:0C:29, then 25 random hex digits; grouped 8-4-4-4-12 as vSphere shows backing.uuid."""
    h = "6000C29" + secrets.token_hex(13)[:25]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def guest_device_name(uuid: str) -> str:
    """The /dev/disk/by-id name a Linux guest gives the disk with `disk.EnableUUID=TRUE`.

    The VM presents the UUID as the NAA identifier of SCSI VPD page 0x83; systemd's scsi_id exports it
    as ID_WWN (first 16 hex digits) + ID_WWN_VENDOR_EXTENSION (the other 16), lowercase, and
    60-persistent-storage.rules links `disk/by-id/wwn-$env{ID_WWN_WITH_EXTENSION}`, i.e. "wwn-0x" and
    the 32 hex digits (src/udev/scsi_id/scsi_id.c and rules.d/60-persistent-storage.rules in systemd)."""
    digits = uuid.replace("-", "").replace(" ", "").lower()
    if not re.fullmatch(r"[0-9a-f]{32}", digits):
        raise RequestFailed(ErrorCode.BAD_INPUT, f"{uuid!r} is not a disk UUID (32 hex digits)")
    return "wwn-0x" + digits


def split_path(path: str) -> tuple[str, str]:
    """("datastore", "folder/file.vmdk") of "[datastore] folder/file.vmdk"; BAD_INPUT otherwise."""
    m = _PATH.match(path.strip())
    if not m:
        raise RequestFailed(ErrorCode.BAD_INPUT, f"{path!r} is not a datastore path ('[datastore] folder/disk.vmdk')")
    return m.group(1), m.group(2).strip()


def vm_name(session: Session, vm: Any) -> str:
    from .api import vim

    return str(properties(session, [vm], vim.VirtualMachine, ["name"])[vm].get("name", vm._moId))


def devices_of(session: Session, vm: Any) -> list[Any]:
    from .api import vim

    return list(properties(session, [vm], vim.VirtualMachine, ["config.hardware.device"])[vm].get(
        "config.hardware.device") or [])


def disks_of(devices: Iterable[Any]) -> list[AttachedDisk]:
    """The VM's file-backed disks, in controller-key then unit order."""
    from .api import vim

    out = []
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualDisk) and hasattr(d.backing, "fileName"):
            out.append(AttachedDisk(d.backing.fileName, d.key, d.controllerKey, d.unitNumber or 0,
                                    getattr(d.backing, "uuid", None) or "", d.capacityInBytes or 0, d))
    return sorted(out, key=lambda a: (a.controller_key, a.unit))


def free_slots(devices: list[Any], lsi_only: bool) -> list[tuple[int, int]]:
    """Free (controller key, unit) pairs on the VM's SCSI controllers (LSI Logic parallel or SAS only when
    `lsi_only`), by bus number then unit. Units 0-15 except the controller's own (7). Taken units are read
    from the devices' controllerKey/unitNumber: govmomi's simulator does not keep a controller's
    `device` list current."""
    from .api import vim

    ctrls = [d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)
             and (not lsi_only or type(d).__name__.rpartition(".")[2] in LSI_NAMES)]
    used = {(d.controllerKey, d.unitNumber) for d in devices if d.unitNumber is not None}
    slots = []
    for c in sorted(ctrls, key=lambda c: c.busNumber):
        own = c.scsiCtlrUnitNumber if c.scsiCtlrUnitNumber is not None else 7
        slots += [(c.key, u) for u in range(SCSI_UNITS) if u != own and (c.key, u) not in used]
    return slots


def host_datastore(session: Session, vm: Any, datastore: str) -> Any:
    """The datastore `datastore`, which must be mounted on the VM's host (MISSING otherwise)."""
    from .api import vim

    ds = find_by_name(session, vim.Datastore, datastore, "datastore")
    host = properties(session, [vm], vim.VirtualMachine, ["runtime.host"])[vm].get("runtime.host")
    hp = properties(session, [host], vim.HostSystem, ["name", "datastore"])[host] if host else {}
    if ds not in (hp.get("datastore") or []):
        raise RequestFailed(ErrorCode.MISSING, f"datastore {datastore} is not mounted on host {hp.get('name', '?')} "
                                               f"of VM {vm_name(session, vm)}: mount it there or choose another")
    return ds


def datacenter_of(session: Session, ds: Any) -> Any:
    from .api import vim

    dcs = properties(session, container(session, vim.Datacenter), vim.Datacenter, ["datastore"])
    return next(dc for dc, p in dcs.items() if ds in (p.get("datastore") or []))


def files_in(session: Session, ds: Any, folder: str) -> set[str]:
    """Names of the files in "[datastore] folder" (empty when the folder does not exist)."""
    from .api import vim

    p = properties(session, [ds], vim.Datastore, ["name", "browser"])[ds]
    name, browser = p.get("name"), p.get("browser")
    spec = vim.host.DatastoreBrowser.SearchSpec(matchPattern=["*"])
    where = f"[{name}] {folder}".rstrip()
    task = tasks.call(f"list {where}", browser.SearchDatastore_Task, where, spec)
    try:
        result = tasks.wait(task, f"list {where}")
    except tasks.TaskFailed as e:
        if e.fault == "FileNotFound":
            return set()
        raise
    return {f.path for f in (result.file or [])}


def all_attached(session: Session) -> dict[str, str]:
    """{datastore path: VM name} of every disk attached to any VM of the vCenter."""
    from .api import vim

    props = properties(session, container(session, vim.VirtualMachine), vim.VirtualMachine,
                       ["name", "config.hardware.device"])
    return {d.file: str(p.get("name")) for p in props.values() for d in disks_of(p.get("config.hardware.device") or [])}


def check_attachable(session: Session, files: list[str], for_vm: str) -> None:
    """Refuse files that do not exist or are attached to a VM already (a VMDK is written by one VM at a
    time: attaching it twice corrupts it)."""
    from .api import vim

    if len(set(files)) != len(files):
        raise RequestFailed(ErrorCode.BAD_INPUT, f"a file is named twice in {files}")
    attached = all_attached(session)
    busy = [f"{f} (attached to VM {attached[f]})" for f in files if f in attached]
    if busy:
        raise RequestFailed(ErrorCode.IN_USE, f"cannot attach to VM {for_vm}: {', '.join(busy)}; detach it from "
                                              "that VM first")
    listed: dict[tuple[str, str], set[str]] = {}  # one listing per folder
    missing = []
    for f in files:
        dsname, rel = split_path(f)
        folder = (dsname, posixpath.dirname(rel))
        if folder not in listed:
            listed[folder] = files_in(session, find_by_name(session, vim.Datastore, dsname, "datastore"), folder[1])
        if posixpath.basename(rel) not in listed[folder]:
            missing.append(f)
    if missing:
        raise RequestFailed(ErrorCode.MISSING, f"cannot attach to VM {for_vm}: no such file {', '.join(missing)}")


def disk_spec(file: str, controller_key: int, unit: int, key: int, *, create: int | None = None,
              uuid: str = "", thin: bool = True, ds: Any = None) -> Any:
    """An "add" device spec for the VMDK `file` at (controller, unit): a new one of `create` bytes, or an
    existing one (create None: no fileOperation, vSphere opens the file)."""
    from .api import vim

    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=file, diskMode="persistent", datastore=ds)
    disk = vim.vm.device.VirtualDisk(key=key, controllerKey=controller_key, unitNumber=unit, backing=backing)
    spec = vim.vm.device.VirtualDeviceSpec(operation="add", device=disk)
    if create is not None:
        backing.thinProvisioned, backing.eagerlyScrub, backing.uuid = thin, False, uuid
        disk.capacityInKB, disk.capacityInBytes = create // 1024, create
        spec.fileOperation = "create"
    return spec


def remove_spec(disk: AttachedDisk, destroy: bool = False) -> Any:
    """A "remove" spec: the file stays unless `destroy`."""
    from .api import vim

    spec = vim.vm.device.VirtualDeviceSpec(operation="remove", device=disk.device)
    if destroy:
        spec.fileOperation = "destroy"
    return spec


def reconfigure(vm: Any, changes: list[Any], what: str) -> None:
    from .api import vim

    tasks.wait(tasks.call(what, vm.ReconfigVM_Task, vim.vm.ConfigSpec(deviceChange=changes)), what)


def _sizes(disks: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Disk names and sizes checked, sizes rounded up to whole KiB: vSphere sizes a VMDK in KiB
    (capacityInKB; capacityInBytes must agree with it), and a replica a little larger than its disk is
    fine, where a smaller one is not. A size that is not whole 512-byte sectors is no disk's: refused."""
    names = [n for n, _ in disks]
    if len(set(names)) != len(names):
        raise RequestFailed(ErrorCode.BAD_INPUT, f"a disk is named twice in {names}")
    out = []
    for name, size in disks:
        if not name or any(c in name for c in "/[]\\"):
            raise RequestFailed(ErrorCode.BAD_INPUT, f"disk name {name!r} cannot name a VMDK file (no '/', '[', ']')")
        if size <= 0 or size % 512 or size > MAX_VMDK_BYTES:
            raise RequestFailed(ErrorCode.BAD_INPUT, f"disk {name}: size {size} bytes is not a whole number of "
                                                     "512-byte sectors up to 62 TiB (the largest VMDK on VMFS)")
        out.append((name, -(-size // 1024) * 1024))
    return out


def create_and_attach(session: Session, vm_key: str, datastore: str, folder: str, disks: list[tuple[str, int]],
                      thin: bool = True) -> list[ReplicaDisk]:
    """Create "[datastore] folder/<name>.vmdk" for each (standby disk name, size in bytes) and attach it to
    the master-target VM `vm_key` at the next free unit of its LSI Logic controllers.

    Refused before anything is created: more than MAX_MT_DISKS disks in all, too few free LSI units,
    an unknown VM or datastore, a datastore not on the VM's host, a file already there. The disk UUID is
    set to new_disk_uuid(); a vCenter may keep or replace it, so the UUID returned is the one the VM
    reports after the reconfigure (ours only when it reports none, as govmomi's simulator may)."""
    sized = _sizes(disks)
    vm = find_vm(session, vm_key)
    name = vm_name(session, vm)
    devices = devices_of(session, vm)
    have = len(disks_of(devices))
    if have + len(sized) > MAX_MT_DISKS:
        raise RequestFailed(ErrorCode.REFUSED, f"VM {name} has {have} disks; {len(sized)} more would exceed the master "
                                               f"target's limit of {MAX_MT_DISKS}: use another master target for some "
                                               "machines")
    slots = free_slots(devices, lsi_only=True)
    if len(slots) < len(sized):
        raise RequestFailed(ErrorCode.REFUSED, f"VM {name} has {len(slots)} free units on LSI Logic controllers and "
                                               f"needs {len(sized)}: add an LSI Logic (parallel or SAS) SCSI "
                                               "controller to it in vSphere (at most 4)")
    ds = host_datastore(session, vm, datastore)
    folder = folder.strip("/")
    paths = [f"[{datastore}] " + posixpath.join(folder, f"{n}.vmdk") for n, _ in sized]
    there = files_in(session, ds, folder)
    clash = [p for (n, _), p in zip(sized, paths, strict=True) if {f"{n}.vmdk", f"{n}-flat.vmdk"} & there]
    if clash:
        raise RequestFailed(ErrorCode.REPLICA_EXISTS, f"{', '.join(clash)} already exist: delete them (standby's "
                                                      "cleanup, or the datastore browser) or choose another folder")
    if folder:
        _make_folder(session, ds, f"[{datastore}] {folder}")
    made: list[str] = []
    uuids = [new_disk_uuid() for _ in sized]
    for (_, size), path, (ckey, unit), uuid in zip(sized, paths, slots[:len(sized)], uuids, strict=True):
        try:
            reconfigure(vm, [disk_spec(path, ckey, unit, -1, create=size, uuid=uuid, thin=thin, ds=ds)],
                        f"create disk {path} on VM {name}")
        except RequestFailed as e:
            raise _undo(session, vm, name, made, e) from None
        made.append(path)
    return _read_back(session, vm, sized, paths, uuids)


def _make_folder(session: Session, ds: Any, where: str) -> None:
    """A reconfigure creates a VMDK in an existing folder only; an existing folder is fine."""
    try:
        tasks.call(f"make folder {where}", session.content.fileManager.MakeDirectory, where,
                   datacenter_of(session, ds), True)
    except tasks.TaskFailed as e:
        if e.fault != "FileAlreadyExists":
            raise


def _read_back(session: Session, vm: Any, sized: list[tuple[str, int]], paths: list[str],
               uuids: list[str]) -> list[ReplicaDisk]:
    """The disks as the VM reports them: the UUID vSphere kept or gave (ours when it reports none)."""
    by_file = {d.file: d for d in disks_of(devices_of(session, vm))}
    out = []
    for (name, size), path, uuid in zip(sized, paths, uuids, strict=True):
        d = by_file[path]
        out.append(ReplicaDisk(name, path, d.uuid or uuid, d.capacity_bytes or size, d.controller_key, d.unit))
    return out


def amended(cause: RequestFailed, note: str) -> RequestFailed:
    """`cause` with `note` added to its message, of the same type (a TaskFailed keeps its fault name)."""
    cause.args = (f"{cause}; {note}",)
    return cause


def _undo(session: Session, vm: Any, name: str, made: list[str], cause: RequestFailed) -> RequestFailed:
    """Remove the disks created before `cause` (detach and delete their files in one reconfigure); the
    error to raise says what failed and what is left."""
    if not made:
        return amended(cause, "nothing was created")
    try:
        attached = [d for d in disks_of(devices_of(session, vm)) if d.file in made]
        reconfigure(vm, [remove_spec(d, destroy=True) for d in attached], f"remove the disks just created on VM {name}")
    except RequestFailed as again:
        return amended(cause, f"removing the {len(made)} disks created before it failed too ({again}); left attached "
                              f"to VM {name}: {', '.join(made)}: remove them in vSphere (Edit Settings of the VM, "
                              "remove each disk with 'Delete files from datastore')")
    return amended(cause, f"the {len(made)} disks created before it were removed again, nothing is left")


def detach(session: Session, vm_key: str, files: list[str]) -> list[str]:
    """Remove the disks `files` from VM `vm_key`, keeping the files (failover: the replica becomes the
    recovered machine's disk). Refuses files not attached to it, naming those that are."""
    vm = find_vm(session, vm_key)
    name = vm_name(session, vm)
    disks = disks_of(devices_of(session, vm))
    have = {d.file for d in disks}
    absent = [f for f in files if f not in have]
    if absent:
        raise RequestFailed(ErrorCode.BAD_INPUT, f"VM {name} has no disk {', '.join(absent)} (its disks: "
                                                 f"{', '.join(sorted(have)) or 'none'})")
    if files:
        reconfigure(vm, [remove_spec(d) for d in disks if d.file in files], f"detach {len(files)} disks from VM {name}")
    return list(files)


def attach_existing(session: Session, vm_key: str, files: list[str], lsi_only: bool = False) -> list[ReplicaDisk]:
    """Attach the existing VMDKs `files` to VM `vm_key` at the next free units of its SCSI controllers
    (LSI Logic only when `lsi_only`: the master target). Refuses files that are missing or attached to a
    VM already, and too few free units, before changing anything. Attached in one reconfigure: all or
    none. `name` of each result is the file's name without .vmdk."""
    vm = find_vm(session, vm_key)
    name = vm_name(session, vm)
    devices = devices_of(session, vm)
    have = len(disks_of(devices))
    if lsi_only and have + len(files) > MAX_MT_DISKS:
        raise RequestFailed(ErrorCode.REFUSED, f"VM {name} has {have} disks; {len(files)} more would exceed the master "
                                               f"target's limit of {MAX_MT_DISKS}")
    slots = free_slots(devices, lsi_only)
    kind = "LSI Logic" if lsi_only else "SCSI"
    if len(slots) < len(files):
        raise RequestFailed(ErrorCode.REFUSED, f"VM {name} has {len(slots)} free units on {kind} controllers and needs "
                                               f"{len(files)}: add a {kind} controller to it in vSphere")
    for dsname in {split_path(f)[0] for f in files}:
        host_datastore(session, vm, dsname)
    check_attachable(session, files, name)
    specs = [disk_spec(f, ck, u, -1 - i) for i, (f, (ck, u)) in enumerate(zip(files, slots[:len(files)], strict=True))]
    if specs:
        reconfigure(vm, specs, f"attach {len(files)} disks to VM {name}")
    return replicas_of(session, vm, files)


def replicas_of(session: Session, vm: Any, files: list[str]) -> list[ReplicaDisk]:
    """The disks `files` as the VM reports them now, each named after its file (without .vmdk)."""
    by_file = {d.file: d for d in disks_of(devices_of(session, vm))}
    return [ReplicaDisk(posixpath.basename(f).removesuffix(".vmdk"), f, by_file[f].uuid, by_file[f].capacity_bytes,
                        by_file[f].controller_key, by_file[f].unit) for f in files]


def delete_files(session: Session, datastore_paths: list[str]) -> list[str]:
    """Delete the VMDKs (descriptor and extent) at `datastore_paths`: cleanup of replicas no longer
    wanted. Refuses any attached to a VM. Tries every file; the error lists those not deleted."""
    from .api import vim

    attached = all_attached(session)
    busy = [f"{f} (attached to VM {attached[f]})" for f in datastore_paths if f in attached]
    if busy:
        raise RequestFailed(ErrorCode.IN_USE, f"not deleting {', '.join(busy)}: detach it first")
    vdm = session.content.virtualDiskManager
    done, failed = [], []
    for path in datastore_paths:
        try:
            ds = find_by_name(session, vim.Datastore, split_path(path)[0], "datastore")
            what = f"delete {path}"
            tasks.wait(tasks.call(what, vdm.DeleteVirtualDisk_Task, path, datacenter_of(session, ds)), what)
            done.append(path)
        except RequestFailed as e:
            failed.append(str(e))
    if failed:
        raise RequestFailed(ErrorCode.FAILED, f"deleted {len(done)} of {len(datastore_paths)} files; "
                                              + "; ".join(failed))
    return done
