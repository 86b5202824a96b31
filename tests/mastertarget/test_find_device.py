"""`find_device` (standby.mastertarget.guestdisk): a replica disk attached to the master target's VM in vSphere
is found in the guest by its by-id name. Nothing here is vSphere: the by-id directory is a directory of the
test's own, its links point at loop devices (the block devices a hot-added virtual disk would be), and the
link "appears" when the test creates it — as udev does once the guest has rescanned its SCSI bus.

Through the real daemons too: a process server (in this process, so that the test can call its master
target session's `find_device` as protect will) and a real `standby-mt` process, over TLS.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from standby.mastertarget.guestdisk import find_device
from standby.plumbing.config import load_toml, save_toml
from standby.plumbing.errors import RequestFailed
from standby.processserver.deployment import PSConfig
from standby.processserver.server import ProcessServer
from standby.proto.enums import ErrorCode
from standby.proto.requests import BadRequest, parse_request
from tests.deploy import LocalDeployment

MiB = 1 << 20
NAME = "wwn-0x6000c29a1b2c3d4e5f60718293a4b5c6"


def by_id(tmp_path: Path) -> Path:
    d = tmp_path / "by-id"
    d.mkdir(exist_ok=True)
    return d


def find(d: Path, name: str, size: int, wait: float, used: set[str] | None = None) -> str:
    return asyncio.run(find_device(d, name, size, wait, used or set()))


def refused(d: Path, name: str, size: int, wait: float, used: set[str] | None = None) -> RequestFailed:
    with pytest.raises(RequestFailed) as exc:
        find(d, name, size, wait, used)
    return exc.value


def test_found_at_once_answers_the_by_id_link_not_the_device(tmp_path: Path, make_loop: Callable[..., str]) -> None:
    dev = make_loop(MiB)
    d = by_id(tmp_path)
    (d / NAME).symlink_to(dev)
    assert find(d, NAME, MiB, 0) == str(d / NAME)  # stable across reboots, unlike /dev/loopN or /dev/sdX


def test_a_disk_that_shows_late_is_waited_for(tmp_path: Path, make_loop: Callable[..., str]) -> None:
    dev = make_loop(MiB)
    d = by_id(tmp_path)
    timer = threading.Timer(0.5, (d / NAME).symlink_to, (dev,))
    timer.start()
    try:
        assert find(d, NAME, MiB, 30) == str(d / NAME)
    finally:
        timer.cancel()


def test_waiting_does_not_block_the_event_loop(tmp_path: Path, make_loop: Callable[..., str]) -> None:
    """The link is made by a coroutine of the same event loop: a wait that blocked the loop would never see
    it and would end `missing`."""
    dev = make_loop(MiB)
    d = by_id(tmp_path)

    async def main() -> str:
        async def attach() -> None:
            await asyncio.sleep(0.5)
            (d / NAME).symlink_to(dev)

        task = asyncio.create_task(attach())
        try:
            return await find_device(d, NAME, MiB, 30, set())
        finally:
            await task

    assert asyncio.run(main()) == str(d / NAME)


def test_a_disk_that_never_shows_is_missing_after_the_wait_with_what_to_do(tmp_path: Path) -> None:
    d = by_id(tmp_path)
    (d / "wwn-0x6000c29000000000000000000000dead").symlink_to(tmp_path / "gone")  # dangling: not there either
    exc = refused(d, NAME, MiB, 0.5)
    assert exc.code == ErrorCode.MISSING
    text = str(exc)
    assert str(d) in text and NAME in text
    assert "attached" in text and "vSphere" in text
    assert "echo - - - > /sys/class/scsi_host/host*/scan" in text and "disk.EnableUUID" in text
    assert refused(tmp_path / "no-such-dir", NAME, MiB, 0).code == ErrorCode.MISSING
    assert refused(d, "wwn-0x6000c29000000000000000000000dead", MiB, 0).code == ErrorCode.MISSING


def test_not_a_block_device(tmp_path: Path) -> None:
    d = by_id(tmp_path)
    f = tmp_path / "file.img"
    f.write_bytes(bytes(MiB))
    (d / NAME).symlink_to(f)
    exc = refused(d, NAME, MiB, 0)
    assert exc.code == ErrorCode.BAD_INPUT and "not a block device" in str(exc)


def test_a_device_of_another_size_is_refused(tmp_path: Path, make_loop: Callable[..., str]) -> None:
    dev = make_loop(MiB)
    d = by_id(tmp_path)
    (d / NAME).symlink_to(dev)
    exc = refused(d, NAME, 2 * MiB, 0)
    assert exc.code == ErrorCode.SIZE_MISMATCH
    assert f"{MiB} bytes" in str(exc) and dev in str(exc)


def test_a_device_in_use_is_refused(tmp_path: Path, make_loop: Callable[..., str]) -> None:
    dev = make_loop(MiB)
    d = by_id(tmp_path)
    (d / NAME).symlink_to(dev)
    fd = os.open(dev, os.O_RDONLY | os.O_EXCL)  # what a mount holds: the device exclusively
    try:
        exc = refused(d, NAME, MiB, 0)
    finally:
        os.close(fd)
    assert exc.code == ErrorCode.IN_USE and "in use" in str(exc)
    assert find(d, NAME, MiB, 0) == str(d / NAME)  # free again


def test_the_replica_of_another_protected_disk_is_refused(tmp_path: Path, make_loop: Callable[..., str]) -> None:
    dev = make_loop(MiB)
    d = by_id(tmp_path)
    (d / NAME).symlink_to(dev)
    exc = refused(d, NAME, MiB, 0, used={dev})
    assert exc.code == ErrorCode.REPLICA_EXISTS and dev in str(exc)
    assert refused(d, NAME, MiB, 0, used={str(d / NAME)}).code == ErrorCode.REPLICA_EXISTS


@pytest.mark.parametrize("name", ["../../dev/loop0", "a/b", "/dev/loop0", "..", "."])
def test_a_name_that_is_not_a_file_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(BadRequest) as exc:  # at the boundary: the request never reaches the handler
        parse_request("find_device", {"name": name, "size": MiB, "wait": 1}, "ps", "mt")
    assert exc.value.code == ErrorCode.BAD_INPUT and "find_device: name" in str(exc.value)
    assert refused(by_id(tmp_path), name, MiB, 0).code == ErrorCode.BAD_INPUT  # and again in the handler


# ---- through the process server and a real master target --------------------------------------------------

MT_UUID = "4213a1b2-5c6d-7e8f-9a0b-1c2d3e4f5a6b"


async def until(fn: Callable[[], object], what: str, timeout: float = 60.0) -> object:
    """Poll `fn` until it gives something true (the daemons run meanwhile: this only sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (got := fn()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
    return got


def test_through_the_process_server_and_a_real_master_target(tmp_path: Path, make_loop: Callable[..., str]) -> None:
    """What protect will do once it has attached a replica disk in vSphere: ask the master target's session
    for the disk by name. The master target is a real `standby-mt` process (mt.toml's disk_by_id_dir points
    at the test's directory; its system_uuid is set), the process server runs here."""
    dev = make_loop(MiB)
    d = by_id(tmp_path)
    dep = LocalDeployment(tmp_path / "deploy")
    dep.init()
    dep.start("ps")
    try:
        dep.enroll("mt", "mt1")
    finally:
        dep.stop_all()  # the process server is run in this process from here on
    conf = dep.root / "mt-mt1" / "mt.toml"
    raw = load_toml(conf)
    raw.update(disk_by_id_dir=str(d), system_uuid=MT_UUID.upper())  # any case: stored canonical
    save_toml(conf, raw)

    async def main() -> None:
        ps = ProcessServer(PSConfig.load(dep.ps_dir))
        stop, ready = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(ps.serve(stop, ready))
        await ready.wait()
        try:
            dep.start("mt", "mt1")
            await until(lambda: "mt1" in ps.mt_sessions, "the master target to connect")
            mt = ps.mt_sessions["mt1"]
            # It said which machine it runs on as its session started (about).
            about = await until(lambda: (ps.registry.machine("mt1") or {}).get("reported_at") and
                                ps.registry.machine("mt1"), "the master target's about")
            assert isinstance(about, dict) and about["system_uuid"] == MT_UUID and about["hostname"]

            timer = threading.Timer(0.5, (d / NAME).symlink_to, (dev,))  # udev, after the SCSI rescan
            timer.start()
            try:
                assert await mt.find_device(NAME, MiB, 30) == str(d / NAME)
            finally:
                timer.cancel()
            with pytest.raises(RequestFailed) as exc:
                await mt.find_device(NAME, 2 * MiB, 0)
            assert exc.value.code == ErrorCode.SIZE_MISMATCH
            with pytest.raises(RequestFailed) as exc:
                await mt.find_device("wwn-0x6000c29000000000000000000000beef", MiB, 0.5)
            assert exc.value.code == ErrorCode.MISSING and "disk.EnableUUID" in str(exc.value)
            with pytest.raises(RequestFailed) as exc:  # refused by the master target at its boundary
                await mt.find_device("../" + NAME, MiB, 0)
            assert exc.value.code == ErrorCode.BAD_INPUT and "find_device: name" in str(exc.value)
            with pytest.raises(RequestFailed) as exc:
                await mt.find_device(NAME, MiB, 301)
            assert exc.value.code == ErrorCode.BAD_INPUT and "find_device: wait" in str(exc.value)
            assert "mt1" in ps.mt_sessions  # refusals end nothing: the session goes on
            assert await mt.find_device(NAME, MiB, 0) == str(d / NAME)
        finally:
            await asyncio.to_thread(dep.stop_all)
            stop.set()
            await server
        assert "Traceback" not in dep.log_text("mt-mt1")

    asyncio.run(main())
