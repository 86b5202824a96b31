"""The deployment's own certificate authority and the identities it issues (promise 7).

Theory of operation
-------------------
`standby-ps init` calls `create_ca` once and prints `ca_fingerprint` for the operator. The process server
gets a server certificate from `issue_server_cert`. Every other machine (agent, master target, admin CLI)
enrolls: it makes its key pair and a CSR locally with `make_key_and_csr` (the private key never leaves the
machine), sends the CSR with the deployment passphrase, and the CA answers with `sign_csr`. The result is
kept on disk as an `Identity` (cert.pem, key.pem, ca.pem).

A certificate says who its holder is in two subject attributes:

    CN = name   (machine or operator name, e.g. "db01")
    OU = role   (one of ROLES)
    O  = the deployment name, copied from the CA

The CA alone decides name and role: whatever the CSR's subject claims beyond its CN is ignored, so an
enrolling machine cannot ask for the admin role. Extended key usage separates the two TLS sides: client
certificates carry only clientAuth and the process server's only serverAuth, so OpenSSL refuses an agent's
certificate presented as a server (a stolen agent key cannot impersonate the process server) and the
server's certificate presented as a client.

All keys are EC P-256 (fast handshakes, small certificates, supported by every OpenSSL we run on).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("agent", "mt", "admin", "ps")
"""Roles a certificate can carry: mobility agent, master target, operator (admin CLI), process server."""

CA_VALIDITY_DAYS = 3650
"""Ten years: the CA is created once per deployment; re-keying every agent is an operation, not a chore."""

LEAF_VALIDITY_DAYS = 825
"""Leaf certificates: the long-standing CA/Browser-forum ceiling, a compromise between re-enrollment
churn and how long a stolen key stays useful."""

CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates start slightly in the past so a peer whose clock runs a little behind still accepts them."""

MAX_NAME_LENGTH = 64
"""X.520 upper bound for a CommonName (ub-common-name)."""

CERT_FILE, KEY_FILE, CA_FILE = "cert.pem", "key.pem", "ca.pem"

_PASSPHRASE_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
"""Crockford's base32 alphabet in lower case: no i, l, o, u, so nothing is misread when typed from paper."""
_PASSPHRASE_GROUPS, _PASSPHRASE_GROUP_LEN = 5, 5  # 25 symbols x 5 bits = 125 bits of entropy


class IdentityError(Exception):
    """An identity cannot be created, issued or loaded; `str(exc)` is the message for the operator."""


@dataclass(frozen=True)
class Identity:
    """One enrolled party: its certificate, its private key and the deployment CA it trusts.

    `key_pem` is left out of repr() so that logging an Identity never leaks the private key.
    """

    name: str
    role: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise IdentityError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")

    def save(self, directory: Path) -> None:
        """Write ca.pem, key.pem (mode 0600) and cert.pem durably into `directory` (mode 0700).

        Each file goes through a temporary file, fsync, rename and directory fsync, so a crash leaves either
        the old or the new file, never a torn one. cert.pem is written last and `load` checks that it
        matches key.pem, so a crash half-way through a re-enrollment is detected rather than used.
        """
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_durably(directory / CA_FILE, self.ca_pem, 0o644)
        # Threat: other local users reading the private key. The temporary file is created 0600, so the key
        # is never readable by anyone else, not even for an instant.
        _write_durably(directory / KEY_FILE, self.key_pem, 0o600)
        _write_durably(directory / CERT_FILE, self.cert_pem, 0o644)

    @classmethod
    def load(cls, directory: Path, *, command: str = "standby-agent enroll") -> Identity:
        """Read an identity written by `save`; name and role come from the certificate itself.

        `command` is the whole command the "not enrolled" message tells the operator to run.
        """
        directory = Path(directory)
        paths = [directory / n for n in (CERT_FILE, KEY_FILE, CA_FILE)]
        if not any(p.exists() for p in paths):
            raise IdentityError(f"not enrolled: no identity in {directory} — run '{command}' first")
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise IdentityError(
                f"incomplete identity in {directory}: {', '.join(missing)} missing — run '{command}' again"
            )
        try:
            cert_pem, key_pem, ca_pem = (p.read_bytes() for p in paths)
        except OSError as exc:
            raise IdentityError(f"cannot read identity in {directory}: {exc}") from exc
        try:
            cert = _load_cert(cert_pem, f"{directory / CERT_FILE}")
            key = _load_private_key(key_pem, f"{directory / KEY_FILE}")
            if _public_der(key.public_key()) != _public_der(cert.public_key()):
                raise IdentityError(f"{directory / KEY_FILE} does not belong to {directory / CERT_FILE}")
            name, role = subject_name_role(cert)
        except IdentityError:
            raise
        except Exception as exc:  # cryptography's parsers: ValueError, UnsupportedAlgorithm, KeyError...
            raise IdentityError(f"the identity in {directory} is damaged ({type(exc).__name__}: {exc}); enroll "
                                f"again with '{command}'") from None
        if name is None or role is None:
            raise IdentityError(f"{directory / CERT_FILE} is not a standby certificate (no CN or role)")
        return cls(name=name, role=role, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)


# --------------------------------------------------------------------------------------------- the CA


def create_ca(deployment: str) -> tuple[bytes, bytes]:
    """Make the deployment's self-signed CA: returns (ca_cert_pem, ca_key_pem).

    path_length=0: the CA signs leaf certificates only, so a leaked leaf key cannot mint further identities.
    """
    _check_name(deployment, "deployment name")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, deployment),
            x509.NameAttribute(NameOID.COMMON_NAME, f"standby CA {deployment}"[:MAX_NAME_LENGTH]),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _private_pem(key)


def ca_fingerprint(ca_cert_pem: bytes) -> str:
    """ "sha256:" + 64 lower-case hex digits over the CA certificate's DER encoding.

    Threat: a man in the middle during enrollment hands out its own CA. The operator compares this value,
    printed by `standby-ps init`, with what the enrolling machine fetched before trusting it.
    """
    return "sha256:" + _load_cert(ca_cert_pem, "CA certificate").fingerprint(hashes.SHA256()).hex()


def issue_server_cert(ca_cert_pem: bytes, ca_key_pem: bytes, name: str, hosts: list[str]) -> tuple[bytes, bytes]:
    """Issue the process server's certificate and key: returns (cert_pem, key_pem).

    `hosts` are the DNS names and IP addresses clients dial; they go into the subjectAltName, which is what
    clients check (check_hostname), so every address agents use must be listed.
    """
    _check_name(name, "server name")
    if not hosts:
        raise IdentityError("a server certificate needs at least one host name or IP address")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            _check_name(host, "host name")
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(
        ca_cert_pem,
        ca_key_pem,
        key.public_key(),
        name,
        "ps",
        LEAF_VALIDITY_DAYS,
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.SubjectAlternativeName(sans),
    )
    return cert, _private_pem(key)


def make_key_and_csr(name: str, role: str) -> tuple[bytes, bytes]:
    """Make a fresh key pair and a CSR on the enrolling machine: returns (key_pem, csr_pem).

    The private key is generated here and never sent anywhere; only the CSR (public key + signature) is.
    The role in the CSR is a request for the operator's eyes — the CA decides.
    """
    _check_name(name, "name")
    _check_role(role)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .sign(key, hashes.SHA256())
    )
    return _private_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def sign_csr(
    ca_cert_pem: bytes, ca_key_pem: bytes, csr_pem: bytes, name: str, role: str, days: int = LEAF_VALIDITY_DAYS
) -> bytes:
    """Issue a client certificate for the key in `csr_pem`, with the name and role the CA chose.

    Checks, each against a named threat:
    - the CSR's self-signature is valid: proves the requester holds the private key, so nobody can get a
      certificate for someone else's public key;
    - the CSR's CN equals `name`: a request made for one machine cannot be signed as another by mistake;
    - the key is EC P-256 or P-384: no weak or exotic keys in the deployment.
    Anything else the CSR claims (its OU, extensions) is ignored: the role comes from the caller.
    """
    _check_name(name, "name")
    _check_role(role)
    if not 1 <= days <= LEAF_VALIDITY_DAYS:
        raise IdentityError(f"validity must be between 1 and {LEAF_VALIDITY_DAYS} days, not {days}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise IdentityError(f"not a certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise IdentityError("certificate signing request has an invalid signature")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    csr_cn = cns[0].value if len(cns) == 1 else None
    if csr_cn != name:
        raise IdentityError(f"certificate signing request is for {csr_cn!r}, not {name!r}")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1 | ec.SECP384R1
    ):
        raise IdentityError("certificate signing request key must be EC P-256 or P-384")
    return _issue(ca_cert_pem, ca_key_pem, public_key, name, role, days, ExtendedKeyUsageOID.CLIENT_AUTH, None)


def cert_serial(cert_pem: bytes) -> int:
    """The certificate's serial number (random, so it identifies one issuance, e.g. for revocation)."""
    return _load_cert(cert_pem, "certificate").serial_number


def cert_public_key_pem(cert_pem: bytes) -> bytes:
    """The certificate's public key as SubjectPublicKeyInfo PEM (what keywrap.wrap_key takes)."""
    return (
        _load_cert(cert_pem, "certificate")
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def generate_passphrase() -> str:
    """A deployment passphrase: 5 groups of 5 lower-case Crockford base32 symbols, 125 bits of entropy.

    125 bits makes offline guessing against a stolen scrypt hash hopeless and online guessing (already
    rate-limited) pointless; the groups and the unambiguous alphabet keep it typable from a note.
    """
    return "-".join(
        "".join(secrets.choice(_PASSPHRASE_ALPHABET) for _ in range(_PASSPHRASE_GROUP_LEN))
        for _ in range(_PASSPHRASE_GROUPS)
    )


# ------------------------------------------------------------------------------------------ internals


def subject_name_role(cert: x509.Certificate) -> tuple[str | None, str | None]:
    """(CN, OU) of a certificate, each None when absent or repeated; the role also when not one of ROLES.

    A repeated attribute is treated as absent: with two CNs, which one a reader picks is ambiguous, and
    ambiguity in who a peer is must never resolve to the more privileged answer.
    """
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    name = cns[0].value if len(cns) == 1 else None
    role = ous[0].value if len(ous) == 1 else None
    return (name if isinstance(name, str) else None), (role if role in ROLES else None)


def _issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    public_key: ec.EllipticCurvePublicKey,
    name: str,
    role: str,
    days: int,
    eku: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> bytes:
    ca_cert = _load_cert(ca_cert_pem, "CA certificate")
    ca_key = _load_private_key(ca_key_pem, "CA key")
    # Threat: signing with a key that is not the CA's would issue certificates nobody can verify; catch the
    # mix-up here, with a clear message, rather than at the first failed handshake.
    if _public_der(ca_key.public_key()) != _public_der(ca_cert.public_key()):
        raise IdentityError("the CA key does not belong to the CA certificate")
    subject_attrs = list(ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
    subject_attrs += [
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ]
    now = _now()
    # A leaf never outlives its CA: verification would fail after the CA expires anyway.
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject_attrs))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        # Random serials: unpredictable, so a chosen-prefix collision against the CA signature is harder,
        # and unique without keeping a counter on disk.
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _check_name(name: str, what: str) -> None:
    """Names go into certificate subjects and log lines: printable, no control characters, bounded."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise IdentityError(f"{what} must be 1 to {MAX_NAME_LENGTH} characters, not {name!r}")
    if not name.isprintable() or name != name.strip():
        raise IdentityError(f"{what} must be printable without surrounding spaces, not {name!r}")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise IdentityError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise IdentityError(f"{what} is not a PEM certificate: {exc}") from exc


def _load_private_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{what} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{what} is not an EC private key")
    return key


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: the daemons start unattended; the file's 0600 mode is what protects it.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_durably(path: Path, data: bytes, mode: int) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


__all__ = [
    "CA_VALIDITY_DAYS",
    "LEAF_VALIDITY_DAYS",
    "ROLES",
    "Identity",
    "IdentityError",
    "ca_fingerprint",
    "cert_public_key_pem",
    "cert_serial",
    "create_ca",
    "generate_passphrase",
    "issue_server_cert",
    "make_key_and_csr",
    "sign_csr",
    "subject_name_role",
]
