"""TLS contexts for every connection in a deployment, and who the peer is (promise 7).

There is one listener, the process server's (port 9443); agents, master targets and the admin CLI dial in.

- `server_context`: the process server. The deployment CA is the only trust anchor. A client certificate
  is *optional* at the TLS layer so that a machine that is not enrolled yet can reach the enrollment
  request — but any certificate that *is* presented must chain to our CA, or the handshake fails. Every
  request handler then asks `peer_identity` who is calling and refuses everything but enrollment when the
  answer is None.
- `client_context`: mutual TLS for enrolled parties; the server must chain to the CA and match the host
  name dialed.
- `anonymous_client_context`: enrollment only (see its docstring for the one unverified case).

TLS 1.3 is the minimum: no renegotiation, no legacy cipher suites, and the certificate exchange is
encrypted so that passive observers do not learn which machine is connecting.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from standby.plumbing.identity import Identity, subject_name_role


@dataclass(frozen=True)
class PeerIdentity:
    """Who is at the other end of a verified TLS connection: certificate CN, OU (role) and serial."""

    name: str
    role: str
    serial: int


def server_context(identity: Identity) -> ssl.SSLContext:
    """The process server's context: TLS 1.3, our certificate, client certificates optional but CA-checked.

    Threat: a party with a certificate from some other CA (or a public one). Only the deployment CA is
    loaded — never the system store — so such a certificate fails the handshake. Threat: an unenrolled
    client doing more than enrolling. It connects with no certificate, `peer_identity` returns None, and
    the server's request handling refuses it everything but enrollment.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_chain(ctx, identity.cert_pem, identity.key_pem)
    ctx.load_verify_locations(cadata=identity.ca_pem.decode("ascii"))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(identity: Identity) -> ssl.SSLContext:
    """Mutual TLS for an enrolled agent, master target or admin: present our certificate, verify the server.

    Threat: a man in the middle or a rogue server. The server must chain to the deployment CA (the only
    trust anchor), carry the serverAuth usage (an agent's stolen client certificate cannot pose as the
    process server: OpenSSL checks the purpose) and match the host name or IP address dialed.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_chain(ctx, identity.cert_pem, identity.key_pem)
    ctx.load_verify_locations(cadata=identity.ca_pem.decode("ascii"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    return ctx


def anonymous_client_context(ca_pem: bytes | None) -> ssl.SSLContext:
    """A client context without a client certificate, for enrollment.

    `ca_pem` given: the server is verified against it exactly as in `client_context` (host name included).
    `ca_pem` None: NO verification at all. This exists only to fetch the CA certificate on first contact;
    the caller must compare `ca_fingerprint` of what it received with the fingerprint the operator got
    from `standby-ps init` before trusting it, and must send nothing secret (no passphrase) over such a
    connection — an attacker in the middle could be answering. `peer_identity` returns None on it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca_pem is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> PeerIdentity | None:
    """The verified identity of the peer, or None when it presented no (verifiable) certificate.

    Read from the DER certificate parsed with `cryptography`: `getpeercert()`'s dict form is empty under
    CERT_OPTIONAL/CERT_NONE in some cases. Returns None (never a guess) when:
    - the peer sent no certificate (an unenrolled client);
    - our side did not verify it (verify_mode CERT_NONE — threat: on an unverified connection the subject
      is whatever an attacker wrote, so it must never be taken as an identity);
    - the subject lacks a single CN or a single known role.
    With the contexts above, a certificate that is present has been verified against the CA during the
    handshake, so what is returned is what our CA signed.
    """
    if ssl_object.context.verify_mode == ssl.CERT_NONE:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    name, role = subject_name_role(cert)
    if name is None or role is None:
        return None
    return PeerIdentity(name=name, role=role, serial=cert.serial_number)


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Load a certificate and key that live in memory; the ssl module only reads them from a path.

    Threat: the private key lying around in a readable temporary file. On Linux it goes through an
    anonymous memfd that never touches a file system; elsewhere through a file in a fresh 0700 directory
    that is removed at once.
    """
    blob = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd_create("standby-identity", os.MFD_CLOEXEC)
        try:
            _write_all(fd, blob)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="standby-tls-") as tmp:  # mkdtemp: mode 0700
        path = Path(tmp) / "chain.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, blob)
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


__all__ = ["PeerIdentity", "anonymous_client_context", "client_context", "peer_identity", "server_context"]
