"""Finding vSphere objects and reading their properties in one round trip.

Properties are read through the PropertyCollector, never by attribute access on a managed object: one
round trip for many objects instead of one per property (a vCenter with hundreds of VMs), and an unset
property (a VM without snapshots) is simply absent, where govmomi's simulator fails attribute access
with a dropped connection."""

from __future__ import annotations

from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode

from .connect import Session


def container(session: Session, kind: Any) -> list[Any]:
    """Every managed object of `kind` (vim.VirtualMachine, vim.HostSystem, ...) in the inventory."""
    view = session.content.viewManager.CreateContainerView(session.content.rootFolder, [kind], True)
    try:
        return list(view.view)
    finally:
        view.DestroyView()


def properties(session: Session, objects: list[Any], kind: Any, paths: list[str]) -> dict[Any, dict[str, Any]]:
    """{object: {path: value}} for `paths` of each object (all of one `kind`); an unset path is absent."""
    from .api import vmodl

    if not objects:
        return {}
    pc = vmodl.query.PropertyCollector
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=o, skip=False) for o in objects],
        propSet=[pc.PropertySpec(type=kind, pathSet=paths, all=False)],
    )
    out: dict[Any, dict[str, Any]] = {}
    collector = session.content.propertyCollector
    result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
    while result is not None:
        for o in result.objects:
            out[o.obj] = {p.name: p.val for p in o.propSet or []}
        if not result.token:
            break
        result = collector.ContinueRetrievePropertiesEx(result.token)
    for o in objects:
        out.setdefault(o, {})
    return out


def find_vm(session: Session, key: str) -> Any:
    """The VM named `key`, or whose BIOS or instance UUID is `key`. BAD_INPUT (unknown) names the VMs
    there are, MISSING when none matches, and BAD_INPUT when a name is ambiguous."""
    from .api import vim

    vms = container(session, vim.VirtualMachine)
    props = properties(session, vms, vim.VirtualMachine, ["name", "config.uuid", "config.instanceUuid"])
    wanted = key.strip().lower()
    hits = [
        vm for vm, p in props.items()
        if p.get("name") == key or wanted in ((p.get("config.uuid") or "").lower(),
                                              (p.get("config.instanceUuid") or "").lower())
    ]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise RequestFailed(ErrorCode.BAD_INPUT,
                            f"{len(hits)} VMs in vCenter {session.vc.name} match {key!r}: name one by its UUID")
    names = sorted(str(p.get("name")) for p in props.values())
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    raise RequestFailed(ErrorCode.MISSING, f"vCenter {session.vc.name} has no VM {key!r} (its VMs: {shown or 'none'})")


def find_by_name(session: Session, kind: Any, name: str, what: str) -> Any:
    """The one object of `kind` named `name` (a host, a datastore); MISSING otherwise, naming those there are."""
    objs = container(session, kind)
    names = properties(session, objs, kind, ["name"])
    hits = [o for o, p in names.items() if p.get("name") == name]
    if len(hits) == 1:
        return hits[0]
    there = ", ".join(sorted(str(p.get("name")) for p in names.values())) or "none"
    raise RequestFailed(ErrorCode.MISSING, f"vCenter {session.vc.name} has no {what} {name!r} (there are: {there})")
