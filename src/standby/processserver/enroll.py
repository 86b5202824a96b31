"""Enrollment: a machine presents the deployment passphrase once, with a CSR made locally, and gets
its certificate. Threats: passphrase guessing (rate-limited per source address, exponential delay),
a stolen registry (only the scrypt hash is stored), a client talking to a fake server (the client
pins the CA fingerprint `standby-ps init` printed before it sends the passphrase).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from standby.plumbing import identity as ident
from standby.plumbing.link import Link
from standby.plumbing.passphrase import RateLimiter, verify_passphrase
from standby.proto.messages import Reply, Request

from .registry import Registry

log = logging.getLogger("standby.ps.enroll")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ENROLL_ROLES = ("agent", "mt")


class Enrollment:
    def __init__(self, registry: Registry, identity: ident.Identity, ca_key: bytes) -> None:
        self.registry = registry
        self.identity = identity
        self.ca_key = ca_key
        self.limiter = RateLimiter()

    async def session(self, link: Link, ip: str) -> None:
        while True:
            msg = await link.recv()
            if not isinstance(msg, Request):
                await link.close("unexpected-message", "enrollment connections only send requests")
                return
            if msg.op == "ca":
                await link.send(Reply(msg.id, True, {"ca_pem": self.identity.ca_pem.decode()}))
            elif msg.op == "enroll":
                code, text, result = self.enroll(ip, msg.args)
                await link.send(Reply(msg.id, code == "", result, code, text))
            else:
                await link.send(Reply(msg.id, False, {}, "forbidden", "not enrolled: only enrollment is possible"))

    def enroll(self, ip: str, args: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        now = time.monotonic()
        wait = self.limiter.check(ip, now)
        if wait > 0:
            log.warning("enrollment from %s refused: rate-limited for %.0f s", ip, wait)
            return "rate-limited", f"too many failed attempts: try again in {wait:.0f} s", {}
        name, role = str(args.get("name", "")), str(args.get("role", ""))
        passphrase, csr = str(args.get("passphrase", "")), str(args.get("csr", ""))
        stored = self.registry.get_meta("passphrase") or ""
        try:
            good = verify_passphrase(passphrase, stored)
        except ValueError:
            log.error("the stored enrollment passphrase hash is unreadable: enrollment is impossible")
            good = False
        if not good:
            self.limiter.failure(ip, now)
            log.warning("enrollment of %r from %s refused: wrong passphrase", name, ip)
            return "bad-passphrase", "wrong enrollment passphrase", {}
        self.limiter.success(ip)
        if not NAME.match(name) or role not in ENROLL_ROLES or name == "admin":
            return "bad-input", f"invalid machine name {name!r} or role {role!r}", {}
        existing = self.registry.machine(name)
        if existing is not None and not args.get("replace"):
            return "bad-input", f"a {existing['role']} named {name!r} is already enrolled (use --replace)", {}
        try:
            cert = ident.sign_csr(self.identity.ca_pem, self.ca_key, csr.encode(), name, role)
        except Exception as exc:  # a malformed CSR is the client's problem, not a crash
            return "bad-input", f"invalid certificate request: {exc}", {}
        self.registry.add_machine(name, role, ident.cert_serial(cert), cert)
        log.info("enrolled %s %r from %s", role, name, ip)
        return "", "", {"cert_pem": cert.decode(), "ca_pem": self.identity.ca_pem.decode()}
