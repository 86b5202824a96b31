"""Admission control of the process server's listener (gate.py) and enrollment's limits (enroll.py):
finding 6 (idle strangers exhausting file descriptors, guessing from many addresses, scrypt on the event
loop) and the handshake half of finding 7 (a refused certificate logged by nobody, reported as
"unreachable").

The pure parts are driven directly with a fake clock. The gate runs real TLS on 127.0.0.1 (port 0) on
both event loops the daemons may use — asyncio's and uvloop — since the two differ exactly where the
gate works (when reading starts, how handshake failures surface). Every exchange has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop

from standby.plumbing import identity as ident
from standby.plumbing import passphrase as pp
from standby.plumbing.errors import EXIT_REFUSED, Refused, Unreachable
from standby.plumbing.link import Link, dial
from standby.plumbing.tls import anonymous_client_context, client_context, server_context
from standby.processserver import enroll as enroll_mod
from standby.processserver.admission import PENDING_CAP_MAX, PENDING_CAP_MIN, Admission, pending_cap_for
from standby.processserver.enroll import GLOBAL_FREE, GLOBAL_MAX_DELAY, Enrollment
from standby.processserver.gate import Gate
from standby.processserver.ratelog import RateLimitedLog
from standby.proto.connection import Connection, Role, choose_version
from standby.proto.messages import Hello, Reply, Request, Welcome

TIMEOUT = 20.0
LOOPS = ["asyncio", "uvloop"]


def run(coro: Awaitable[Any], loop: str = "asyncio") -> Any:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TIMEOUT)

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


# ---------------------------------------------------------------------------------------------- pure parts


def test_pending_cap_is_a_quarter_of_the_open_file_limit_within_bounds() -> None:
    assert pending_cap_for(1024) == 256  # the common default: 768 descriptors stay for everything else
    assert pending_cap_for(40) == PENDING_CAP_MIN
    assert pending_cap_for(1 << 20) == PENDING_CAP_MAX
    assert pending_cap_for(-1) == PENDING_CAP_MAX  # RLIM_INFINITY


def test_admission_evicts_the_oldest_connection_of_the_busiest_address() -> None:
    adm = Admission()
    agent, victims = adm.add("10.0.0.1", 0.0, cap=4)
    assert victims == []
    flood = []
    for i in range(3):
        t, victims = adm.add("10.6.6.6", 1.0 + i, cap=4)
        flood.append(t)
        assert victims == []
    # At the cap: the flooding address loses its oldest, not the agent that came first.
    t, victims = adm.add("10.6.6.6", 5.0, cap=4)
    assert victims == [flood[0]]
    assert len(adm) == 4 and adm.count("10.0.0.1") == 1
    # Equal counts: the address whose oldest connection is older loses it.
    adm2 = Admission()
    a1, _ = adm2.add("a", 0.0, cap=2)
    b1, _ = adm2.add("b", 1.0, cap=2)
    _, victims = adm2.add("c", 2.0, cap=2)
    assert victims == [a1]


def test_admission_remove_is_idempotent_and_cap_must_be_positive() -> None:
    adm = Admission()
    t, _ = adm.add("x", 0.0, cap=2)
    assert adm.remove(t) is True
    assert adm.remove(t) is False
    assert len(adm) == 0 and adm.count("x") == 0
    with pytest.raises(ValueError):
        adm.add("x", 0.0, cap=0)


def test_rate_limited_log_one_line_per_address_per_window_with_a_count() -> None:
    rl = RateLimitedLog(window=60.0)
    assert rl.record("1.2.3.4", "bad cert", 0.0) == "1.2.3.4: bad cert"
    for i in range(5):
        assert rl.record("1.2.3.4", f"bad cert {i}", 1.0 + i, logging.INFO) is None
    assert rl.record("5.6.7.8", "other", 2.0) == "5.6.7.8: other"  # another address has its own line
    assert rl.pending()
    assert rl.flush(59.0) == []  # window not over
    [(level, line)] = rl.flush(60.0)
    assert level == logging.INFO
    assert line == "1.2.3.4: 5 more like this within 60 s, the last: bad cert 4"
    assert not rl.pending()
    # A new window after held-back lines tells them in its first line when no flush came in between.
    rl.record("9.9.9.9", "x", 100.0)
    rl.record("9.9.9.9", "y", 101.0)
    assert rl.record("9.9.9.9", "z", 161.0) == "9.9.9.9: z (before it: 1 more like this within 60 s, the last: y)"


def test_rate_limited_log_memory_is_bounded() -> None:
    rl = RateLimitedLog(window=60.0, max_keys=3)
    for i in range(3):
        assert rl.record(f"10.0.0.{i}", "m", 0.0) is not None
    assert rl.record("10.0.0.99", "m", 1.0) == "other addresses: m"
    assert rl.record("10.0.0.100", "m", 2.0) is None  # lumped with the other addresses
    assert len(rl._keys) == 4


# ---------------------------------------------------------------------------------------------- real TLS


class Pki:
    def __init__(self) -> None:
        self.ca, self.ca_key = ident.create_ca("dep")
        cert, key = ident.issue_server_cert(self.ca, self.ca_key, "ps", ["127.0.0.1"])
        self.server = ident.Identity("ps", "ps", cert, key, self.ca)
        self.agent = self.issue("a1", "agent", self.ca, self.ca_key, self.ca)
        other_ca, other_key = ident.create_ca("other")
        # Another deployment's agent: trusts its own CA, so it refuses our server.
        self.other_deployment = self.issue("e", "agent", other_ca, other_key, other_ca)
        # Another CA's certificate, trusting ours: our server must refuse it.
        self.foreign = self.issue("e", "agent", other_ca, other_key, self.ca)

    @staticmethod
    def issue(name: str, role: str, ca: bytes, ca_key: bytes, trust: bytes) -> ident.Identity:
        key, csr = ident.make_key_and_csr(name, role)
        return ident.Identity(name, role, ident.sign_csr(ca, ca_key, csr, name, role), key, trust)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def hello_server(gate: Gate, admit: bool = True, close_at_once: bool = False) -> Callable[..., Awaitable[None]]:
    """A minimal server session: HELLO -> (admit) -> WELCOME, then echo requests until the client leaves."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(reader, writer, Connection(Role.SERVER), "peer")
        try:
            if close_at_once:
                return
            hello = await link.recv()
            assert isinstance(hello, Hello)
            if admit and link.peer is not None:
                gate.admit(writer)
            version = choose_version(hello)
            assert version is not None
            await link.send(Welcome(version, link.peer.name if link.peer else "?", hello.role))
            while True:
                msg = await link.recv()
                if isinstance(msg, Request):
                    await link.send(Reply(msg.id, True, {"echo": msg.op}))
        except Exception:
            pass
        finally:
            await link.close()

    return handle


@contextlib.asynccontextmanager
async def serving(gate: Gate, **kw: Any) -> AsyncIterator[int]:
    listener = await gate.start_server(hello_server(gate, **kw), "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        listener.close()


async def raw_connect(port: int, local: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0))


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("loop", LOOPS)
def test_a_flood_of_strangers_evicts_strangers_never_admitted_peers(pki: Pki, loop: str) -> None:
    async def go() -> None:
        gate = Gate(server_context(pki.server), pending_cap=8)
        async with serving(gate) as port:
            agent = await dial("127.0.0.1", port, client_context(pki.agent), "agent")
            assert gate.counters["admitted"] == 1 and gate.pending == 0
            idle = [await raw_connect(port) for _ in range(40)]
            await asyncio.sleep(0.3)
            assert gate.pending <= 8
            assert gate.counters["evicted"] >= 32
            # The oldest strangers were closed by the server; the admitted agent still talks.
            assert await closed_by_server(idle[0][0], 5.0)
            assert (await agent.call("ping", timeout=5))["echo"] == "ping"
            # A newcomer still gets in while the cap is full: it evicts a stranger, not the other way round.
            late = await dial("127.0.0.1", port, client_context(pki.agent), "agent")
            assert (await late.call("ping", timeout=5))["echo"] == "ping"
            for _, w in idle:
                w.close()
            await agent.close()
            await late.close()

    run(go(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_flood_leaks_no_file_descriptors(pki: Pki, loop: str) -> None:
    """Strangers evicted in every phase (before their task ran, mid-handshake, after it) leave nothing open.

    Two floods, compared with each other: the loop may open a descriptor of its own once (uvloop keeps a
    spare one on /dev/null for running out of descriptors), which is not a leak."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def go() -> None:
        gate = Gate(server_context(pki.server), pending_cap=4, handshake_timeout=2.0)
        ctx = anonymous_client_context(pki.ca)
        async with serving(gate, admit=False) as port:

            async def stranger(i: int) -> None:
                with contextlib.suppress(Exception):
                    if i % 3 == 0:  # TLS and HELLO done, never admitted
                        link = await asyncio.wait_for(dial("127.0.0.1", port, ctx, "enroll"), 5)
                        await asyncio.sleep(0.2)
                        await link.close()
                        return
                    r, w = await raw_connect(port)
                    if i % 3 == 1:  # half a handshake: some bytes, then silence
                        w.write(b"\x16\x03\x01\x00\x05hello")
                    await asyncio.sleep(0.2)
                    w.close()

            async def flood() -> int:
                await asyncio.gather(*[stranger(i) for i in range(150)])
                for _ in range(100):
                    if gate.pending == 0:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # closes scheduled by the loop
                assert gate.pending == 0
                return open_fds()

            first = await flood()
            second = await flood()
            assert gate.counters["evicted"] > 100
            assert second <= first

    run(go(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_refused_certificates_are_logged_once_per_address_and_refused_at_the_client(
    pki: Pki, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="standby.ps.gate")

    async def go() -> None:
        gate = Gate(server_context(pki.server))
        async with serving(gate) as port:
            for _ in range(4):
                with pytest.raises(Refused, match="refused this machine's certificate") as exc:
                    await dial("127.0.0.1", port, client_context(pki.foreign), "agent")
                assert exc.value.exit_code == EXIT_REFUSED
            with pytest.raises(Refused, match="not this deployment's process server"):
                await dial("127.0.0.1", port, client_context(pki.other_deployment), "agent")
            # Another source address gets its own line.
            ctx = client_context(pki.foreign)
            r, w = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1", local_addr=("127.0.0.2", 0)
            )
            w.write(b"x")
            assert await closed_by_server(r, 5.0)
            w.close()
            for _ in range(100):  # the server notices the other deployment's alert asynchronously
                if gate.counters["handshake_failed"] >= 6:
                    break
                await asyncio.sleep(0.05)
            assert gate.counters["handshake_failed"] == 6
            refused = [r.getMessage() for r in caplog.records if "not issued by this deployment's CA" in r.getMessage()]
            assert len([x for x in refused if x.startswith("127.0.0.1: ")]) == 1, refused
            assert len([x for x in refused if x.startswith("127.0.0.2: ")]) == 1, refused
            assert all(r.levelno == logging.WARNING for r in caplog.records if "not issued" in r.getMessage())
        # Closing the gate tells what was held back: three more refusals from 127.0.0.1; the other
        # deployment's client, which closed without a word (asyncio and uvloop send no alert), has a line
        # of its own kind (INFO: it looks like any client that hangs up).
        msgs = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("127.0.0.1: 3 more like this") for m in msgs), msgs
        assert any(m.startswith("127.0.0.1: TLS handshake failed: the client closed the connection") for m in msgs)

    run(go(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_lost_after_an_accepted_handshake_is_unreachable_not_refused(pki: Pki, loop: str) -> None:
    async def go() -> None:
        gate = Gate(server_context(pki.server))
        async with serving(gate, close_at_once=True) as port:
            with pytest.raises(Unreachable):
                await dial("127.0.0.1", port, client_context(pki.agent), "agent")
        assert gate.counters["handshake_failed"] == 0

    run(go(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_handshake_timeout_and_pending_lifetime(pki: Pki, loop: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="standby.ps.gate")

    async def go() -> None:
        gate = Gate(server_context(pki.server), handshake_timeout=0.3, pending_lifetime=1.0)
        async with serving(gate, admit=False) as port:
            r, w = await raw_connect(port)  # never says a word
            assert await closed_by_server(r, 5.0)
            w.close()
            assert gate.counters["handshake_failed"] == 1
            assert any("no TLS handshake within" in rec.getMessage() for rec in caplog.records)
            # An enrollment-like stranger: handshake and HELLO fine, but never admitted.
            link = await dial("127.0.0.1", port, anonymous_client_context(pki.ca), "enroll")
            assert gate.pending == 1
            assert await closed_by_server(link.reader, 5.0)
            assert gate.counters["expired"] == 1 and gate.pending == 0
            await link.close()

    run(go(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_closing_the_listener_closes_pending_connections(pki: Pki, loop: str) -> None:
    async def go() -> None:
        gate = Gate(server_context(pki.server))
        listener = await gate.start_server(hello_server(gate), "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        r, w = await raw_connect(port)
        await asyncio.sleep(0.2)
        assert gate.pending == 1
        listener.close()
        assert await closed_by_server(r, 5.0)
        w.close()
        with pytest.raises(OSError):
            await raw_connect(port)
        assert gate.pending == 0

    run(go(), loop)


# ---------------------------------------------------------------------------------------------- enrollment


class FakeRegistry:
    def __init__(self, passphrase: str) -> None:
        self.meta = {"passphrase": pp.hash_passphrase(passphrase)}
        self.added: list[str] = []

    def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)

    def machine(self, name: str) -> dict[str, Any] | None:
        return None

    def add_machine(self, name: str, role: str, serial: int, cert_pem: bytes) -> None:
        self.added.append(name)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_guesses_are_limited_globally_one_at_a_time_and_hashed_off_the_event_loop(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {"threads": set(), "running": 0, "max_running": 0}
    lock = threading.Lock()
    real_verify = pp.verify_passphrase

    def verify(passphrase: str, stored: str) -> bool:
        with lock:
            seen["threads"].add(threading.get_ident())
            seen["running"] += 1
            seen["max_running"] = max(seen["max_running"], seen["running"])
        try:
            time.sleep(0.01)  # widen the window in which concurrent verifications would overlap
            return real_verify(passphrase, stored)
        finally:
            with lock:
                seen["running"] -= 1

    monkeypatch.setattr(enroll_mod, "verify_passphrase", verify)
    clock = Clock()
    en = Enrollment(FakeRegistry("right"), pki.server, pki.ca_key, clock=clock)

    async def go() -> None:
        loop_thread = threading.get_ident()
        # 50 addresses, one wrong guess each, all at once: the per-address limiter alone allows them all.
        codes = await asyncio.gather(*[en.enroll(f"10.1.0.{i}", {"passphrase": "wrong"}) for i in range(50)])
        assert [c for c, _, _ in codes].count("bad-passphrase") == GLOBAL_FREE
        assert [c for c, _, _ in codes].count("rate-limited") == 50 - GLOBAL_FREE
        assert en.verifications == GLOBAL_FREE
        assert seen["max_running"] == 1
        assert loop_thread not in seen["threads"]
        # Time passes: one more guess per delay step, never more than one per GLOBAL_MAX_DELAY in the end.
        clock.now += 1.0
        assert (await en.enroll("10.2.0.1", {"passphrase": "wrong"}))[0] == "bad-passphrase"
        assert (await en.enroll("10.2.0.2", {"passphrase": "wrong"}))[0] == "rate-limited"
        # The operator's right passphrase waits too while the global delay runs (the reply says how long)...
        code, text, _ = await en.enroll("10.3.0.1", {"passphrase": "right"})
        assert code == "rate-limited" and "try again in" in text
        # ...and gets in once it is over.
        clock.now += GLOBAL_MAX_DELAY
        key, csr = ident.make_key_and_csr("db01", "agent")
        code, text, result = await en.enroll(
            "10.3.0.1", {"passphrase": "right", "name": "db01", "role": "agent", "csr": csr.decode()}
        )
        assert code == "", text
        assert "cert_pem" in result

    run(go())


def test_an_overlong_passphrase_is_refused_without_hashing(pki: Pki) -> None:
    en = Enrollment(FakeRegistry("right"), pki.server, pki.ca_key, clock=Clock())
    code, _, _ = run(en.enroll("10.0.0.1", {"passphrase": "x" * 100_000}))
    assert code == "bad-passphrase"
    assert en.limiter.check("10.0.0.1", 1000.0) == 0.0  # counted, but within the free allowance


def test_verification_uses_the_scrypt_that_releases_the_gil(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = pp.hash_passphrase("right")  # made with `cryptography`

    def held_gil(*a: Any) -> bytes:
        raise AssertionError("verification must not use cryptography's scrypt: it holds the GIL")

    monkeypatch.setattr(pp, "_scrypt", held_gil)
    assert pp.verify_passphrase("right", stored) is True
    assert pp.verify_passphrase("wrong", stored) is False


def test_an_idle_enrollment_session_is_closed(pki: Pki) -> None:
    en = Enrollment(FakeRegistry("right"), pki.server, pki.ca_key, idle=0.3)

    async def go() -> None:
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            link = Link(reader, writer, Connection(Role.SERVER), "peer")
            # The HELLO exchange as the server does it, then the enrollment session.
            hello = await link.recv()
            version = choose_version(hello)  # type: ignore[arg-type]
            await link.send(Welcome(version or 1, "?", "enroll"))
            await en.session(link, "127.0.0.1")
            done.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = Link(reader, writer, Connection(Role.CLIENT), "ps")
        await client.send(Hello(role="enroll"))
        assert isinstance(await client.recv(), Welcome)
        assert (await client.call("ca", timeout=5))["ca_pem"].startswith("-----BEGIN")
        started = time.monotonic()
        with pytest.raises(Exception) as closed:
            await asyncio.wait_for(client.recv(), 5)
        assert getattr(closed.value, "code", None) == "timeout"
        assert time.monotonic() - started < 5
        await asyncio.wait_for(done.wait(), 5)
        await client.close()
        server.close()

    run(go())
