"""Issue 9, finding 5: one enrolled agent must not be able to stop everything. Values from a peer are
validated at the boundary and refused to that peer, never stored; other machines' disks go on.

On 47f798a: a COMMIT whose meta said `"time": 10**400` was stored, its task died silently and the next
`standby-ps run` crashed for every disk; a disk uid `not-a-uuid` killed the master target's polling task
(other disks then never started); invalid `disk_open` arguments reached SQLite; a disk named with `../`
segments and size -5 was registered and shown.

The peer here is a real client with a real enrolled agent identity over real TLS (plumbing.link), sending
what a compromised or buggy agent could.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

from standby.plumbing.errors import RequestFailed
from standby.plumbing.identity import Identity
from standby.plumbing.link import LinkClosed, dial
from standby.plumbing.tls import client_context
from standby.proto.messages import Marker
from tests.conftest import needs_loop

from .conftest import MiB
from .test_delta import disk

pytestmark = [needs_loop]


async def as_agent(dep, name: str):
    ident = Identity.load(dep.root / f"agent-{name}" / "identity", command="test")
    return await dial("127.0.0.1", dep.port, client_context(ident), "agent")


def test_invalid_disk_open_arguments_are_refused_and_never_registered(deployment):
    deployment.enroll("agent", "evil")

    async def main() -> list[tuple[str, str]]:
        link = await as_agent(deployment, "evil")
        out = []
        good = {"name": "sda", "path": "/dev/sda", "size": 8 * MiB, "uid": str(uuid.uuid4())}
        for bad in ({"name": "../../etc"}, {"size": -5}, {"size": 1000}, {"uid": "not-a-uuid"},
                    {"size": 10**400}, {"path": "relative/path"}, {"name": ["list"]}, {"size": True}):
            try:
                await link.call("disk_open", timeout=10, **{**good, **bad})
                out.append((str(bad), "accepted"))
            except RequestFailed as exc:
                out.append((str(bad), exc.code))
        try:
            await link.call("disk_open", timeout=10, **good, extra="x")
            out.append(("extra key", "accepted"))
        except RequestFailed as exc:
            out.append(("extra key", exc.code))
        await link.close()
        return out

    results = asyncio.run(main())
    assert all(code == "bad-input" for _, code in results), results
    assert [d for d in deployment.status()["disks"] if d["machine"] == "evil"] == []
    # The process server is still serving, and logged each refusal.
    assert "refused request disk_open (bad-input)" in deployment.log_text("ps")


def test_a_marker_with_a_poisoned_time_is_refused_not_stored(deployment, protected):
    """A MARKER for the agent's own disk with `time` 10**400: the connection is closed with `bad-marker`,
    nothing is cached, the disk keeps replicating when the real agent comes back, and a restart of the
    process server works (on 47f798a it crashed with OverflowError for every disk)."""
    dev, replica = protected("raw", 16 * MiB, fill=False)
    deployment.wait_synced("src", timeout=60)
    d = disk(deployment.status())
    deployment.kill("agent-src", 15)

    async def main() -> str:
        link = await as_agent(deployment, "src")
        opened = await link.call("disk_open", timeout=10, name="disk0", path=dev, size=16 * MiB,
                                 uid=_uid(deployment, "src", "disk0"))
        seq = opened["next_sequence"]
        meta = {"generation": opened["generation"], "kind": "point", "consistency": "crash-consistent",
                "time": 10**400}
        await link.send(Marker(opened["disk"], seq, meta, bytes(28)))
        try:
            while True:
                await asyncio.wait_for(link.recv(), 10)
        except LinkClosed as exc:
            return exc.code
        finally:
            await link.close()

    assert asyncio.run(main()) == "bad-marker"
    after = disk(deployment.status())
    assert after["received_seq"] == d["received_seq"], "the poisoned marker must not be stored"
    assert "agent sent an invalid record" in (after["error"] or ""), after
    deployment.kill("ps", 15)
    deployment.start("ps")  # starts: nothing poisoned was stored
    deployment.start("agent", "src")
    import time

    st = deployment.wait_caught_up("src", time.time(), timeout=60)
    assert disk(st)["error"] is None, disk(st)


def _uid(dep, agent: str, name: str) -> str:
    import json

    return json.loads((dep.root / f"agent-{agent}" / "disks" / f"{name}.json").read_text())["uid"]


def test_a_poisoned_assignment_fails_that_disk_alone(deployment, protected, make_loop, tmp_path):
    """A registry row with a uid that is not a UUID (as an older release could store): the master target
    refuses that assignment with the reason and keeps serving the others; its polling goes on."""
    dev, replica = protected("raw", 16 * MiB, fill=False)
    deployment.wait_synced("src", timeout=60)
    db = sqlite3.connect(deployment.ps_dir / "registry.sqlite")
    try:
        (wrapped,) = db.execute("SELECT wrapped_key FROM disks").fetchone()
        db.execute(
            "INSERT INTO disks (machine, name, uid, path, size, replication, mt, replica_path, replica_format, "
            "wrapped_key) VALUES ('old', 'poisoned', 'not-a-uuid', '/dev/null', 1048576, 'Initial', 'mt1', ?, 'raw', "
            "?)",
            (str(tmp_path / "p.img"), wrapped),
        )
        db.commit()
    finally:
        db.close()
    deployment.kill("mt-mt1", 15)
    deployment.kill("ps", 15)
    deployment.start("ps")
    deployment.start("mt", "mt1")
    st = deployment.wait_for(
        lambda s: any(x["disk"] == "poisoned" and x["error"] and "uid" in x["error"] for x in s["disks"]),
        60,
        "the poisoned assignment to be refused with its reason",
    )
    assert "Traceback" not in deployment.log_text("mt-mt1")
    # The real disk is unaffected: it still replicates.
    import time

    with open(dev, "r+b", buffering=0) as f:
        f.write(b"after the poison" * 256)
    st = deployment.wait_caught_up("src", time.time(), timeout=60)
    assert next(x for x in st["disks"] if x["disk"] == "disk0")["error"] is None
    assert Path(replica).read_bytes()[:16] == b"after the poison"
