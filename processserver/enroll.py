"""Enrollment: a machine presents the deployment passphrase once, with a CSR made locally, and gets
its certificate.

Threats and counters:
- *Passphrase guessing from one address*: `limiter`, per source address (3 free attempts, then an
  exponential delay up to 300 s).
- *Guessing from many addresses* (finding 6: 900 guesses from 300 loopback addresses in 43 s): `global_limiter`,
  one key for everybody (GLOBAL_FREE attempts, then an exponential delay up to GLOBAL_MAX_DELAY: at most
  one guess per GLOBAL_MAX_DELAY seconds in the long run, whatever the number of addresses). While it
  holds, an operator's own enrollment waits too (the reply says how long): a guessing attack may slow
  enrollment, never replication.
- *Burning our CPU and stalling every session*: scrypt (16 MiB, tens of milliseconds) runs in a worker
  thread, one verification at a time (`_verifying`), and only for attempts both limiters allow; every
  other attempt is refused without hashing. A refused attempt does not count as a failure (it would let
  a guesser extend an honest operator's wait at no cost); refusals are logged one line a minute, counted.
- *Idle enrollment sessions holding sockets* (finding 6: 1,003 idle sessions exhausted the open files):
  a session ends after ENROLL_IDLE seconds without a request; the gate (gate.py) caps pending connections
  and their lifetime.
- *A stolen registry*: only the scrypt hash is stored. *A client talking to a fake server*: the client
  pins the CA fingerprint `standby-ps init` printed before it sends the passphrase.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from standby.plumbing import identity as ident
from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import Link
from standby.plumbing.passphrase import RateLimiter, verify_passphrase
from standby.plumbing.serve import serve_request
from standby.proto.enums import ErrorCode, GoodbyeCode
from standby.proto.messages import Request

from .ratelog import RateLimitedLog
from .registry import Registry

log = logging.getLogger("standby.ps.enroll")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ENROLL_ROLES = ("agent", "mt")

ENROLL_IDLE = 30.0
"""Seconds an enrollment session may wait for its next request; a real client sends its one request at once."""

GLOBAL_KEY = "*"
GLOBAL_FREE = 10
"""Failed attempts, from all addresses together, before the global delay starts: a rollout's typos fit."""
GLOBAL_MAX_DELAY = 10.0
"""Ceiling of the global delay: at most one guess per 10 s in the long run (8,640 a day against a
125-bit passphrase), and an operator never waits longer than this because of somebody else's guessing."""
GLOBAL_FORGET = 3600.0
"""An hour without a failure anywhere and the global count starts again from zero."""

MAX_PASSPHRASE = 1024
"""Characters; longer is wrong anyway (ours are 29) and is refused without hashing it."""


class Enrollment:
    def __init__(
        self,
        registry: Registry,
        identity: ident.Identity,
        ca_key: bytes,
        *,
        idle: float = ENROLL_IDLE,
        clock: Any = time.monotonic,
    ) -> None:
        self.registry = registry
        self.identity = identity
        self.ca_key = ca_key
        self.idle = idle
        self.clock = clock
        self.limiter = RateLimiter()
        self.global_limiter = RateLimiter(free=GLOBAL_FREE, max_delay=GLOBAL_MAX_DELAY, forget_after=GLOBAL_FORGET)
        self._verifying = asyncio.Lock()
        self._refusals = RateLimitedLog()
        self.verifications = 0  # scrypt runs so far (tests, metrics)

    async def session(self, link: Link, ip: str) -> None:
        async def ca() -> dict[str, Any]:
            return {"ca_pem": self.identity.ca_pem.decode()}

        async def enroll(**args: Any) -> dict[str, Any]:
            code, text, result = await self.enroll(ip, args)
            if code:
                raise RequestFailed(code, text)
            return result

        while True:
            try:
                # asyncio.timeout, not wait_for: see plumbing.aio (a cancellation must always end the loop).
                async with asyncio.timeout(self.idle):
                    msg = await link.recv()
            except TimeoutError:
                log.debug("%s: enrollment session idle for %.0f s: closing", link.name, self.idle)
                await link.close(GoodbyeCode.TIMEOUT, f"no request within {self.idle:.0f} s")
                return
            if not isinstance(msg, Request):
                await link.close(GoodbyeCode.UNEXPECTED_MESSAGE, "enrollment connections only send requests")
                return
            # Validated at the boundary (proto.requests): a malformed request costs no scrypt; any op other
            # than ca/enroll is refused ("forbidden": not enrolled).
            await serve_request(link, msg, "enroll", "ps", {"ca": ca, "enroll": enroll}.get(msg.op))

    def _wait(self, ip: str, now: float) -> float:
        return max(self.limiter.check(ip, now), self.global_limiter.check(GLOBAL_KEY, now))

    def _refused(self, ip: str, wait: float) -> tuple[str, str, dict[str, Any]]:
        # One line a minute for all refusals together: a guesser with many addresses must not flood the log.
        line = self._refusals.record(
            "enrollment", f"attempt from {ip} refused: rate-limited for {wait:.0f} s", self.clock()
        )
        if line:
            log.warning("%s", line)
        return "rate-limited", f"too many failed attempts: try again in {max(wait, 1):.0f} s", {}

    async def enroll(self, ip: str, args: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        wait = self._wait(ip, self.clock())
        if wait > 0:
            return self._refused(ip, wait)  # cheap: no hashing, no queueing
        name, role = str(args.get("name", "")), str(args.get("role", ""))
        passphrase, csr = str(args.get("passphrase", "")), str(args.get("csr", ""))
        async with self._verifying:
            # Ask again: attempts that were allowed together queued here, and the first ones may have failed.
            wait = self._wait(ip, self.clock())
            if wait > 0:
                return self._refused(ip, wait)
            good = await self._verify(passphrase)
            now = self.clock()
            if not good:
                self.limiter.failure(ip, now)
                self.global_limiter.failure(GLOBAL_KEY, now)
                self.limiter.prune(now)
                self.global_limiter.prune(now)
        if not good:
            log.warning("enrollment of %r from %s refused: wrong passphrase", name[:64], ip)
            return "bad-passphrase", "wrong enrollment passphrase", {}
        self.limiter.success(ip)  # the global count stays: one right answer does not excuse other addresses
        if not NAME.fullmatch(name) or role not in ENROLL_ROLES or name == "admin":
            return ErrorCode.BAD_INPUT, f"invalid machine name {name[:80]!r} or role {role[:20]!r}", {}
        existing = self.registry.machine(name)
        if existing is not None and args.get("replace") is not True:
            return ErrorCode.BAD_INPUT, f"a {existing['role']} named {name!r} is already enrolled (use --replace)", {}
        try:
            cert = ident.sign_csr(self.identity.ca_pem, self.ca_key, csr.encode(), name, role)
        except Exception as exc:  # a malformed CSR is the client's problem, not a crash
            return ErrorCode.BAD_INPUT, f"invalid certificate request: {exc}", {}
        self.registry.add_machine(name, role, ident.cert_serial(cert), cert)
        log.info("enrolled %s %r from %s", role, name, ip)
        return "", "", {"cert_pem": cert.decode(), "ca_pem": self.identity.ca_pem.decode()}

    async def _verify(self, passphrase: str) -> bool:
        """scrypt in a worker thread: it takes tens of milliseconds and must not stall every other session.
        (`verify_passphrase` releases the GIL while hashing, so the event loop really runs meanwhile.)"""
        if len(passphrase) > MAX_PASSPHRASE:
            return False
        stored = self.registry.get_meta("passphrase") or ""
        self.verifications += 1
        try:
            return await asyncio.to_thread(verify_passphrase, passphrase, stored)
        except ValueError:
            log.error("the stored enrollment passphrase hash is unreadable: enrollment is impossible")
            return False
