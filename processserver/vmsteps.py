"""The vSphere steps of protect, commit and reprotect, for a master target that is a vCenter VM.

- protect: the prechecks, then replica VMDKs created on a datastore of the master target's host and
  attached to its VM; the master target finds each one in its guest (find_device) and writes it as a
  `device` replica. A failure after the create removes what was created.
- commit: the master target closes the replicas (release, files kept), they are detached from its VM and
  either given to a new VM like the original on the master target's host (alternate location), or put in
  place of the original VM's disks (original location), or, after a failback, given back to the original
  VM in the slots they came from.
- reprotect to the original location: the original VM (powered off) lends its own disks to the master
  target at the original site, which seeds them by a checksum comparison.

Every vSphere call blocks: they run in a worker thread. What vSphere did is in processserver.vmdisks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import LinkClosed
from standby.proto.enums import ErrorCode
from standby.vsphere.connect import VCenter, connect

from .hub import Hub
from .registry import DiskRow
from .vcenters import VCenterStore
from .vmdisks import VmDisk, VmSource
from .vmlocate import VmPlace, locate_vms

log = logging.getLogger("standby.ps.vsphere")
RELEASE_TIMEOUT = 120.0
RECOVERED_SUFFIX = "-recovered"


def _store(ps: Hub) -> VCenterStore:
    return VCenterStore(ps.cfg.state_dir)


async def where_are(ps: Hub, machines: list[str]) -> dict[str, VmPlace]:
    """The VMs of those `machines` that are VMs (by their system UUIDs), found in one pass; none when no
    vCenter is added."""
    store = _store(ps)
    if not store.names():
        return {}
    return await asyncio.to_thread(locate_vms, store, ps.registry, machines)


async def where_is(ps: Hub, machine: str) -> VmPlace | None:
    """The VM `machine` is, or None: no vCenter added, or it is not a VM of one."""
    return (await where_are(ps, [machine])).get(machine)


async def check_master_target(ps: Hub, mt: str) -> None:
    """RequestFailed(REFUSED) naming each failed precheck when `mt` is a vCenter VM that fails one (the
    checks `standby mt check` shows); nothing when it passes or is not a VM."""
    where = await where_is(ps, mt)
    if where is not None:
        await asyncio.to_thread(_precheck, _store(ps).get(where.vcenter), where)


def _precheck(vc: VCenter, where: VmPlace) -> None:
    with connect(vc) as s:
        _refuse_unready(s, vc.name, where, [], 0)


def _refuse_unready(s: Any, vcenter: str, where: VmPlace, protected: list[str], new_disks: int) -> None:
    """RequestFailed(REFUSED) listing every precheck the master target VM fails, each with its fix."""
    from standby.vsphere import prechecks

    why = prechecks.refusal(prechecks.check_master_target(s, where.vm, protected, new_disks=new_disks))
    if why:
        raise RequestFailed(ErrorCode.REFUSED, f"master target VM {where.name} (vCenter {vcenter}) fails the vSphere "
                                               f"prechecks (see standby mt check):\n{why}")


# ---- protect -----------------------------------------------------------------------------------------
async def place_replicas(ps: Hub, machine: str, mt: str, disks: list[DiskRow],
                         datastore: str | None) -> dict[str, str] | None:
    """{disk name: the replica's device path inside the master target} for replicas made in vSphere, or
    None when the master target is not a vCenter VM (protect then needs --replica or --replica-dir)."""
    found = await where_are(ps, [mt, machine])
    where = found.get(mt)
    if where is None:
        return None
    session = ps.mt_sessions.get(mt)
    if session is None:
        raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {mt!r} is not connected: start it and retry")
    odd = [f"{d.name} ({d.size} bytes)" for d in disks if d.size % 1024]
    if odd:
        raise RequestFailed(ErrorCode.REFUSED, f"a VMDK's size is a whole number of KiB; disk {', '.join(odd)} is "
                                               "not: protect it into a replica file (--replica-dir) instead")
    store = _store(ps)
    src = found.get(machine)
    sources: list[VmSource] = []
    shape = None
    if src is not None:
        sources, shape = await asyncio.to_thread(_sources, store.get(src.vcenter), src, machine, disks)
    vc = store.get(where.vcenter)
    protected = [src.vm] if src is not None and src.vcenter == where.vcenter else []
    made = await asyncio.to_thread(_create, vc, where, protected, machine, disks, datastore)
    for r in made:
        ps.vmdisks.put(VmDisk(machine, r.name, where.vcenter, r.file, r.uuid, where.vm, True, True, None))
    ps.vmdisks.put_sources(sources)
    if src is not None and shape is not None:
        ps.vmdisks.put_shape(machine, src.vcenter, shape)
    try:
        return await _find(ps, mt, {r.name: (r.uuid, r.capacity_bytes) for r in made})
    except RequestFailed as exc:
        raise await unplace(ps, machine, exc) from None


async def _find(ps: Hub, mt: str, disks: dict[str, tuple[str, int]]) -> dict[str, str]:
    from standby.vsphere.disks import guest_device_name

    session = ps.mt_sessions.get(mt)
    paths = {}
    for name, (uuid, size) in disks.items():
        if session is None:
            raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {mt} disconnected")
        try:
            paths[name] = await session.find_device(guest_device_name(uuid), size, ps.cfg.vsphere_device_wait)
        except (TimeoutError, LinkClosed) as exc:
            raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {mt} did not answer: {exc}") from None
        except RequestFailed as exc:
            raise RequestFailed(exc.code, f"disk {name}: {exc}") from None
    return paths


async def unplace(ps: Hub, machine: str, cause: RequestFailed) -> RequestFailed:
    """Undo place_replicas after a later step of protect failed: detach and delete the VMDKs it made.
    Returns `cause` to raise, saying what was undone, or what is left if the undo failed too."""
    made = [d for d in ps.vmdisks.disks(machine) if d.created and d.at_mt]
    note = "nothing was created in vSphere"
    if made:
        vc = _store(ps).get(made[0].vcenter)
        note = await asyncio.to_thread(_remove_created, vc, made[0].holder, [d.file for d in made])
        ps.vmdisks.drop(machine, [d.disk for d in made])
    return RequestFailed(cause.code, f"{cause}; {note}")


def _create(vc: VCenter, where: VmPlace, protected: list[str], machine: str, disks: list[DiskRow],
            datastore: str | None) -> list[Any]:
    from standby.vsphere.disks import create_and_attach

    with connect(vc) as s:
        _refuse_unready(s, vc.name, where, protected, len(disks))
        ds = datastore or _roomiest(s, where.vm)
        # A folder of standby's own: the machine's VM may have its folder (its name) on this datastore too.
        return create_and_attach(s, where.vm, ds, f"standby-{machine}", [(d.name, d.size) for d in disks])


def _roomiest(s: Any, vm_key: str) -> str:
    """The writable VMFS datastore of the VM's host with the most free space."""
    from standby.vsphere.inventory import vm_host
    from standby.vsphere.objects import find_vm

    host = vm_host(s, find_vm(s, vm_key))
    fit = sorted((m for m in host.datastores if m.writable and m.type.upper() == "VMFS"),
                 key=lambda m: -m.free_bytes)
    if not fit:
        raise RequestFailed(ErrorCode.REFUSED, f"host {host.name} has no writable VMFS datastore for the replicas")
    return fit[0].name


def _remove_created(vc: VCenter, vm: str, files: list[str]) -> str:
    from standby.vsphere.disks import delete_files, detach

    try:
        with connect(vc) as s:
            detach(s, vm, files)
            delete_files(s, files)
        return f"the replica disks created in vSphere were removed again ({', '.join(files)})"
    except RequestFailed as exc:
        return (f"removing the replica disks created in vSphere failed ({exc}): detach them from the master target "
                f"VM and delete them in vSphere: {', '.join(files)}")


def _sources(vc: VCenter, src: VmPlace, machine: str,
             disks: list[DiskRow]) -> tuple[list[VmSource], dict[str, Any]]:
    """The protected VM's disks paired with the agent's (by name and by controller/unit, sizes checked),
    and its shape. No disks (with a warning) when they cannot be paired: failover to the original VM and
    the lending of its disks are then refused."""
    from standby.vsphere.inventory import vm_info
    from standby.vsphere.objects import find_vm
    from standby.vsphere.shape import shape_of

    with connect(vc) as s:
        vm = vm_info(s, find_vm(s, src.vm))
        shape = shape_of(s, src.vm).to_json()
    vdisks = sorted(vm.disks, key=lambda d: (d.controller_key, d.unit))
    agent = sorted(disks, key=lambda d: d.name)
    sized = all(v.capacity_bytes in (0, a.size) for v, a in zip(vdisks, agent, strict=False))
    if len(vdisks) != len(agent) or not sized:
        log.warning("%s is VM %s, but its %d disks cannot be paired with the %d VM disks by order and size: "
                    "failover to the original VM will be refused", machine, vm.name, len(agent), len(vdisks))
        return [], shape
    return [VmSource(machine, a.name, vc.name, src.vm, vm.name, v.file, v.uuid, v.controller_key, v.unit)
            for a, v in zip(agent, vdisks, strict=True)], shape


# ---- commit ------------------------------------------------------------------------------------------
async def hand_over(ps: Hub, identity: str, rows: list[DiskRow], location: str | None, vm_name: str | None,
                    power_on: bool) -> dict[str, Any] | None:
    """After a commit: the replicas leave the master-target VM for the machine's VM (see the module
    docstring). None when this identity's replicas are not VMDKs on a master-target VM."""
    placed = [d for d in ps.vmdisks.disks(identity) if d.at_mt]
    if not placed:
        return None
    by_name = {r.name: r for r in rows}
    mts = {by_name[d.disk].mt for d in placed if d.disk in by_name}
    session = ps.mt_sessions.get(next(iter(mts))) if len(mts) == 1 else None
    if session is None:
        raise RequestFailed(ErrorCode.UNREACHABLE, f"the master target of {identity} ({', '.join(map(str, mts))}) is "
                                                   "not connected: start it and run standby commit again")
    try:  # the master target closes the devices before vSphere takes them from its guest
        await session.link.request("release", RELEASE_TIMEOUT, disks=[by_name[d.disk].id for d in placed],
                                   delete=False)
    except (TimeoutError, LinkClosed) as exc:
        raise RequestFailed(ErrorCode.UNREACHABLE, f"master target did not release {identity}'s replicas: {exc}; "
                                                   "run standby commit again") from None
    sources = ps.vmdisks.sources(identity)
    vc = _store(ps).get(placed[0].vcenter)
    name = vm_name or identity + RECOVERED_SUFFIX
    done = await asyncio.to_thread(_hand_over, vc, placed, sources, ps.vmdisks.shape(identity), location, name,
                                   power_on)
    for d in placed:
        ps.vmdisks.move(identity, d.disk, done["vm_uuid"], False)
    log.warning("%s: replicas handed over in vSphere: %s", identity, done["what"])
    return done


def _hand_over(vc: VCenter, placed: list[VmDisk], sources: list[VmSource], shape: dict[str, Any] | None,
               location: str | None, name: str, power_on: bool) -> dict[str, Any]:
    from standby.vsphere.disks import attach_existing, detach

    mt_vm = placed[0].holder
    order = {s.disk: i for i, s in enumerate(sources)}
    placed = sorted(placed, key=lambda d: (order.get(d.disk, len(order)), d.disk))
    files = [d.file for d in placed]
    with connect(vc) as s:
        detach(s, mt_vm, files)
        try:
            return _give(s, placed, sources, shape, location, name, power_on)
        except RequestFailed as exc:
            try:
                attach_existing(s, mt_vm, files, lsi_only=True)
                note = "the replica disks are attached to the master target VM again; fix the cause and run standby " \
                       "commit again"
            except RequestFailed as again:
                note = (f"attaching them to the master target VM again failed too ({again}): they are attached to no "
                        f"VM: {', '.join(files)}")
            raise RequestFailed(exc.code, f"{exc}; {note}") from None


def _give(s: Any, placed: list[VmDisk], sources: list[VmSource], shape: dict[str, Any] | None,
          location: str | None, name: str, power_on: bool) -> dict[str, Any]:
    from standby.vsphere.inventory import vm_host, vm_info
    from standby.vsphere.objects import find_vm
    from standby.vsphere.shape import VmShape
    from standby.vsphere.vms import attach_at, create_vm_from_disks, reattach_to_original
    from standby.vsphere.vms import power_on as power_vm_on

    files = [d.file for d in placed]
    homes = {d.home["vm"] for d in placed if d.home}
    if homes:  # a failback: each disk goes back where it came from
        (vm,) = homes
        attach_at(s, vm, [(d.file, int(d.home["controller_key"]), int(d.home["unit"])) for d in placed if d.home])
        what = f"given back to the original VM {placed[0].home['vm_name']}"
    elif location == "none":
        return {"vm_uuid": "", "what": "detached from the master target VM and attached to no VM (attach them to a "
                                       "VM of your choice in vSphere)", "files": files}
    elif location == "original":
        if not sources or {x.disk for x in sources} != {d.disk for d in placed}:
            raise RequestFailed(ErrorCode.REFUSED, "the original VM's disks are not known (its disks could not be "
                                                   "paired with the machine's at protect): use --vm alternate")
        vm = sources[0].vm
        reattach_to_original(s, vm, files, [x.file for x in sources])
        what = f"in place of the disks of the original VM {sources[0].vm_name}"
    else:
        if shape is None:
            raise RequestFailed(ErrorCode.REFUSED, "the machine was not a VM of an added vCenter when it was "
                                                   "protected: there is no VM to take the shape of; commit with "
                                                   "--vm none and attach the disks to a VM yourself")
        host = vm_host(s, find_vm(s, placed[0].holder)).name
        ds = files[0].partition("]")[0].lstrip("[")
        moid = create_vm_from_disks(s, name, VmShape.from_json(shape), host, ds, files, power_on=False)
        vm = vm_info(s, find_vm(s, name)).instance_uuid
        what = f"new VM {name} on host {host}, shaped like {sources[0].vm_name if sources else 'the original'}"
        log.info("created VM %s (%s)", name, moid)
    if power_on:
        what += "; " + power_vm_on(s, vm)
    return {"vm_uuid": vm, "what": what, "files": files}


# ---- unprotect ---------------------------------------------------------------------------------------
async def let_go(ps: Hub, identity: str, delete: bool) -> dict[str, str]:
    """After unprotect's release: the replica VMDKs still on the master-target VM leave it. Lent disks go
    back to the VM that lent them; standby's own are detached and kept, or deleted with --delete-replicas.
    {disk name: what became of its VMDK}; nothing when no replica of `identity` is a VMDK on a master
    target VM (after a commit they are the recovered VM's: left alone)."""
    held = [d for d in ps.vmdisks.disks(identity) if d.at_mt]
    if not held:
        return {}
    vc = _store(ps).get(held[0].vcenter)
    done = await asyncio.to_thread(_let_go, vc, held, delete)
    ps.vmdisks.drop(identity, [d.disk for d in held])
    return done


def _let_go(vc: VCenter, held: list[VmDisk], delete: bool) -> dict[str, str]:
    from standby.vsphere.disks import delete_files, detach
    from standby.vsphere.vms import attach_at

    lent = [d for d in held if d.home and not d.created]
    own = [d for d in held if d not in lent]
    done: dict[str, str] = {}
    with connect(vc) as s:
        detach(s, held[0].holder, [d.file for d in held])
        if lent:
            home = lent[0].home or {}
            attach_at(s, home["vm"], [(d.file, d.home["controller_key"], d.home["unit"])  # type: ignore[index]
                                      for d in lent])
            done.update({d.disk: f"{d.file} given back to VM {home['vm_name']}" for d in lent})
        if delete and own:
            delete_files(s, [d.file for d in own])
        done.update({d.disk: f"{d.file} {'deleted' if delete else 'detached from the master target VM, kept'}"
                     for d in own})
    return done


# ---- reprotect to the original location ---------------------------------------------------------------
async def lend_originals(ps: Hub, machine: str, agent: str, mt: str, sizes: dict[str, int]) -> dict[str, str] | None:
    """Reprotect into the original VM's own disks: detach them from it (powered off) and attach them to the
    master-target VM at the original site; {disk name: device path} as the master target finds them. None
    when `machine` was not a VM whose disks are known, or `mt` is not a vCenter VM."""
    sources = ps.vmdisks.sources(machine)
    where = await where_is(ps, mt) if sources else None
    if where is None:
        return None
    if {s.vcenter for s in sources} != {where.vcenter} or set(sizes) != {s.disk for s in sources}:
        raise RequestFailed(ErrorCode.REFUSED, f"{machine}'s original VM {sources[0].vm_name} (vCenter "
                                               f"{sources[0].vcenter}) and the master target VM {where.name} (vCenter "
                                               f"{where.vcenter}) must be in one vCenter, with the same disks")
    return await _lend_to(ps, agent, mt, where, sources, sizes, created=False)


async def lend_recovered(ps: Hub, machine: str, mt: str, sizes: dict[str, int]) -> dict[str, str] | None:
    """Reverse replication into the replica VMDKs that the recovered VM has had since the commit: detach them
    from it (powered off) and attach them to the master-target VM at the recovery site; {disk name: device
    path}. None when `machine`'s replicas are not VMDKs that standby gave to a VM."""
    rows = [d for d in ps.vmdisks.disks(machine) if d.created and not d.at_mt and d.holder]
    if not rows:
        return None
    where = await where_is(ps, mt)
    if where is None or where.vcenter != rows[0].vcenter or {d.disk for d in rows} != set(sizes):
        raise RequestFailed(ErrorCode.REFUSED, f"{machine}'s replicas are VMDKs of vCenter {rows[0].vcenter}, given to "
                                               f"a VM at commit: reverse replication needs master target {mt} to be a "
                                               "VM of that vCenter, with those disks")
    loans = await asyncio.to_thread(_loans, _store(ps).get(rows[0].vcenter), machine, rows)
    return await _lend_to(ps, machine, mt, where, loans, sizes, created=True)


def _loans(vc: VCenter, machine: str, rows: list[VmDisk]) -> list[VmSource]:
    """The VM that holds these VMDKs now, and the slot of each (where it goes back to)."""
    from standby.vsphere.inventory import vm_info
    from standby.vsphere.objects import find_vm

    with connect(vc) as s:
        vm = vm_info(s, find_vm(s, rows[0].holder))
    slots = {d.file: d for d in vm.disks}
    missing = [d.file for d in rows if d.file not in slots]
    if missing:
        raise RequestFailed(ErrorCode.MISSING, f"VM {vm.name} no longer has the replica disks {', '.join(missing)}: "
                                               "attach them to it again in vSphere")
    return [VmSource(machine, d.disk, vc.name, vm.instance_uuid, vm.name, d.file, d.uuid,
                     slots[d.file].controller_key, slots[d.file].unit) for d in rows]


async def _lend_to(ps: Hub, identity: str, mt: str, where: VmPlace, loans: list[VmSource], sizes: dict[str, int],
                   created: bool) -> dict[str, str]:
    vc = _store(ps).get(where.vcenter)
    lent = await asyncio.to_thread(_lend, vc, where, loans)
    for src in loans:
        home = {"vm": src.vm, "vm_name": src.vm_name, "controller_key": src.controller_key, "unit": src.unit}
        ps.vmdisks.put(VmDisk(identity, src.disk, vc.name, src.file, lent[src.disk], where.vm, True, created, home))
    try:
        return await _find(ps, mt, {d: (lent[d], sizes[d]) for d in sorted(lent)})
    except RequestFailed as exc:
        raise await give_back(ps, identity, exc) from None


def _lend(vc: VCenter, where: VmPlace, sources: list[VmSource]) -> dict[str, str]:
    """{disk name: its disk UUID} once the original VM's disks are attached to the master-target VM."""
    from standby.vsphere.disks import attach_existing, detach
    from standby.vsphere.vms import attach_at, powered_off

    files = [s.file for s in sources]
    with connect(vc) as s:
        _refuse_unready(s, vc.name, where, [sources[0].vm], len(files))
        powered_off(s, sources[0].vm, "its disks are replicated into", ErrorCode.IN_USE)
        detach(s, sources[0].vm, files)
        try:
            got = attach_existing(s, where.vm, files, lsi_only=True)
        except RequestFailed:
            attach_at(s, sources[0].vm, [(x.file, x.controller_key, x.unit) for x in sources])
            raise
    # A VMDK keeps its UUID in its descriptor; where vSphere does not report it, the one read at protect holds.
    return {src.disk: (g.uuid or src.uuid) for src, g in zip(sources, got, strict=True)}


async def give_back(ps: Hub, identity: str, cause: RequestFailed) -> RequestFailed:
    """Undo a lending after a later step of reprotect or reverse failed; returns `cause` to raise, saying
    what was done: the disks go back to the VM they were lent by (and standby's own replicas stay on record as that
    VM's)."""
    lent = [d for d in ps.vmdisks.disks(identity) if d.home and d.at_mt]
    note = "nothing was changed in vSphere"
    if lent:
        vc = _store(ps).get(lent[0].vcenter)
        note = await asyncio.to_thread(_give_back, vc, lent)
        for d in lent:
            if d.created and d.home:
                ps.vmdisks.move(identity, d.disk, str(d.home["vm"]), False)
            else:
                ps.vmdisks.drop(identity, [d.disk])
    return RequestFailed(cause.code, f"{cause}; {note}")


def _give_back(vc: VCenter, lent: list[VmDisk]) -> str:
    from standby.vsphere.disks import detach
    from standby.vsphere.vms import attach_at

    vm_name = lent[0].home["vm_name"] if lent[0].home else "?"
    try:
        with connect(vc) as s:
            detach(s, lent[0].holder, [d.file for d in lent])
            attach_at(s, lent[0].home["vm"], [(d.file, d.home["controller_key"], d.home["unit"])  # type: ignore[index]
                                              for d in lent])
        return f"VM {vm_name} has its disks back"
    except RequestFailed as exc:
        return (f"giving VM {vm_name} its disks back failed ({exc}): in vSphere, detach "
                f"{', '.join(d.file for d in lent)} from the master target VM and attach them to {vm_name}")
