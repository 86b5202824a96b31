"""`standby vcenter add|list|remove` through a real process server and the simulator: the certificate
pinned, the login proved before anything is stored, the password kept 0600 and never shown or logged."""

from __future__ import annotations

import stat
from pathlib import Path

from tests.deploy import LocalDeployment


def _password_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vc-password"
    p.write_text(text + "\n")
    p.chmod(0o600)
    return p


def test_add_pins_on_first_use_and_stores_the_password_privately(deployment: LocalDeployment, vcsim,
                                                                  tmp_path: Path) -> None:
    pw = _password_file(tmp_path, vcsim.password)
    r = deployment.cli("vcenter", "add", "vc1", "--host", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
                       "--password-file", str(pw))
    assert r.returncode == 0, r.stderr
    assert vcsim.fingerprint in r.stdout and "first use" in r.stdout and "VMware vCenter Server" in r.stdout
    stored = deployment.ps_dir / "vcenters" / "vc1.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    listed = deployment.cli("vcenter", "list")
    assert listed.returncode == 0 and "vc1" in listed.stdout and vcsim.fingerprint in listed.stdout
    assert vcsim.password not in listed.stdout
    again = deployment.cli("vcenter", "add", "vc1", "--host", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
                           "--password-file", str(pw))
    assert again.returncode == 2 and "--replace" in again.stderr
    assert deployment.cli("vcenter", "remove", "vc1").returncode == 0
    assert not stored.exists()
    assert vcsim.password not in deployment.log_text("ps")


def test_add_with_the_right_fingerprint_in_openssl_form(deployment: LocalDeployment, vcsim, tmp_path: Path) -> None:
    hexd = vcsim.fingerprint.removeprefix("sha256:").upper()
    openssl = "sha256 Fingerprint=" + ":".join(hexd[i:i + 2] for i in range(0, 64, 2))
    r = deployment.cli("vcenter", "add", "vc1", "--host", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
                       "--password-file", str(_password_file(tmp_path, vcsim.password)), "--fingerprint", openssl)
    assert r.returncode == 0, r.stderr
    assert "(as given)" in r.stdout


def test_another_fingerprint_is_refused_and_nothing_stored(deployment: LocalDeployment, vcsim,
                                                           tmp_path: Path) -> None:
    r = deployment.cli("vcenter", "add", "vc1", "--host", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
                       "--password-file", str(_password_file(tmp_path, vcsim.password)),
                       "--fingerprint", "sha256:" + "0" * 64)
    assert r.returncode == 1, r.stderr
    assert "Nothing was stored" in r.stderr and vcsim.fingerprint not in r.stderr
    assert not (deployment.ps_dir / "vcenters" / "vc1.json").exists()


def test_wrong_password_is_refused_before_storing(deployment: LocalDeployment, vcsim, tmp_path: Path) -> None:
    r = deployment.cli("vcenter", "add", "vc1", "--host", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
                       "--password-file", str(_password_file(tmp_path, "not-the-password")))
    assert r.returncode == 1 and "wrong user name or password" in r.stderr, r.stderr
    assert "not-the-password" not in r.stderr + deployment.log_text("ps")
    assert not (deployment.ps_dir / "vcenters" / "vc1.json").exists()


def test_unreachable_vcenter_and_unknown_name(deployment: LocalDeployment, vcsim, tmp_path: Path) -> None:
    vcsim.stop()
    r = deployment.cli("vcenter", "add", "vc1", "--host", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
                       "--password-file", str(_password_file(tmp_path, vcsim.password)))
    assert r.returncode == 6 and "cannot reach vCenter" in r.stderr, r.stderr
    gone = deployment.cli("vcenter", "remove", "nope")
    assert gone.returncode == 2 and "unknown vCenter 'nope'" in gone.stderr


def _add(deployment: LocalDeployment, vcsim, tmp_path: Path) -> None:
    r = deployment.cli("vcenter", "add", "vc1", "--host", f"{vcsim.host}:{vcsim.port}", "--user", vcsim.user,
                       "--password-file", str(_password_file(tmp_path, vcsim.password)))
    assert r.returncode == 0, r.stderr


def _mt_in_vm(deployment: LocalDeployment, vcsim, name: str, uuid: str) -> None:
    """A master target whose system UUID is the VM's: as if it ran inside that VM of the simulator."""
    deployment.enroll("mt", name)
    deployment.set_mt_config(name, system_uuid=uuid)
    deployment.start("mt", name)
    deployment.wait_for(
        lambda _status: any(m["name"] == name and m.get("system_uuid")
                            for m in deployment.admin().call("machines")["machines"]),
        30, f"{name} reports its system UUID",
    )


def _bios_uuid(vcsim, vm_name: str) -> str:
    from standby.vsphere.connect import connect
    from standby.vsphere.inventory import list_vms

    with connect(vcsim.vcenter()) as s:
        return next(v.bios_uuid for v in list_vms(s) if v.name == vm_name)


def test_mt_check_names_each_failed_rule_then_fix_and_pass(deployment: LocalDeployment, vcsim,
                                                          tmp_path: Path) -> None:
    from standby.vsphere.api import vim
    from standby.vsphere.connect import connect
    from standby.vsphere.objects import find_vm

    from .vmsetup import MT, add_controller

    _add(deployment, vcsim, tmp_path)
    _mt_in_vm(deployment, vcsim, "mt01", _bios_uuid(vcsim, MT))
    r = deployment.cli("mt", "check", "mt01")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"master target mt01 is VM {MT} in vCenter vc1" in r.stdout
    assert "FAIL enable-uuid" in r.stdout and "standby mt check" in r.stdout and "--fix" in r.stdout
    assert "FAIL lsi-logic" in r.stdout and "ok   no-snapshots" in r.stdout and "2 rule(s) fail" in r.stdout
    fixed = deployment.cli("mt", "check", "mt01", "--fix")
    assert fixed.returncode == 1 and "fixed: " in fixed.stdout and "ok   enable-uuid" in fixed.stdout
    assert "FAIL lsi-logic" in fixed.stdout  # --fix changes nothing but EnableUUID
    with connect(vcsim.vcenter()) as s:
        add_controller(find_vm(s, MT), vim.vm.device.VirtualLsiLogicController)
    ok = deployment.cli("mt", "check", "mt01", "--json")
    assert ok.returncode == 0, ok.stdout
    import json

    assert all(f["ok"] for f in json.loads(ok.stdout)["findings"])


def test_vms_lists_disks_and_matches_standby_machines(deployment: LocalDeployment, vcsim, tmp_path: Path) -> None:
    import uuid as uuidlib

    _add(deployment, vcsim, tmp_path)
    bios = _bios_uuid(vcsim, "DC0_H0_VM1")
    # As some guests read it: the first three fields byte-swapped (plumbing.about keeps what the firmware says).
    swapped = str(uuidlib.UUID(bytes_le=uuidlib.UUID(bios).bytes))
    _mt_in_vm(deployment, vcsim, "mt02", swapped)
    r = deployment.cli("vcenter", "vms", "vc1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    vm1 = next(line for line in lines if line.startswith("DC0_H0_VM1 "))
    assert "= standby machine mt02" in vm1 and bios in vm1 and "poweredOn" in vm1
    assert not any("standby machine" in line for line in lines if line.startswith("DC0_H0_VM0 "))
    assert any("[LocalDS_0] DC0_H0_VM1/disk1.vmdk" in line and "pvscsi" in line for line in lines)
    missing = deployment.cli("mt", "check", "nope")
    assert missing.returncode == 2 and "unknown master target" in missing.stderr
