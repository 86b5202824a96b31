"""Passphrase hashing (checked against the stdlib's scrypt) and the pure enrollment rate limiter."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standby.plumbing.passphrase import RateLimiter, hash_passphrase, verify_passphrase

PASSPHRASE = "7k2qd-mx9rt-a3bcv-pq8zn-h4wjy"


# ------------------------------------------------------------------------------------------ hashing


def test_round_trip_and_wrong_passphrase() -> None:
    stored = hash_passphrase(PASSPHRASE)
    assert verify_passphrase(PASSPHRASE, stored) is True
    assert verify_passphrase(PASSPHRASE[:-1] + "x", stored) is False
    assert verify_passphrase("", stored) is False
    assert PASSPHRASE not in stored  # never stored in clear


def test_format_and_stdlib_oracle() -> None:
    stored = hash_passphrase(PASSPHRASE)
    kind, n, r, p, salt_b64, hash_b64 = stored.split("$")
    assert (kind, n, r, p) == ("scrypt", "16384", "8", "1")
    salt, digest = base64.b64decode(salt_b64, validate=True), base64.b64decode(hash_b64, validate=True)
    assert len(salt) == 16 and len(digest) == 32
    # Independent oracle: OpenSSL's scrypt through hashlib must give the same bytes.
    assert digest == hashlib.scrypt(PASSPHRASE.encode(), salt=salt, n=16384, r=8, p=1, dklen=32)


def test_salt_is_random() -> None:
    assert hash_passphrase(PASSPHRASE) != hash_passphrase(PASSPHRASE)


def test_surrounding_whitespace_and_unicode_normal_form_are_forgiven() -> None:
    stored = hash_passphrase("caf\u00e9 au lait")  # composed é
    assert verify_passphrase("cafe\u0301 au lait\n", stored)  # decomposed é, newline from a file
    assert not verify_passphrase("cafe au lait", stored)


def test_stored_hash_with_other_parameters_still_verifies() -> None:
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"pw", salt=salt, n=1024, r=4, p=2, dklen=32)
    stored = f"scrypt$1024$4$2${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert verify_passphrase("pw", stored)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
        "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==",
        "scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "=",
        "scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "=",  # n not a power of two
        "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 43 + "=",  # 2**30: a memory bomb
        "scrypt$16384$8$1$!!!$" + "A" * 43 + "=",
        "scrypt$16384$8$1$AA==$" + "A" * 43 + "=",  # salt too short
    ],
)
def test_malformed_stored_hash_is_an_error_not_a_mismatch(stored: str) -> None:
    with pytest.raises(ValueError):
        verify_passphrase(PASSPHRASE, stored)


def test_empty_passphrase_is_refused() -> None:
    with pytest.raises(ValueError):
        hash_passphrase("  \n")


# ------------------------------------------------------------------------------------- rate limiter


def test_free_attempts_then_exponential_delays_capped() -> None:
    rl = RateLimiter(free=3, max_delay=300.0)
    t = 100.0
    for _ in range(3):
        assert rl.check("10.0.0.1", t) == 0.0
        rl.failure("10.0.0.1", t)
    assert rl.check("10.0.0.1", t) == 1.0
    assert rl.check("10.0.0.1", t + 0.25) == 0.75
    assert rl.check("10.0.0.1", t + 1) == 0.0
    expected = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    waits = []
    for _ in expected:
        wait = rl.check("10.0.0.1", t)
        waits.append(wait)
        t += wait
        rl.failure("10.0.0.1", t)
    assert waits == expected
    assert rl.check("10.0.0.2", t) == 0.0  # keys are independent


def test_success_resets_the_key() -> None:
    rl = RateLimiter()
    for _ in range(5):
        rl.failure("k", 0.0)
    assert rl.check("k", 0.0) > 0
    rl.success("k")
    assert rl.check("k", 0.0) == 0.0
    assert len(rl) == 0


def test_prune_forgets_idle_keys_only() -> None:
    rl = RateLimiter(forget_after=1000.0)
    rl.failure("old", 0.0)
    rl.failure("new", 900.0)
    rl.prune(1000.0)
    assert len(rl) == 1
    assert rl.check("new", 900.0) == 0.0  # still within its free allowance, but remembered


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        RateLimiter(free=-1)
    with pytest.raises(ValueError):
        RateLimiter(max_delay=0)


def delays_fitting(elapsed: float, max_delay: float) -> int:
    """How many of the delays 1, 2, 4 … (capped) fit one after another into `elapsed` seconds."""
    count, total, delay = 0, 0.0, 1.0
    while total + min(delay, max_delay) <= elapsed:
        total += min(delay, max_delay)
        count += 1
        delay *= 2
    return count


# Times are multiples of 1/4 s: exactly representable, so float rounding cannot blur the bound.
steps = st.lists(st.integers(min_value=0, max_value=2000).map(lambda q: q / 4), min_size=1, max_size=200)


@settings(max_examples=300, deadline=None)
@given(gaps=steps, free=st.integers(0, 5), max_delay=st.sampled_from([1.0, 8.0, 300.0]))
def test_allowed_failures_never_exceed_free_plus_elapsed_delays(gaps: list[float], free: int, max_delay: float) -> None:
    """A guesser who tries whenever allowed, and always fails, gets at most free + (delays elapsed)."""
    rl = RateLimiter(free=free, max_delay=max_delay)
    now, allowed = 0.0, []
    for gap in gaps:
        now += gap
        if rl.check("ip", now) == 0.0:
            allowed.append(now)
            rl.failure("ip", now)
    if allowed:
        # The very first attempt is always allowed, even with free=0 (otherwise nobody could ever try).
        assert len(allowed) <= max(free, 1) + delays_fitting(allowed[-1] - allowed[0], max_delay)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.integers(0, 2000).map(lambda q: q / 4), st.sampled_from(["fail", "ok", "check"])),
        max_size=100,
    ),
    free=st.integers(0, 5),
)
def test_check_is_bounded_monotone_and_success_resets(events: list[tuple[float, str]], free: int) -> None:
    rl = RateLimiter(free=free, max_delay=300.0)
    now = 0.0
    for gap, what in events:
        now += gap
        wait = rl.check("ip", now)
        assert 0.0 <= wait <= 300.0
        assert rl.check("ip", now + gap) <= wait  # waiting never makes it worse
        assert rl.check("ip", now + wait) == 0.0  # and waiting as told always suffices
        if what == "fail":
            rl.failure("ip", now)
        elif what == "ok":
            rl.success("ip")
            # After a success the key is fresh: `free` immediate attempts again.
            for _ in range(free):
                assert rl.check("ip", now) == 0.0
                rl.failure("ip", now)
            rl.success("ip")
            assert rl.check("ip", now) == 0.0
        assert rl.check("other", now) == 0.0  # one key never affects another


def test_free_zero_still_allows_the_first_attempt() -> None:
    rl = RateLimiter(free=0)
    assert rl.check("k", 0.0) == 0.0
    rl.failure("k", 0.0)
    assert rl.check("k", 0.0) == 1.0
