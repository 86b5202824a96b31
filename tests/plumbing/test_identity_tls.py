"""Deployment CA, certificates, identities on disk, and real TLS handshakes between them (promise 7).

The TLS tests run a real asyncio server on 127.0.0.1 (port 0) and real clients; nothing is mocked. Every
exchange is bounded by a timeout and closes its server and connections, also when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import re
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from standby.plumbing.identity import (
    ROLES,
    Identity,
    IdentityError,
    ca_fingerprint,
    cert_public_key_pem,
    cert_serial,
    create_ca,
    generate_passphrase,
    issue_server_cert,
    make_key_and_csr,
    sign_csr,
)
from standby.plumbing.tls import (
    PeerIdentity,
    anonymous_client_context,
    client_context,
    peer_identity,
    server_context,
)

CLIENT_ROLES = ("agent", "mt", "admin")
EXCHANGE_TIMEOUT = 10.0  # seconds; a handshake on loopback takes milliseconds


# ------------------------------------------------------------------------------------------ fixtures


@dataclass
class Pki:
    """One deployment: its CA, the process server identity and one client identity per role."""

    ca_cert: bytes
    ca_key: bytes
    server: Identity
    clients: dict[str, Identity] = field(default_factory=dict)


def enroll(ca_cert: bytes, ca_key: bytes, name: str, role: str) -> Identity:
    """What an enrolling machine and the CA do together, minus the network."""
    key_pem, csr_pem = make_key_and_csr(name, role)
    cert_pem = sign_csr(ca_cert, ca_key, csr_pem, name, role)
    return Identity(name=name, role=role, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_cert)


def make_pki(deployment: str) -> Pki:
    ca_cert, ca_key = create_ca(deployment)
    cert, key = issue_server_cert(ca_cert, ca_key, "ps1", ["localhost", "127.0.0.1", "::1"])
    server = Identity(name="ps1", role="ps", cert_pem=cert, key_pem=key, ca_pem=ca_cert)
    pki = Pki(ca_cert, ca_key, server)
    for role in CLIENT_ROLES:
        pki.clients[role] = enroll(ca_cert, ca_key, f"{role}-01", role)
    return pki


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki("prod")


@pytest.fixture(scope="module")
def other_pki() -> Pki:
    """A second deployment with its own CA: nothing it issued may be accepted by the first."""
    return make_pki("prod")  # same deployment name on purpose: only the CA key may make the difference


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def subject(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


# ------------------------------------------------------------------------------------------ the CA


def test_ca_is_a_p256_ca_valid_ten_years(pki: Pki) -> None:
    ca = load(pki.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.public_key().curve, ec.SECP256R1)
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert datetime.timedelta(days=3649) < lifetime < datetime.timedelta(days=3652)
    ca.verify_directly_issued_by(ca)  # self-signed
    key = serialization.load_pem_private_key(pki.ca_key, password=None)
    assert key.public_key().public_numbers() == ca.public_key().public_numbers()  # type: ignore[union-attr]


def test_fingerprint_format_and_value(pki: Pki, other_pki: Pki) -> None:
    fp = ca_fingerprint(pki.ca_cert)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    # Independent oracle: the stdlib's PEM->DER and hashlib.
    der = ssl.PEM_cert_to_DER_cert(pki.ca_cert.decode())
    assert fp == "sha256:" + hashlib.sha256(der).hexdigest()
    assert ca_fingerprint(other_pki.ca_cert) != fp


def test_server_cert_has_sans_serverauth_and_role_ps(pki: Pki) -> None:
    cert = load(pki.server.cert_pem)
    cert.verify_directly_issued_by(load(pki.ca_cert))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert subject(cert, NameOID.COMMON_NAME) == ["ps1"]
    assert subject(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["ps"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_server_cert_needs_a_host(pki: Pki) -> None:
    with pytest.raises(IdentityError, match="at least one"):
        issue_server_cert(pki.ca_cert, pki.ca_key, "ps1", [])


@pytest.mark.parametrize("role", ROLES)
def test_client_cert_for_each_role(pki: Pki, role: str) -> None:
    ident = enroll(pki.ca_cert, pki.ca_key, f"m-{role}", role)
    cert = load(ident.cert_pem)
    cert.verify_directly_issued_by(load(pki.ca_cert))
    assert subject(cert, NameOID.COMMON_NAME) == [f"m-{role}"]
    assert subject(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == [role]
    assert subject(cert, NameOID.ORGANIZATION_NAME) == ["prod"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert_serial(ident.cert_pem) == cert.serial_number
    key = serialization.load_pem_private_key(ident.key_pem, password=None)
    assert cert_public_key_pem(ident.cert_pem) == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_the_ca_decides_the_role_not_the_csr(pki: Pki) -> None:
    _, csr = make_key_and_csr("sneaky", "admin")  # asks for admin
    cert = load(sign_csr(pki.ca_cert, pki.ca_key, csr, "sneaky", "agent"))
    assert subject(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["agent"]


def test_sign_csr_refuses_a_different_cn(pki: Pki) -> None:
    _, csr = make_key_and_csr("db01", "agent")
    with pytest.raises(IdentityError, match="'db01', not 'db02'"):
        sign_csr(pki.ca_cert, pki.ca_key, csr, "db02", "agent")


def test_sign_csr_refuses_a_bad_signature(pki: Pki) -> None:
    _, csr_pem = make_key_and_csr("db01", "agent")
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s
    bad = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match="invalid signature"):
        sign_csr(pki.ca_cert, pki.ca_key, bad, "db01", "agent")


def test_sign_csr_refuses_garbage_unknown_role_bad_days_and_a_foreign_ca_key(pki: Pki, other_pki: Pki) -> None:
    _, csr = make_key_and_csr("db01", "agent")
    with pytest.raises(IdentityError, match="not a certificate signing request"):
        sign_csr(pki.ca_cert, pki.ca_key, b"garbage", "db01", "agent")
    with pytest.raises(IdentityError, match="unknown role"):
        sign_csr(pki.ca_cert, pki.ca_key, csr, "db01", "root")
    with pytest.raises(IdentityError, match="validity"):
        sign_csr(pki.ca_cert, pki.ca_key, csr, "db01", "agent", days=0)
    with pytest.raises(IdentityError, match="does not belong"):
        sign_csr(pki.ca_cert, other_pki.ca_key, csr, "db01", "agent")


def test_names_are_checked() -> None:
    for bad in ["", " db01", "db\n01", "x" * 65]:
        with pytest.raises(IdentityError):
            make_key_and_csr(bad, "agent")
    with pytest.raises(IdentityError, match="unknown role"):
        make_key_and_csr("db01", "root")


def test_serials_are_random(pki: Pki) -> None:
    _, csr = make_key_and_csr("db01", "agent")
    serials = {cert_serial(sign_csr(pki.ca_cert, pki.ca_key, csr, "db01", "agent")) for _ in range(5)}
    assert len(serials) == 5
    assert all(s.bit_length() > 64 for s in serials)


def test_generate_passphrase_is_typable_and_strong() -> None:
    phrases = {generate_passphrase() for _ in range(50)}
    assert len(phrases) == 50
    for p in phrases:
        groups = p.split("-")
        assert re.fullmatch(r"[0-9a-hjkmnp-tv-z]+", "".join(groups)), p
        # entropy = symbols * log2(alphabet size); alphabet of 32 -> 5 bits per symbol
        assert len("".join(groups)) * 5 >= 100


# ------------------------------------------------------------------------------------ on-disk identity


def test_save_load_round_trip_and_modes(pki: Pki, tmp_path: Path) -> None:
    ident = pki.clients["agent"]
    target = tmp_path / "state" / "identity"
    ident.save(target)
    assert stat.S_IMODE((target / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert sorted(p.name for p in target.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]  # no temp files
    assert Identity.load(target) == ident
    ident.save(target)  # overwriting is fine and keeps the mode
    assert stat.S_IMODE((target / "key.pem").stat().st_mode) == 0o600
    assert Identity.load(target) == ident


def test_repr_does_not_leak_the_private_key(pki: Pki) -> None:
    ident = pki.clients["agent"]
    assert b"PRIVATE KEY" in ident.key_pem
    assert "PRIVATE KEY" not in repr(ident)


def test_load_from_empty_dir_says_not_enrolled(tmp_path: Path) -> None:
    with pytest.raises(IdentityError) as info:
        Identity.load(tmp_path, command="standby-mt enroll")
    msg = str(info.value)
    assert msg.startswith(f"not enrolled: no identity in {tmp_path}")
    assert "'standby-mt enroll'" in msg
    with pytest.raises(IdentityError, match="not enrolled"):
        Identity.load(tmp_path / "missing")


def test_load_refuses_incomplete_or_mismatched(pki: Pki, tmp_path: Path) -> None:
    pki.clients["agent"].save(tmp_path)
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(IdentityError, match="incomplete identity.*ca.pem"):
        Identity.load(tmp_path)
    (tmp_path / "ca.pem").write_bytes(pki.ca_cert)
    (tmp_path / "key.pem").write_bytes(pki.clients["mt"].key_pem)
    with pytest.raises(IdentityError, match="does not belong"):
        Identity.load(tmp_path)


def test_identity_refuses_unknown_role(pki: Pki) -> None:
    with pytest.raises(IdentityError, match="unknown role"):
        Identity("x", "root", pki.server.cert_pem, pki.server.key_pem, pki.ca_cert)


# ------------------------------------------------------------------------------------------ real TLS


@dataclass
class Outcome:
    server_saw: list[PeerIdentity | None]  # one entry per connection whose handshake the server completed
    reply: bytes | None = None  # what the client read; None when it failed
    error: BaseException | None = None  # what the client got instead
    client_saw: PeerIdentity | None = None
    server_der: bytes | None = None
    version: str | None = None


async def _exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str) -> Outcome:
    outcome = Outcome(server_saw=[])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            outcome.server_saw.append(peer_identity(writer.get_extra_info("ssl_object")))
            writer.write(b"hello\n")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            try:
                reader, writer = await asyncio.open_connection(host, port, ssl=client_ctx)
            except (ssl.SSLError, OSError) as exc:
                outcome.error = exc
                return outcome
            try:
                ssl_object = writer.get_extra_info("ssl_object")
                outcome.client_saw = peer_identity(ssl_object)
                outcome.server_der = ssl_object.getpeercert(binary_form=True)
                outcome.version = ssl_object.version()
                # TLS 1.3: a client certificate the server rejects is only reported on the client's
                # first read (the client's side of the handshake is already finished by then).
                outcome.reply = await reader.readexactly(6)
            except (ssl.SSLError, OSError, asyncio.IncompleteReadError) as exc:
                outcome.error = exc
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return outcome


def exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str = "127.0.0.1") -> Outcome:
    return asyncio.run(_exchange(server_ctx, client_ctx, host))


def refused(outcome: Outcome) -> bool:
    return outcome.reply is None and outcome.error is not None and outcome.server_saw == []


@pytest.mark.parametrize("role", CLIENT_ROLES)
def test_mutual_tls_each_side_sees_the_other(pki: Pki, role: str) -> None:
    ident = pki.clients[role]
    out = exchange(server_context(pki.server), client_context(ident))
    assert out.error is None and out.reply == b"hello\n"
    assert out.version == "TLSv1.3"
    assert out.server_saw == [PeerIdentity(name=ident.name, role=role, serial=cert_serial(ident.cert_pem))]
    assert out.client_saw == PeerIdentity(name="ps1", role="ps", serial=cert_serial(pki.server.cert_pem))


def test_mutual_tls_by_dns_name(pki: Pki) -> None:
    out = exchange(server_context(pki.server), client_context(pki.clients["agent"]), host="localhost")
    assert out.reply == b"hello\n"


def test_unenrolled_client_connects_without_identity(pki: Pki) -> None:
    out = exchange(server_context(pki.server), anonymous_client_context(pki.ca_cert))
    assert out.reply == b"hello\n"
    assert out.server_saw == [None]
    assert out.client_saw is not None and out.client_saw.role == "ps"  # the server was verified


def test_client_cert_from_another_ca_is_refused_at_handshake(pki: Pki, other_pki: Pki) -> None:
    # The foreign client trusts our CA (so it would accept our server) but its own cert is foreign.
    foreign = other_pki.clients["admin"]
    intruder = Identity(foreign.name, foreign.role, foreign.cert_pem, foreign.key_pem, pki.ca_cert)
    out = exchange(server_context(pki.server), client_context(intruder))
    assert refused(out), out


def test_server_cert_is_not_accepted_as_a_client_cert(pki: Pki) -> None:
    out = exchange(server_context(pki.server), client_context(pki.server))
    assert refused(out), out


def test_fetch_server_cert_without_verification(pki: Pki) -> None:
    out = exchange(server_context(pki.server), anonymous_client_context(None))
    assert out.reply == b"hello\n"
    assert out.server_der == load(pki.server.cert_pem).public_bytes(serialization.Encoding.DER)
    assert out.server_saw == [None]
    # Unverified: whatever the subject says, it is not an identity.
    assert out.client_saw is None


def test_client_refuses_a_server_from_another_ca(pki: Pki, other_pki: Pki) -> None:
    out = exchange(server_context(other_pki.server), client_context(pki.clients["agent"]))
    assert refused(out), out
    assert isinstance(out.error, ssl.SSLCertVerificationError)
    out = exchange(server_context(other_pki.server), anonymous_client_context(pki.ca_cert))
    assert isinstance(out.error, ssl.SSLCertVerificationError)


def test_client_refuses_a_client_cert_posing_as_server(pki: Pki) -> None:
    # Threat: a stolen agent key standing in for the process server. Same CA, but no serverAuth usage.
    rogue = pki.clients["agent"]
    out = exchange(server_context(rogue), client_context(pki.clients["mt"]))
    assert isinstance(out.error, ssl.SSLCertVerificationError), out


def test_client_refuses_a_server_cert_for_another_host(pki: Pki) -> None:
    cert, key = issue_server_cert(pki.ca_cert, pki.ca_key, "ps2", ["ps2.example.net", "10.9.9.9"])
    elsewhere = Identity("ps2", "ps", cert, key, pki.ca_cert)
    out = exchange(server_context(elsewhere), client_context(pki.clients["agent"]))
    assert isinstance(out.error, ssl.SSLCertVerificationError), out


def test_tls12_client_is_refused(pki: Pki) -> None:
    old = client_context(pki.clients["agent"])
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    out = exchange(server_context(pki.server), old)
    assert refused(out), out


def test_contexts_are_tls13_only_and_trust_only_the_ca(pki: Pki) -> None:
    for ctx in (
        server_context(pki.server),
        client_context(pki.clients["agent"]),
        anonymous_client_context(pki.ca_cert),
        anonymous_client_context(None),
    ):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    srv = server_context(pki.server)
    assert srv.verify_mode == ssl.CERT_OPTIONAL
    assert len(srv.get_ca_certs()) == 1
    cli = client_context(pki.clients["agent"])
    assert cli.verify_mode == ssl.CERT_REQUIRED and cli.check_hostname
    assert len(cli.get_ca_certs()) == 1


# ------------------------------------------- the server's reason, from an in-memory handshake (real TLS)


def bio_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> dict[str, ssl.SSLError]:
    """Run a real TLS handshake between two SSLObjects over memory BIOs; return each side's error.

    asyncio does not surface the server side's handshake failure to the application, so this is how a
    test sees *why* the server refused a client.
    """
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    errors: dict[str, ssl.SSLError] = {}
    done: set[str] = set()
    for _ in range(10):  # a TLS 1.3 handshake needs 2-3 flights; 10 rounds bounds a stuck exchange
        for side, obj in (("client", client), ("server", server)):
            if side in errors or side in done:
                continue
            try:
                obj.do_handshake()
                done.add(side)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                errors[side] = exc
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if {"client", "server"} <= done | set(errors):
            break
    assert {"client", "server"} <= done | set(errors), "handshake did not finish within 10 rounds"
    return errors


def test_server_refuses_foreign_client_cert_for_the_right_reason(pki: Pki, other_pki: Pki) -> None:
    foreign = other_pki.clients["agent"]
    intruder = Identity(foreign.name, foreign.role, foreign.cert_pem, foreign.key_pem, pki.ca_cert)
    errors = bio_handshake(server_context(pki.server), client_context(intruder))
    assert isinstance(errors.get("server"), ssl.SSLCertVerificationError), errors
    assert "unable to get local issuer certificate" in str(errors["server"])


def test_server_refuses_server_cert_as_client_cert_for_the_right_reason(pki: Pki) -> None:
    errors = bio_handshake(server_context(pki.server), client_context(pki.server))
    assert isinstance(errors.get("server"), ssl.SSLCertVerificationError), errors
    assert "unsuitable certificate purpose" in str(errors["server"])


def test_in_memory_handshake_succeeds_for_an_enrolled_client(pki: Pki) -> None:
    assert bio_handshake(server_context(pki.server), client_context(pki.clients["mt"])) == {}
