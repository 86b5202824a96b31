"""Promise 7 and bad input on the wire: who may connect and act, and what a malformed frame does.

Everything here talks to a real process server process over real TLS on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import uuid

import pytest

from standby.plumbing import identity as ident
from standby.plumbing.errors import Refused, RequestFailed, Unreachable
from standby.plumbing.link import LinkClosed, dial
from standby.plumbing.tls import anonymous_client_context, client_context
from standby.proto.frames import MAGIC, encode_frame
from standby.proto.messages import Batch, BatchKind, Extent, ExtentKind, FrameType

MiB = 1024 * 1024


def load(dep, kind, name):
    return ident.Identity.load(dep.root / f"{kind}-{name}" / "identity")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_unenrolled_client_is_refused(deployment):
    ca = (deployment.ps_dir / "ca" / "ca.pem").read_bytes()

    async def go():
        with pytest.raises(Refused, match="no client certificate|enroll"):
            await dial("127.0.0.1", deployment.port, anonymous_client_context(ca), "agent")

    run(go())
    assert "no client certificate" in deployment.log_text("ps")


def test_certificate_from_another_ca_is_refused(deployment, tmp_path):
    ca_cert, ca_key = ident.create_ca("intruder")
    key, csr = ident.make_key_and_csr("evil", "agent")
    cert = ident.sign_csr(ca_cert, ca_key, csr, "evil", "agent")
    real_ca = (deployment.ps_dir / "ca" / "ca.pem").read_bytes()
    # Trusts the real server, presents a certificate of another CA: the handshake must fail.
    forged = ident.Identity("evil", "agent", cert, key, real_ca)

    async def go():
        # Under TLS 1.3 the client learns of the refusal at its first read: either way it never gets in.
        with pytest.raises((Refused, Unreachable)):
            await dial("127.0.0.1", deployment.port, client_context(forged), "agent")

    run(go())
    assert "agent evil" not in deployment.log_text("ps")


def test_wrong_passphrase_is_refused_and_rate_limited(deployment, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("not-the-passphrase\n")
    codes = []
    for _ in range(5):
        res = deployment.run(
            "agent",
            "enroll",
            "--server",
            deployment.server,
            "--fingerprint",
            deployment.fingerprint,
            "--passphrase-file",
            str(bad),
            "--name",
            "x",
            "--dir",
            str(tmp_path / "x"),
            check=False,
        )
        codes.append((res.returncode, res.stderr))
    assert all(rc == 4 for rc, _ in codes), codes
    assert "wrong enrollment passphrase" in codes[0][1]
    assert any("try again in" in err for _, err in codes[3:]), codes


def test_wrong_fingerprint_sends_nothing(deployment, tmp_path):
    res = deployment.run(
        "agent",
        "enroll",
        "--server",
        deployment.server,
        "--fingerprint",
        "sha256:" + "0" * 64,
        "--passphrase-file",
        str(deployment.ps_dir / "enroll-passphrase"),
        "--name",
        "x",
        "--dir",
        str(tmp_path / "x"),
        check=False,
    )
    assert res.returncode == 4 and "nothing was sent" in res.stderr
    assert deployment.fingerprint[len("sha256:"):] not in res.stderr  # never the one to paste back


def test_malformed_fingerprint_is_called_malformed(deployment, tmp_path):
    res = deployment.run(
        "agent", "enroll", "--server", deployment.server, "--fingerprint", "sha256:0123abc",
        "--passphrase-file", str(deployment.ps_dir / "enroll-passphrase"), "--name", "x", "--dir", str(tmp_path / "x"),
        check=False,
    )
    assert res.returncode == 2 and "'sha256:0123abc' is malformed" in res.stderr, res.stderr
    assert deployment.fingerprint[len("sha256:"):] not in res.stderr


def test_agent_cannot_touch_another_machines_disk(deployment, tmp_path):
    deployment.enroll("agent", "alice")
    deployment.enroll("agent", "bob")
    alice, bob = load(deployment, "agent", "alice"), load(deployment, "agent", "bob")

    async def go():
        la = await dial("127.0.0.1", deployment.port, client_context(alice), "agent")
        info = await la.call("disk_open", name="sda", path="/dev/sda", size=4 * MiB, uid=str(uuid.uuid4()))
        await la.close()
        lb = await dial("127.0.0.1", deployment.port, client_context(bob), "agent")
        with pytest.raises(RequestFailed) as exc:
            await lb.call("disk_key", disk=info["disk"], wrapped_key="AAAA")
        assert exc.value.code == "forbidden"
        # Data for alice's disk on bob's connection: the connection is closed.
        batch = Batch(info["disk"], 1, 1, BatchKind.INITIAL, 4 * MiB, (Extent(ExtentKind.ZERO, 0, 4 * MiB),), bytes(28))
        await lb.send(batch)
        with pytest.raises(LinkClosed) as closed:
            await lb.recv()
        assert closed.value.code == "forbidden"
        await lb.close()

    run(go())
    assert "not its own" in deployment.log_text("ps")


def test_master_target_cannot_pull_unassigned_disk(deployment):
    deployment.enroll("agent", "alice")
    deployment.enroll("mt", "mt1")
    alice, mt = load(deployment, "agent", "alice"), load(deployment, "mt", "mt1")

    async def go():
        la = await dial("127.0.0.1", deployment.port, client_context(alice), "agent")
        info = await la.call("disk_open", name="sda", path="/dev/sda", size=4 * MiB, uid=str(uuid.uuid4()))
        await la.close()
        lm = await dial("127.0.0.1", deployment.port, client_context(mt), "mt")
        with pytest.raises(RequestFailed) as exc:
            await lm.call("pull", disk=info["disk"], applied_seq=0)
        assert exc.value.code == "forbidden"
        await lm.close()

    run(go())


def test_admin_commands_need_the_admin_identity(deployment):
    deployment.enroll("agent", "alice")
    alice = load(deployment, "agent", "alice")

    async def go():
        # An agent certificate claiming the admin role is refused at the handshake.
        with pytest.raises(Refused):
            await dial("127.0.0.1", deployment.port, client_context(alice), "admin")
        # And on its own role it cannot run admin requests.
        la = await dial("127.0.0.1", deployment.port, client_context(alice), "agent")
        with pytest.raises(RequestFailed):
            await la.call("status")
        await la.close()

    run(go())


BAD_FRAMES = {
    "garbage": b"hello, this is not a frame at all" * 4,
    "wrong-version": MAGIC + bytes([99]) + bytes(31),
    "oversized": None,  # built below: a valid header announcing 1 GiB
    "truncated": None,  # a valid frame cut in half, then EOF
    "bad-type": encode_frame(200, 0, 0, b"{}"),
}


def _oversized() -> bytes:
    import xxhash

    head = struct.pack(">4sBBHIQIQ", MAGIC, 1, FrameType.REQUEST, 0, 0, 0, 1 << 30, 0)
    return head + struct.pack(">I", xxhash.xxh32_intdigest(head))


@pytest.mark.parametrize("kind", list(BAD_FRAMES))
def test_malformed_frames_close_only_that_connection(deployment, kind):
    deployment.enroll("agent", "alice")
    alice = load(deployment, "agent", "alice")
    admin = deployment.admin()

    async def go():
        good = await dial("127.0.0.1", deployment.port, client_context(alice), "agent")
        bad = await dial("127.0.0.1", deployment.port, client_context(alice), "agent")
        if kind == "oversized":
            data = _oversized()
        elif kind == "truncated":
            data = encode_frame(FrameType.REQUEST, 0, 0, b'{"id":1,"op":"x","args":{}}')[:30]
        elif kind == "wrong-version":
            import xxhash

            head = struct.pack(">4sBBHIQIQ", MAGIC, 99, FrameType.REQUEST, 0, 0, 0, 0, xxhash.xxh64_intdigest(b""))
            data = head + struct.pack(">I", xxhash.xxh32_intdigest(head))
        else:
            data = BAD_FRAMES[kind]
        bad.writer.write(data)
        await bad.writer.drain()
        if kind == "truncated":
            bad.writer.write_eof() if bad.writer.can_write_eof() else bad.writer.close()
        try:
            await asyncio.wait_for(bad.reader.read(), 10)  # the server closes it
        except (ConnectionError, ssl.SSLError):
            pass
        await bad.close()
        # Everybody else is still served.
        info = await good.call("disk_open", name="sda", path="/dev/sda", size=MiB, uid=str(uuid.uuid4()))
        assert info["disk"] > 0
        await good.close()
        assert (await admin.acall("status"))["disks"]

    run(go())
    log = deployment.log_text("ps")
    expected = {
        "garbage": "bad-magic",
        "wrong-version": "bad-version",
        "oversized": "oversized",
        "truncated": "truncated",
        "bad-type": "bad-type",
    }[kind]
    assert f"protocol error ({expected})" in log, log[-2000:]
