"""The vCenter commands of the admin CLI: `standby vcenter add|list|remove|vms` and `standby mt check`
(processserver.vcenteradmin does the work, inside the process server, which keeps the credentials)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from standby.plumbing.errors import BadInput

from .client import AdminClient
from .display import human_bytes, when

VSPHERE_TIMEOUT = 300.0  # a vCenter's answer can take long; the process server bounds each task itself


def add_parsers(sub: Any) -> None:
    vc = sub.add_parser("vcenter", help="vCenter servers (or ESXi hosts) the process server talks to: add, list, "
                        "remove, and list their VMs")
    vsub = vc.add_subparsers(dest="vcenter_cmd", required=True)
    add = vsub.add_parser(
        "add", help="add a vCenter: pin its certificate, prove the login, store the credentials",
        description="Add a vCenter (or a standalone ESXi host). The process server connects, pins the "
        "certificate's SHA-256 fingerprint (the one given with --fingerprint, or on this first use the one it "
        "presents, shown so that you can compare it with the vCenter's own), logs in to prove the credentials, "
        "and stores them in its state directory (mode 0600; never logged, never shown again).",
    )
    add.add_argument("name", help="a name for this vCenter (letters, digits, '.', '_', '-')")
    add.add_argument("--host", required=True, help="HOST[:PORT] of the vCenter (port 443 if not given)")
    add.add_argument("--user", required=True, help="the vCenter user (e.g. administrator@vsphere.local)")
    add.add_argument("--password-file", required=True, type=Path,
                     help="a file holding the password (its first line); keep it readable by you only")
    add.add_argument("--fingerprint", help="the certificate's SHA-256 fingerprint as the vCenter shows it "
                     "('sha256:' + 64 hex digits, or OpenSSL's AB:CD:... form); without it the certificate seen "
                     "now is pinned")
    add.add_argument("--replace", action="store_true", help="replace a vCenter of that name (new address, "
                     "credentials or certificate)")
    vsub.add_parser("list", help="the vCenters added (no passwords)")
    rm = vsub.add_parser("remove", help="forget a vCenter and its stored credentials (refused while standby "
                         "tracks replica disks or protected VMs there)")
    rm.add_argument("name")
    vms = vsub.add_parser("vms", help="a vCenter's VMs: power state, BIOS/instance UUID, guest OS, disks, "
                          "datastores, and the standby machine each one is (matched by system UUID)")
    vms.add_argument("name", help="the vCenter, as added")
    vms.add_argument("--json", action="store_true", help="machine-readable output")
    mt = sub.add_parser("mt", help="master target commands")
    msub = mt.add_subparsers(dest="mt_cmd", required=True)
    ck = msub.add_parser(
        "check", help="check a master target VM against the vSphere rules (EnableUUID, snapshots, controller, "
        "disk count, VMware Tools, datastores)",
        description="Check a master target that is a vCenter VM (found by its system UUID) against every rule; "
        "each failed rule says how to fix it. Exit 0 when every rule passes, 1 otherwise. protect (when it creates "
        "replicas in vSphere), reprotect and reverse (when they lend a VM's disks) and failback run the same checks.",
    )
    ck.add_argument("mt", help="the master target, by its enrolled name")
    ck.add_argument("--machine", action="append", default=[], metavar="MACHINE",
                    help="also check that this protected machine's datastores are mounted read/write on the "
                    "master target's host (repeatable)")
    ck.add_argument("--fix", action="store_true", help="fix what is safe to fix (set disk.EnableUUID=TRUE) and "
                    "nothing else, then check again")
    ck.add_argument("--json", action="store_true", help="machine-readable output")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:
        return text.strip("[]"), 443
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"--host {text!r}: the port must be a number 1..65535")
    return host.strip("[]"), int(port)


def _password(path: Path) -> str:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BadInput(f"cannot read the password file: {exc}") from None
    if not lines or not lines[0]:
        raise BadInput(f"the password file {path} is empty")
    return lines[0]


def dispatch(client: AdminClient, args: argparse.Namespace) -> int | None:
    """Run a vCenter command; None if `args.cmd` is not one."""
    if args.cmd == "mt":
        return _mt_check(client, args)
    if args.cmd != "vcenter":
        return None
    cmd = args.vcenter_cmd
    if cmd == "add":
        host, port = _host_port(args.host)
        res = client.call("vcenter_add", VSPHERE_TIMEOUT, name=args.name, host=host, port=port, user=args.user,
                          password=_password(args.password_file), fingerprint=args.fingerprint,
                          replace=args.replace)
        print(f"vCenter {res['name']} added: {res['about']}")
        how = "pinned on this first use: compare it with the vCenter's own" if res["pinned_now"] else "as given"
        print(f"certificate {res['fingerprint']} ({how})")
        return 0
    if cmd == "list":
        for v in client.call("vcenter_list")["vcenters"]:
            print(f"{v['name']:<16} {v['host']}:{v['port']:<6} user {v['user']}  {v['fingerprint']}  added "
                  f"{when(v['added_at'])}")
        return 0
    if cmd == "remove":
        client.call("vcenter_remove", name=args.name)
        print(f"vCenter {args.name} removed (its stored credentials deleted)")
        return 0
    res = client.call("vcenter_vms", VSPHERE_TIMEOUT, name=args.name)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    for vm in res["vms"]:
        print(_vm_line(vm))
        for d in vm.get("disks", []):
            print(f"    {d['label']:<14} {d['file']}  {human_bytes(d['capacity_bytes'])}  {d['controller']} "
                  f"{d['bus']}:{d['unit']}")
    return 0


def _vm_line(vm: dict[str, Any]) -> str:
    who = f"= standby machine {vm['machine']}" if vm.get("machine") else ""
    return (f"{vm['name']:<24} {vm['power_state']:<11} bios {vm['bios_uuid']} instance {vm['instance_uuid']} "
            f"{vm['guest_os']}  datastores {', '.join(vm['datastores']) or '-'} {who}").rstrip()


def _mt_check(client: AdminClient, args: argparse.Namespace) -> int:
    res = client.call("mt_check", VSPHERE_TIMEOUT, mt=args.mt, machines=args.machine, fix=args.fix)
    failed = [f for f in res["findings"] if not f["ok"]]
    if args.json:
        print(json.dumps(res, indent=2))
        return 1 if failed else 0
    for text in res["fixed"]:
        print(f"fixed: {text}")
    print(f"master target {res['mt']} is VM {res['vm']} in vCenter {res['vcenter']}")
    for f in res["findings"]:
        print(f"  {'ok  ' if f['ok'] else 'FAIL'} {f['rule']:<18} {f['detail']}")
        if not f["ok"] and f.get("fix"):
            print(f"       fix: {f['fix']}")
    print("every rule passes" if not failed else f"{len(failed)} rule(s) fail")
    return 1 if failed else 0
