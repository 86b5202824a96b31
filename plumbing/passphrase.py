"""The deployment passphrase: stored only as a scrypt hash, guessed only slowly (promise 7, DESIGN §10).

Stored form (self-describing, so the cost parameters can be raised later without breaking old hashes):

    scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>
    e.g. scrypt$16384$8$1$3q2+7w...==$kX9...=

Threat: theft of the configuration database. The passphrase is never stored in clear; scrypt is memory-
hard (n=2**14, r=8: 16 MiB per guess) and salted, so a stolen hash costs a GPU farm dearly per guess and
precomputed tables are useless. Threat: online guessing over the network. `RateLimiter` slows each
client exponentially after a few failures (the process server keeps a global key too).

Two implementations of scrypt, on purpose: `hash_passphrase` (once, at `standby-ps init`) uses
`cryptography`; `verify_passphrase` (on the process server, per enrollment attempt) uses OpenSSL through
`hashlib`, which releases the GIL while it hashes, so a verification in a worker thread does not stall the
event loop — `cryptography`'s scrypt holds the GIL for its whole ~35 ms. Both are RFC 7914; the tests
check one against the other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import unicodedata
from dataclasses import dataclass

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
"""Cost of one hash: ~16 MiB and tens of milliseconds — cheap for one enrollment, dear for a billion."""

SALT_BYTES = 16
HASH_BYTES = 32

# Upper bounds on parameters read back from storage. Threat: a tampered or corrupted stored string with
# n=2**30 would make every verification allocate a terabyte; we refuse it instead.
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16


def _normalize(passphrase: str) -> bytes:
    """NFC, surrounding white space removed, UTF-8.

    So the same passphrase typed on another keyboard (composed vs decomposed accents) or read from a file
    with a trailing newline still matches.
    """
    return unicodedata.normalize("NFC", passphrase).strip().encode("utf-8")


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(_normalize(passphrase))


# OpenSSL refuses to allocate more than `maxmem` (default 32 MiB) and hashlib caps maxmem at INT_MAX.
_HASHLIB_MAXMEM_LIMIT = 2**31 - 1


def _scrypt_nogil(passphrase: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    """scrypt through hashlib (GIL released while hashing); `cryptography` where hashlib cannot: no
    hashlib.scrypt in this Python's OpenSSL, or parameters needing more than 2 GiB."""
    need = 128 * r * (n + p + 2) + (1 << 20)  # OpenSSL's own accounting (B + V + XY), plus slack
    if not hasattr(hashlib, "scrypt") or need > _HASHLIB_MAXMEM_LIMIT:
        return _scrypt(passphrase, salt, n, r, p, length)
    return hashlib.scrypt(_normalize(passphrase), salt=salt, n=n, r=r, p=p, maxmem=need, dklen=length)


def hash_passphrase(passphrase: str) -> str:
    """Hash for storage with a fresh random salt: "scrypt$n$r$p$salt_b64$hash_b64"."""
    if not _normalize(passphrase):
        raise ValueError("the passphrase must not be empty")
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)])


def verify_passphrase(passphrase: str, stored: str) -> bool:
    """True if `passphrase` matches `stored`; ValueError if `stored` is not a hash we wrote.

    The comparison is constant-time (threat: timing side channel revealing how many bytes matched).
    A malformed stored hash raises rather than returning False, so a damaged store reads as an error to
    fix, not as "wrong passphrase" forever.
    """
    params = _parse(stored)
    candidate = _scrypt_nogil(passphrase, params.salt, params.n, params.r, params.p, len(params.digest))
    return hmac.compare_digest(candidate, params.digest)


@dataclass(frozen=True, slots=True)
class _Stored:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _parse(stored: str) -> _Stored:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("stored passphrase hash is not in the form scrypt$n$r$p$salt$hash")
    try:
        n, r, p = (int(x, 10) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"stored passphrase hash is malformed: {exc}") from exc
    if not (2 <= n <= _MAX_N and n & (n - 1) == 0):
        raise ValueError(f"stored passphrase hash has an invalid scrypt n={n}")
    if not (1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError(f"stored passphrase hash has invalid scrypt r={r} p={p}")
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ValueError("stored passphrase hash has a salt or hash of an invalid length")
    return _Stored(n, r, p, salt, digest)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class RateLimiter:
    """Pure: no clock inside; the caller passes `now` (monotonic seconds). Per key (e.g. client IP):
    after `free` failures (default 3), each further attempt must wait an exponentially growing delay
    (1 s, 2 s, 4 s … capped at `max_delay`, default 300 s); a success resets the key.

    Precisely: with f recorded failures for a key and F = max(free, 1), an attempt is allowed at once while
    f < F; otherwise it is allowed `min(max_delay, 2 ** (f - F))` seconds after the most recent failure.
    (The very first attempt is always allowed, even with free=0, or nobody could ever enroll.) So the
    first attempts cost nothing (typos happen), and a guesser gets at most one attempt per max_delay in
    the long run: under 300 guesses a day per address against a 125-bit passphrase.

    Threat: guessing from many addresses at once. The caller may also keep one global key (say "*"),
    usually in a second limiter with a larger allowance and a shorter ceiling, and check both
    (processserver/enroll.py does). Threat: filling memory with keys. `prune` drops keys idle for
    `forget_after`.
    """

    def __init__(self, free: int = 3, max_delay: float = 300.0, forget_after: float = 86400.0) -> None:
        if free < 0 or max_delay <= 0 or forget_after < max_delay:
            raise ValueError("need free >= 0, max_delay > 0 and forget_after >= max_delay")
        self.free = free
        self.max_delay = max_delay
        self.forget_after = forget_after
        # key -> (failures recorded, time of the latest failure)
        self._state: dict[str, tuple[int, float]] = {}

    def delay_after(self, failures: int) -> float:
        """The wait imposed after `failures` failures (0 before any failure and within the free allowance)."""
        allowance = max(self.free, 1)
        if failures < allowance:
            return 0.0
        exponent = failures - allowance
        # 2**exponent overflows a float past ~1024; the cap is reached long before.
        return self.max_delay if exponent >= 64 else min(self.max_delay, float(2**exponent))

    def check(self, key: str, now: float) -> float:
        """0.0 if an attempt is allowed now, else the seconds to wait."""
        failures, last = self._state.get(key, (0, now))
        return max(0.0, last + self.delay_after(failures) - now)

    def failure(self, key: str, now: float) -> None:
        """Record a failed attempt (also one made while it should have waited: that extends the penalty)."""
        failures, last = self._state.get(key, (0, now))
        self._state[key] = (failures + 1, max(last, now))

    def success(self, key: str) -> None:
        """A correct passphrase: forget the key's failures."""
        self._state.pop(key, None)

    def prune(self, now: float) -> None:
        """Drop keys whose last failure is older than `forget_after` (bounded memory, long-idle amnesty)."""
        stale = [k for k, (_, last) in self._state.items() if now - last >= self.forget_after]
        for key in stale:
            del self._state[key]

    def __len__(self) -> int:
        return len(self._state)


__all__ = ["RateLimiter", "hash_passphrase", "verify_passphrase"]
