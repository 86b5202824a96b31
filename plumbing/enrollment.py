"""Client side of enrollment, shared by `standby-agent enroll` and `standby-mt enroll`.

1. Fetch the CA certificate over an unverified TLS connection and compare its SHA-256 fingerprint with
   the one `standby-ps init` printed. Nothing secret is sent on that connection. A mismatch never shows
   the fingerprint the server presented: an operator could paste it back, and trust whoever sits in
   between; a malformed fingerprint is called malformed before any connection is made.
2. Open a second connection that verifies the server against that CA, and only then send the
   passphrase and a CSR made here (the private key never leaves this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import re
import socket
from pathlib import Path

from . import identity as ident
from .errors import BadInput, Refused
from .link import dial
from .tls import anonymous_client_context


def read_passphrase(path: Path | None) -> str:
    if path is None:
        import getpass

        return getpass.getpass("enrollment passphrase: ").strip()
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise BadInput(f"cannot read the passphrase file: {exc}") from None


def parse_fingerprint(text: str) -> str:
    """The CA fingerprint the operator gave, as `standby-ps init` prints it: 'sha256:' and 64 hex digits.
    Upper case and OpenSSL's form (`sha256 Fingerprint=AB:CD:...`) are taken too; anything else is
    BadInput, so a typo is not reported as a wrong server."""
    given = text.strip()
    digits = given.lower()
    for prefix in ("sha256 fingerprint=", "sha256:"):
        if digits.startswith(prefix):
            digits = digits[len(prefix):]
            break
    digits = digits.replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        shown = given if len(given) <= 100 else given[:100] + "…"
        raise BadInput(
            f"the fingerprint {shown!r} is malformed: expected 'sha256:' followed by 64 hex digits, as "
            "'standby-ps init' printed it"
        )
    return "sha256:" + digits


async def _enroll(
    host: str, port: int, fingerprint: str, name: str, role: str, passphrase: str, replace: bool
) -> ident.Identity:
    link = await dial(host, port, anonymous_client_context(None), "enroll")
    try:
        ca_pem = (await link.call("ca"))["ca_pem"].encode()
    finally:
        await link.close()
    seen = ident.ca_fingerprint(ca_pem)
    if not hmac.compare_digest(seen, fingerprint):
        raise Refused(
            f"the server at {host}:{port} presents a CA whose fingerprint is not {fingerprint}: wrong server, or "
            "somebody in between — nothing was sent. Take the fingerprint from the process server itself "
            "('standby-ps init' printed it; 'openssl x509 -noout -fingerprint -sha256 -in "
            "/var/lib/standby/ps/ca/ca.pem' prints it again there), never from this connection"
        )
    key_pem, csr_pem = ident.make_key_and_csr(name, role)
    link = await dial(host, port, anonymous_client_context(ca_pem), "enroll")
    try:
        res = await link.call(
            "enroll", name=name, role=role, passphrase=passphrase, csr=csr_pem.decode(), replace=replace
        )
    finally:
        await link.close()
    return ident.Identity(name, role, res["cert_pem"].encode(), key_pem, ca_pem)


def enroll(
    host: str,
    port: int,
    fingerprint: str,
    name: str,
    role: str,
    passphrase: str,
    directory: Path,
    replace: bool = False,
) -> ident.Identity:
    fingerprint = parse_fingerprint(fingerprint)
    if (Path(directory) / "cert.pem").exists() and not replace:
        raise BadInput(f"{directory} already holds an identity (use --replace to enroll again)")
    identity = asyncio.run(_enroll(host, port, fingerprint, name, role, passphrase, replace))
    identity.save(Path(directory))
    return identity


def add_enroll_parser(sub: argparse._SubParsersAction, what: str, default_dir: Path) -> argparse.ArgumentParser:
    """The `enroll` verb, the same for agents and master targets."""
    e = sub.add_parser("enroll", help=f"enroll this {what} with a deployment (passphrase + CA fingerprint)")
    e.add_argument("--server", required=True, help="process server HOST[:PORT] (port default 9443)")
    e.add_argument("--fingerprint", required=True, help="CA fingerprint printed by 'standby-ps init' (sha256:…)")
    e.add_argument("--passphrase-file", type=Path, help="file holding the enrollment passphrase (else prompted)")
    e.add_argument("--name", default=socket.gethostname(), help=f"this {what}'s name (default: host name)")
    e.add_argument("--dir", type=Path, default=default_dir, help=f"state directory (default {default_dir})")
    e.add_argument("--replace", action="store_true", help="enroll again, replacing an earlier identity")
    return e
