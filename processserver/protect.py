"""Protect a machine's disks into replicas on a master target: the admin's `protect`, and the first half
of reprotect and of reverse replication (processserver.roundtrip), which protect with chosen replicas.

Every check comes before any change: the machine and master target enrolled, each disk's replica usable
(the master target checks it: new, or — `existing` — a copy to seed from by a checksum comparison); then
the disks move to Initial together and the agent is woken."""

from __future__ import annotations

import time
from pathlib import PurePosixPath
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import LinkClosed
from standby.proto.enums import ErrorCode, ReplicaFormat
from standby.proto.states import Replication

from . import vmsteps
from .hub import Hub
from .registry import DiskRow

SUFFIX = {ReplicaFormat.RAW: ".img"}


def replica_name(replica_dir: str, machine: str, disk: str, fmt: str) -> str:
    """A replica's path in a replica directory: MACHINE-DISK.vmdk (.img for raw)."""
    return str(PurePosixPath(replica_dir) / f"{machine}-{disk}{SUFFIX.get(fmt, '.vmdk')}")


async def protect(
    ps: Hub,
    machine: str,
    mt: str,
    format: str = ReplicaFormat.VMDK,
    replica_dir: str | None = None,
    replicas: dict[str, str] | None = None,
    existing: bool = False,
    datastore: str | None = None,
) -> dict[str, Any]:
    reg = ps.registry
    replicas = dict(replicas or {})
    m = reg.machine(machine)
    if m is None or m["role"] != "agent":
        known = ", ".join(x["name"] for x in reg.machines() if x["role"] == "agent") or "none"
        raise RequestFailed(ErrorCode.UNKNOWN_MACHINE, f"unknown machine {machine!r} (enrolled machines: {known})")
    t = reg.machine(mt)
    if t is None or t["role"] != "mt":
        known = ", ".join(x["name"] for x in reg.machines() if x["role"] == "mt") or "none"
        raise RequestFailed(ErrorCode.UNKNOWN_MACHINE,
                            f"unknown master target {mt!r} (enrolled master targets: {known})")
    if format not in set(ReplicaFormat):
        raise RequestFailed(ErrorCode.BAD_INPUT,
                            f"unknown replica format {format!r} (one of: {', '.join(ReplicaFormat)})")
    disks = reg.disks(machine=machine)
    if not disks:
        raise RequestFailed(ErrorCode.BAD_INPUT,
                            f"machine {machine!r} has not reported any disks yet: is its agent running?")
    unknown = set(replicas) - {d.name for d in disks}
    if unknown:
        raise RequestFailed(ErrorCode.UNKNOWN_DISK, f"machine {machine!r} has no disk {', '.join(sorted(unknown))}")
    for d in disks:
        if d.mt is not None:
            raise RequestFailed(ErrorCode.BAD_INPUT, f"disk {machine}/{d.name} is already protected (to {d.mt})")
    in_vsphere = False
    if not replicas and replica_dir is None and not existing:
        placed = await vmsteps.place_replicas(ps, machine, mt, disks, datastore)
        if placed is not None:
            replicas, format, in_vsphere = placed, ReplicaFormat.DEVICE, True
    try:
        res = await _protect(ps, machine, mt, disks, format, replica_dir, replicas, existing)
    except RequestFailed as exc:
        if in_vsphere:
            raise await vmsteps.unplace(ps, machine, exc) from None
        raise
    files = {d.disk: d.file for d in ps.vmdisks.disks(machine) if d.at_mt}  # VMDKs on the master target VM
    return {"disks": [{**d, **({"vmdk": files[d["disk"]]} if d["disk"] in files else {})} for d in res["disks"]]}


async def _protect(ps: Hub, machine: str, mt: str, disks: list[DiskRow], format: str, replica_dir: str | None,
                   replicas: dict[str, str], existing: bool) -> dict[str, Any]:
    reg = ps.registry
    plan: list[tuple[DiskRow, str]] = []
    for d in disks:
        path = replicas.get(d.name)
        if path is None:
            if replica_dir is None or format == ReplicaFormat.DEVICE:
                raise RequestFailed(
                    ErrorCode.BAD_INPUT,
                    f"no replica given for disk {d.name} (use --replica {d.name}=PATH"
                    + ("" if format == ReplicaFormat.DEVICE else " or --replica-dir")
                    + "; or add the vCenter of a master target that is a VM: standby vcenter add)",
                )
            path = replica_name(replica_dir, machine, d.name, format)
        plan.append((d, path))
    if len({p for _, p in plan}) != len(plan):
        raise RequestFailed(ErrorCode.BAD_INPUT, "two disks would share one replica path")
    session = ps.mt_sessions.get(mt)
    if session is None:
        raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {mt!r} is not connected: start it and retry")
    for d, path in plan:
        try:
            await session.check_replica(path, format, d.size, existing)
        except RequestFailed as exc:
            raise RequestFailed(exc.code, f"disk {d.name}: {exc}") from None
        except (TimeoutError, LinkClosed) as exc:
            raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {mt!r} did not answer: {exc}") from None
    for d, path in plan:
        reg.move(
            d,
            Replication.INITIAL,
            f"protected to {mt}:{path} ({format}{', compared with the existing replica' if existing else ''})",
            mt=mt,
            replica_path=path,
            replica_format=format,
            protected_at=time.time(),
            error=None,
            seed=int(existing),
        )
    agent = ps.agent_sessions.get(machine)
    await ps.wake(agent.link if agent else None)
    return {"disks": [{"disk": d.name, "replica": p} for d, p in plan]}
