"""Master-target prechecks: what a master-target VM must be before replica disks are attached to it.

Each rule has a stable id (scripts and the README's prechecks table use it), a one-line title, and a
check over facts read once from vCenter (`Facts`): the checks themselves do no I/O, so every rule sees
the same snapshot of the inventory and can be tried on hand-made facts. `check_master_target` runs every
rule, in a fixed order, and returns passing and failing findings alike; `refusal` turns the failures into
one message naming each rule and its fix; `fix` repairs the one rule that is safe to repair unattended."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .connect import Session
from .inventory import HostInfo, VmInfo, extra_config, vm_host, vm_info, vm_infos
from .objects import find_vm, properties
from .tasks import call, wait

MAX_DISKS = 60  # 4 SCSI controllers x 15 units (unit 7 is the controller's own)
ENABLE_UUID = "disk.EnableUUID"


@dataclass(frozen=True)
class Facts:
    """What the rules look at: the master-target VM, its host, the protected VMs, the disks to attach."""

    mt: VmInfo
    host: HostInfo
    protected: tuple[VmInfo, ...] = ()
    new_disks: int = 0


@dataclass(frozen=True)
class Finding:
    rule: str
    ok: bool
    detail: str  # what was seen, in vSphere terms
    fix: str  # what the operator does about a failure ("" when ok)


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    test: Callable[[Facts], tuple[bool, str]]  # (ok, detail)
    fix: str

    def check(self, facts: Facts) -> Finding:
        ok, detail = self.test(facts)
        return Finding(self.id, ok, detail, "" if ok else self.fix.format(mt=facts.mt.name, host=facts.host.name))


def _enable_uuid(f: Facts) -> tuple[bool, str]:
    # Without it the guest sees no disk UUIDs, and an attached replica disk cannot be told from another.
    if f.mt.enable_uuid:
        return True, f"{ENABLE_UUID} is TRUE on VM {f.mt.name}"
    return False, f"{ENABLE_UUID} is not TRUE on VM {f.mt.name}: the guest cannot see which disk is which"


def _no_snapshots(f: Facts) -> tuple[bool, str]:
    if not f.mt.has_snapshots:
        return True, f"VM {f.mt.name} has no snapshots"
    return False, (f"VM {f.mt.name} has snapshots: writes to attached disks would go to delta files, not "
                   "into the replica disks")


def _lsi_logic(f: Facts) -> tuple[bool, str]:
    kinds = sorted({c.kind for c in f.mt.controllers})
    lsi = [c for c in f.mt.controllers if c.kind in ("lsilogic", "lsilogic-sas")]
    if lsi:
        return True, f"VM {f.mt.name} has an LSI Logic controller (SCSI bus {lsi[0].bus})"
    return False, (f"VM {f.mt.name} has no LSI Logic SCSI controller (its disk controllers: "
                   f"{', '.join(kinds) or 'none'}): the replica disks are attached to an LSI Logic controller, "
                   "as the master-target documents require (ParaVirtual is not supported for them)")


def _disk_limit(f: Facts) -> tuple[bool, str]:
    total = len(f.mt.disks) + f.new_disks
    seen = f"{len(f.mt.disks)} disks attached to VM {f.mt.name} + {f.new_disks} to attach = {total}"
    return total <= MAX_DISKS, f"{seen} ({'within' if total <= MAX_DISKS else 'over'} the limit of {MAX_DISKS})"


def _tools_running(f: Facts) -> tuple[bool, str]:
    if f.mt.tools_running:
        return True, f"VMware Tools running in VM {f.mt.name}"
    return False, f"VMware Tools not running in VM {f.mt.name} (power state {f.mt.power_state})"


def _vmfs_datastore(f: Facts) -> tuple[bool, str]:
    vmfs = [m.name for m in f.host.datastores if m.type == "VMFS" and m.writable]
    if vmfs:
        return True, f"host {f.host.name} mounts VMFS datastore(s) read/write: {', '.join(vmfs)}"
    seen = ", ".join(f"{m.name} ({m.type}, {m.access_mode}{'' if m.accessible else ', inaccessible'})"
                     for m in f.host.datastores)
    return False, f"host {f.host.name} has no VMFS datastore mounted read/write and accessible (has: {seen or 'none'})"


def _datastore_mounted(f: Facts) -> tuple[bool, str]:
    if not f.protected:
        return True, "no protected VMs given"
    writable = {m.name for m in f.host.datastores if m.writable}
    missing = sorted({f"{ds} (VM {vm.name})" for vm in f.protected for ds in vm.datastores if ds not in writable})
    if not missing:
        names = sorted({ds for vm in f.protected for ds in vm.datastores})
        return True, f"host {f.host.name} mounts read/write every datastore of the protected VMs: {', '.join(names)}"
    return False, f"host {f.host.name} does not mount read/write: {', '.join(missing)}"


RULES: tuple[Rule, ...] = (
    Rule("enable-uuid", "disk.EnableUUID = TRUE in the master-target VM's configuration", _enable_uuid,
         "set disk.EnableUUID=TRUE in the VM's advanced configuration, or run `standby mt check MT --fix`"),
    Rule("no-snapshots", "the master-target VM has no snapshots", _no_snapshots,
         "delete (consolidate) every snapshot of VM {mt} in vCenter"),
    Rule("lsi-logic", "the master-target VM has an LSI Logic SCSI controller (parallel or SAS)", _lsi_logic,
         "power off VM {mt} and add an LSI Logic Parallel or LSI Logic SAS SCSI controller to it"),
    Rule("disk-limit", f"at most {MAX_DISKS} disks attached to the master-target VM", _disk_limit,
         f"protect fewer disks with this master target (at most {MAX_DISKS} in all), or add another master target"),
    Rule("tools-running", "VMware Tools running in the master-target VM", _tools_running,
         "power on VM {mt} and install or start VMware Tools (open-vm-tools) in it"),
    Rule("vmfs-datastore", "a VMFS datastore mounted read/write on the master target's host", _vmfs_datastore,
         "mount a VMFS datastore read/write on host {host}, or move VM {mt} to a host that has one"),
    Rule("datastore-mounted", "each protected VM's datastore mounted read/write on the master target's host",
         _datastore_mounted,
         "mount those datastores read/write on host {host}, or use a master target on a host that has them"),
)


def evaluate(facts: Facts) -> list[Finding]:
    """Every rule's finding on `facts`, in RULES order."""
    return [rule.check(facts) for rule in RULES]


def check_master_target(session: Session, mt_vm_key: str, protected: Sequence[str] = (),
                        new_disks: int = 0) -> list[Finding]:
    """Every rule's finding for the master-target VM `mt_vm_key` (name or BIOS/instance UUID), the VMs
    `protected` (names or UUIDs) whose disks it will hold, and `new_disks` disks about to be attached."""
    mt = find_vm(session, mt_vm_key)
    others = vm_infos(session, list(dict.fromkeys(find_vm(session, key) for key in protected)))
    facts = Facts(vm_info(session, mt), vm_host(session, mt), tuple(others), new_disks)
    return evaluate(facts)


def refusal(findings: Sequence[Finding]) -> str | None:
    """One message naming every failed rule, what was seen and its fix; None when every rule passed."""
    failed = [f for f in findings if not f.ok]
    if not failed:
        return None
    lines = [f"the master target fails {len(failed)} precheck(s):"]
    lines += [f"- {f.rule}: {f.detail}; fix: {f.fix}" for f in failed]
    return "\n".join(lines)


def fix(session: Session, mt_vm_key: str) -> list[str]:
    """Repair what is safe to repair unattended, and say what was changed ([] when nothing needed it).

    Only `enable-uuid`: setting disk.EnableUUID=TRUE changes no data and no guest state until the next
    power-on. Everything else needs an operator's decision and is never touched here: deleting snapshots
    merges or discards data, a controller is added to a powered-off VM only, the disk count, VMware Tools,
    and the datastores mounted on a host are choices about the infrastructure."""
    from .api import vim

    vm = find_vm(session, mt_vm_key)
    p = properties(session, [vm], vim.VirtualMachine, ["name", "config.extraConfig", "runtime.powerState"])[vm]
    if extra_config(p.get("config.extraConfig"), ENABLE_UUID).upper() == "TRUE":
        return []
    # Reuse the key's existing spelling (the VMX matches keys case-insensitively): never leave two entries.
    key = next((str(o.key) for o in p.get("config.extraConfig") or [] if str(o.key).lower() == ENABLE_UUID.lower()),
               ENABLE_UUID)
    name = p.get("name", mt_vm_key)
    what = f"set {ENABLE_UUID}=TRUE on VM {name}"
    spec = vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=key, value="TRUE")])
    wait(call(what, vm.ReconfigVM_Task, spec=spec), what)
    if str(p.get("runtime.powerState")) == "poweredOff":
        return [f"{what}; it takes effect when the VM is next powered on"]
    return [f"{what}; the guest sees it only after the VM is powered off and on again (a reboot from inside "
            "the guest is not enough)"]
