"""A vCenter (or standalone ESXi host) session, its certificate pinned by SHA-256 fingerprint.

Pinning works like enrollment: the fingerprint is recorded when the vCenter is added (given by the
operator, or taken on first use and shown), and every later connection first fetches the certificate the
server presents over a throwaway TLS connection, compares its fingerprint, and then hands that exact
certificate to pyvmomi (`serverPemCert`), so the session's own connection must present it too. A
mismatch never trusts the new certificate and never logs in: the password is sent only to the pinned
server."""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode

from .tasks import fault_text

DEFAULT_PORT = 443
TIMEOUT = 30.0


@dataclass(frozen=True)
class VCenter:
    """How to reach one vCenter: what `standby vcenter add` stored (the password is read from its file
    when a session is opened, never kept in this object's repr)."""

    name: str
    host: str
    port: int
    user: str
    password: str
    fingerprint: str  # "sha256:" + 64 hex digits

    def __repr__(self) -> str:
        return f"VCenter({self.name!r}, {self.host}:{self.port}, user={self.user!r}, {self.fingerprint})"


def fingerprint_of(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fetch_certificate(host: str, port: int, timeout: float = TIMEOUT) -> bytes:
    """The DER certificate the server at host:port presents (nothing is sent but the TLS handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(
            raw, server_hostname=host
        ) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise RequestFailed(ErrorCode.UNREACHABLE, f"cannot reach vCenter {host}:{port}: {exc}") from None
    if not der:
        raise RequestFailed(ErrorCode.FAILED, f"vCenter {host}:{port} presented no certificate")
    return der


class Session:
    """A logged-in pyvmomi ServiceInstance; close() logs out. Use as a context manager."""

    def __init__(self, vc: VCenter, si: Any) -> None:
        self.vc = vc
        self.si = si
        self.content = si.RetrieveContent()

    def close(self) -> None:
        from .api import Disconnect

        try:
            Disconnect(self.si)
        except Exception:  # noqa: BLE001 - logging out of a dead session must not hide the real error
            pass

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(vc: VCenter, timeout: float = TIMEOUT) -> Session:
    """Log in to vc after checking its certificate against the pinned fingerprint.

    RequestFailed: UNREACHABLE (no connection), REFUSED (certificate changed: possibly another server in
    between; or the user name or password is wrong)."""
    from .api import SmartConnect, vim

    der = fetch_certificate(vc.host, vc.port, timeout)
    seen = fingerprint_of(der)
    if seen != vc.fingerprint:
        raise RequestFailed(
            ErrorCode.REFUSED,
            f"vCenter {vc.name} ({vc.host}:{vc.port}) presented a certificate whose fingerprint is not the one "
            f"pinned when it was added ({vc.fingerprint}): if its certificate was replaced on purpose, check the "
            f"new fingerprint on the vCenter itself and run `standby vcenter add {vc.name} --replace --fingerprint "
            "...`; otherwise something sits between us and vCenter. Not logged in.",
        )
    pem = ssl.DER_cert_to_PEM_cert(der)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # identity checked by the pinned certificate, not by a CA
    try:
        si = SmartConnect(
            host=vc.host,
            port=vc.port,
            user=vc.user,
            pwd=vc.password,
            sslContext=ctx,
            serverPemCert=pem,
            httpConnectionTimeout=int(timeout),
            disableSslCertValidation=False,
        )
    except vim.fault.InvalidLogin:
        raise RequestFailed(
            ErrorCode.REFUSED,
            f"vCenter {vc.name} ({vc.host}:{vc.port}) refused the login of {vc.user!r}: wrong user name or password "
            f"(update it with `standby vcenter add {vc.name} --replace ...`)",
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise RequestFailed(
            ErrorCode.UNREACHABLE, f"cannot reach vCenter {vc.name} ({vc.host}:{vc.port}): {exc}"
        ) from None
    except vim.fault.VimFault as exc:
        fault, msg = fault_text(exc)
        raise RequestFailed(ErrorCode.FAILED, f"vCenter {vc.name}: login failed: {fault}: {msg}") from None
    return Session(vc, si)

