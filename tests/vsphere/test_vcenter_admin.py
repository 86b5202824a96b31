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
