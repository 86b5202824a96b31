"""The operator's vCenter requests: add (pin the certificate, prove the login, store), list, remove, the
VMs of a vCenter with the standby machine each one is, and the master-target prechecks (`standby mt
check`). pyvmomi blocks, so every vSphere call runs in a worker thread (asyncio.to_thread) and the
process server's loop keeps serving replication meanwhile."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from standby.plumbing.enrollment import parse_fingerprint
from standby.plumbing.errors import BadInput, RequestFailed
from standby.proto.enums import ErrorCode
from standby.vsphere.connect import VCenter, connect, fetch_certificate, fingerprint_of

from .hub import Hub
from .vcenters import VCenterStore
from .vmlocate import locate_vms, machine_uuids


class VCenterAdmin:
    def __init__(self, ps: Hub) -> None:
        self.ps = ps
        self.store = VCenterStore(ps.cfg.state_dir)

    async def add(self, name: str, host: str, user: str, password: str, port: int = 443,
                  fingerprint: str | None = None, replace: bool = False) -> dict[str, Any]:
        if self.store.has(name) and not replace:
            raise RequestFailed(ErrorCode.BAD_INPUT,
                                f"vCenter {name} is already added: use --replace to change it")
        try:
            wanted = parse_fingerprint(fingerprint) if fingerprint else None
        except BadInput as exc:
            raise RequestFailed(ErrorCode.BAD_INPUT, str(exc)) from None
        der = await asyncio.to_thread(fetch_certificate, host, port)
        seen = fingerprint_of(der)
        if wanted is not None and seen != wanted:
            # Like enrollment: the fingerprint presented is not shown, so that it cannot be pasted back.
            raise RequestFailed(
                ErrorCode.REFUSED,
                f"the server at {host}:{port} presented a certificate whose fingerprint is not {wanted}: "
                "check the address and the fingerprint shown by the vCenter itself. Nothing was stored.",
            )
        vc = VCenter(name, host, port, user, password, seen)
        about = await asyncio.to_thread(_about, vc)  # proves the login before anything is stored
        self.store.save(vc)
        return {"name": name, "fingerprint": seen, "pinned_now": wanted is None, "about": about[:255]}

    async def listing(self) -> dict[str, Any]:
        return {"vcenters": self.store.listing()}

    async def remove(self, name: str) -> dict[str, Any]:
        if name in self.ps.vmdisks.vcenters():
            raise RequestFailed(ErrorCode.IN_USE, f"vCenter {name} holds replica disks or protected VMs standby keeps "
                                                  "track of: unprotect those machines first")
        self.store.remove(name)
        return {}

    async def vms(self, name: str) -> dict[str, Any]:
        vc = self.store.get(name)
        uuids = machine_uuids(self.ps.registry)
        return {"vcenter": name, "vms": await asyncio.to_thread(_vms, vc, uuids)}

    async def mt_check(self, mt: str, machines: list[str] | None = None, fix: bool = False) -> dict[str, Any]:
        t = self.ps.registry.machine(mt)
        if t is None or t["role"] != "mt":
            raise RequestFailed(ErrorCode.UNKNOWN_MACHINE, f"unknown master target {mt!r}")
        machines = list(machines or [])
        found = await asyncio.to_thread(locate_vms, self.store, self.ps.registry, [mt, *machines])
        where = found.get(mt)
        if where is None:
            raise RequestFailed(
                ErrorCode.MISSING,
                f"master target {mt} is not a VM of any added vCenter (matched by its system UUID "
                f"{t.get('system_uuid') or 'not reported yet'}): add its vCenter with `standby vcenter add`, or "
                "it is a physical machine and needs no vSphere checks",
            )
        protected = []
        for m in machines:
            vm = found.get(m)
            if vm is None:
                raise RequestFailed(ErrorCode.MISSING, f"machine {m} is not a VM of vCenter {where.vcenter}")
            protected.append(vm.vm)
        vc = self.store.get(where.vcenter)
        findings, fixed = await asyncio.to_thread(_check, vc, where.vm, protected, fix)
        return {"mt": mt, "vcenter": where.vcenter, "vm": where.name, "findings": findings, "fixed": fixed}


def _about(vc: VCenter) -> str:
    with connect(vc) as s:
        return str(s.content.about.fullName)


def _vms(vc: VCenter, uuids: dict[str, str]) -> list[dict[str, Any]]:
    from standby.vsphere.inventory import list_vms, match_machine

    with connect(vc) as s:
        return [{**dataclasses.asdict(vm), "machine": match_machine(vm, uuids)} for vm in list_vms(s)]


def _check(vc: VCenter, vm: str, protected: list[str], fix: bool) -> tuple[list[dict[str, Any]], list[str]]:
    from standby.vsphere import prechecks

    with connect(vc) as s:
        fixed = prechecks.fix(s, vm) if fix else []
        findings = prechecks.check_master_target(s, vm, protected)
        return [dataclasses.asdict(f) for f in findings], fixed
