"""Requests and replies of the vCenter part (admin -> process server; processserver.vcenteradmin): add,
list and remove a vCenter, list its VMs, and check (and fix) a master target VM. Who may send which is in
proto.requests' table of ops.

The password travels only in `vcenter_add`, inside the admin's mutual-TLS connection; no reply carries it."""

from __future__ import annotations

from typing import Any

from .fields import (
    boolean,
    json_value,
    list_of,
    name,
    optional,
    port,
    record,
    secret,
    short_text,
    text,
    time_,
)
from .wire import Wire, checked, message

MAX_VMS = 10_000


@message("vcenter_add")
class VCenterAdd(Wire):
    name: str = checked(name)
    host: str = checked(short_text)
    user: str = checked(short_text)
    password: str = checked(secret)
    port: int = checked(port, 443)
    fingerprint: str | None = checked(optional(short_text), None)  # as the operator gave it: parsed here
    replace: bool = checked(boolean, False)

    def __repr__(self) -> str:  # never the password, in a log or a traceback
        return f"VCenterAdd(name={self.name!r}, host={self.host!r}, port={self.port}, user={self.user!r})"


@message("vcenter_add reply")
class VCenterAdded(Wire):
    name: str = checked(name)
    fingerprint: str = checked(short_text)
    pinned_now: bool = checked(boolean)  # taken on this first use (no --fingerprint given)
    about: str = checked(short_text)  # "VMware vCenter Server 8.0.2 build-..."


_VCENTER = record({"name": name, "host": short_text, "port": port, "user": short_text,
                   "fingerprint": short_text, "added_at": time_})


@message("vcenter_list")
class VCenterListAsk(Wire):
    pass


@message("vcenter_list reply")
class VCenterList(Wire):
    vcenters: tuple[dict[str, Any], ...] = checked(list_of(_VCENTER))


@message("vcenter_remove")
class VCenterRemove(Wire):
    name: str = checked(name)


@message("vcenter_vms")
class VCenterVms(Wire):
    name: str = checked(name)


@message("vcenter_vms reply")
class VCenterVmList(Wire):
    """Each VM as vsphere.inventory describes it, with `machine`: the standby machine it is, or null."""

    vcenter: str = checked(name)
    vms: tuple[Any, ...] = checked(list_of(json_value, MAX_VMS))


@message("mt_check")
class MtCheck(Wire):
    mt: str = checked(name)
    machines: tuple[str, ...] = checked(list_of(name, 1000), ())  # protected machines whose datastores to check
    fix: bool = checked(boolean, False)


@message("mt_check reply")
class MtChecked(Wire):
    mt: str = checked(name)
    vcenter: str = checked(name)
    vm: str = checked(short_text)
    findings: tuple[Any, ...] = checked(list_of(json_value, 100))  # {rule, title, ok, detail, fix}
    fixed: tuple[str, ...] = checked(list_of(text, 100), ())
