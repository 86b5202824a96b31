"""Enrollment's fingerprint check (plumbing.enrollment): a malformed fingerprint is called malformed before
any connection, and a mismatch never shows the fingerprint the server presented (an operator could paste
it back and trust whoever sits in between)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from standby.plumbing import enrollment
from standby.plumbing import identity as ident
from standby.plumbing.errors import EXIT_BAD_INPUT, EXIT_REFUSED, BadInput, Refused
from tests.tools import need

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize("given", [
    f"sha256:{HEX}",
    f"  SHA256:{HEX.upper()}\n",
    f"sha256 Fingerprint={':'.join(HEX[i:i + 2].upper() for i in range(0, 64, 2))}",  # openssl's output
    ":".join(HEX[i:i + 2] for i in range(0, 64, 2)),
    HEX,
])
def test_well_formed_fingerprints_are_taken(given: str) -> None:
    assert enrollment.parse_fingerprint(given) == f"sha256:{HEX}"


@pytest.mark.parametrize("given", [
    "", "sha256:", f"sha256:{HEX[:-1]}", f"sha256:{HEX}0", f"sha1:{HEX}", f"sha256:{HEX[:-1]}g", "sha256:…",
    "md5:" + HEX[:32],
])
def test_a_malformed_fingerprint_is_called_malformed(given: str) -> None:
    with pytest.raises(BadInput, match="is malformed: expected 'sha256:' followed by 64 hex digits") as exc:
        enrollment.parse_fingerprint(given)
    assert exc.value.exit_code == EXIT_BAD_INPUT


def test_a_malformed_fingerprint_connects_to_nothing(monkeypatch, tmp_path: Path) -> None:
    async def dial(*a, **k):
        raise AssertionError("enroll dialled the server with a malformed fingerprint")

    monkeypatch.setattr(enrollment, "dial", dial)
    with pytest.raises(BadInput, match="malformed"):
        enrollment.enroll("ps.example.net", 9443, "sha256:abc", "web01", "agent", "pass", tmp_path)


class CALink:
    """Answers `ca` with a CA certificate, as the process server's enrollment service does."""

    def __init__(self, ca_pem: bytes) -> None:
        self.ca_pem = ca_pem

    async def call(self, op: str, **args):
        assert op == "ca", f"{op} sent after a fingerprint mismatch"
        return {"ca_pem": self.ca_pem.decode()}

    async def close(self) -> None:
        pass


def test_a_mismatch_does_not_show_the_presented_fingerprint(monkeypatch, tmp_path: Path) -> None:
    ca_pem, _ = ident.create_ca("somebody-else")
    presented = ident.ca_fingerprint(ca_pem)

    async def dial(*a, **k):
        return CALink(ca_pem)

    monkeypatch.setattr(enrollment, "dial", dial)
    with pytest.raises(Refused) as exc:
        enrollment.enroll("ps.example.net", 9443, f"SHA256:{HEX.upper()}", "web01", "agent", "pass", tmp_path)
    text = str(exc.value)
    assert exc.value.exit_code == EXIT_REFUSED
    assert presented not in text and presented[7:] not in text
    assert f"not sha256:{HEX}" in text and "nothing was sent" in text and "never from this connection" in text
    assert not (tmp_path / "cert.pem").exists()


def test_the_hint_s_openssl_command_prints_a_fingerprint_enroll_takes(tmp_path: Path) -> None:
    need("openssl")
    ca_pem, _ = ident.create_ca("ps")
    (tmp_path / "ca.pem").write_bytes(ca_pem)
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(tmp_path / "ca.pem")],
                         capture_output=True, text=True, check=True).stdout
    assert enrollment.parse_fingerprint(out) == ident.ca_fingerprint(ca_pem)
