"""A replica disk attached to the master target's VM in vSphere, found inside the guest: the process server
creates the VMDK, attaches it, and asks (`find_device`) which block device it became here.

With `disk.EnableUUID = TRUE` in the VM's configuration the guest sees each virtual disk's UUID, and udev
names the disk after it in /dev/disk/by-id (`wwn-0x6000c29...`, `scsi-36000c29...`). That name is known
before the guest shows the disk, and stays the same across reboots, unlike /dev/sdX: so the process server
asks for a name, and the master target waits for it to appear (a hot-added disk shows within a second or
two once the SCSI bus is rescanned), then checks it is what the replica must be — a block device of the
source disk's size that nobody uses — and answers with the by-id path itself. The replica is then today's
`device` replica at that path.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from standby.plumbing.errors import RequestFailed
from standby.proto.enums import ErrorCode

from .placement import check_device_free

POLL_INTERVAL = 0.2  # seconds between looks: udev adds the link within milliseconds of the disk


def missing_text(by_id_dir: Path, name: str, wait: float) -> str:
    return (f"no {name} in {by_id_dir} after {wait:g} s: the disk was attached to this master target's VM in "
            "vSphere but the guest does not show it. Rescan the SCSI bus (echo - - - > "
            "/sys/class/scsi_host/host*/scan) or check that the VM has disk.EnableUUID=TRUE in its advanced "
            "configuration (without it the guest does not see the disk's UUID and names no by-id link after it)")


async def find_device(by_id_dir: Path, name: str, size: int, wait: float, used: set[str]) -> str:
    """The by-id path of disk `name` in `by_id_dir`, once it appears (within `wait` seconds), resolves to a
    free block device of exactly `size` bytes and is the replica of no other protected disk (`used`: their
    replica paths). RequestFailed with the reason otherwise. Never blocks the event loop: the looks and the
    checks run in a thread, the waiting is an asyncio sleep."""
    if "/" in name or name in ("", ".", ".."):  # checked at the boundary (proto.fields.file_name); kept here
        raise RequestFailed(ErrorCode.BAD_INPUT, f"{name!r} is not a file name in {by_id_dir}")
    link = by_id_dir / name
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    # exists() follows the link: a link whose device node is not there yet is not there yet either.
    while not await asyncio.to_thread(link.exists):
        if loop.time() >= deadline:
            raise RequestFailed(ErrorCode.MISSING, missing_text(by_id_dir, name, wait))
        await asyncio.sleep(min(POLL_INTERVAL, max(deadline - loop.time(), 0.0)))
    code, message = await asyncio.to_thread(check_found, str(link), size, used)
    if code:
        raise RequestFailed(code, message)
    return str(link)


def check_found(path: str, size: int, used: set[str]) -> tuple[str, str]:
    """("", "") if the device behind `path` may become a replica; else (code, message)."""
    real = os.path.realpath(path)
    for other in used:
        if other == path or os.path.realpath(other) == real:
            return ErrorCode.REPLICA_EXISTS, (f"{path} ({real}) is already the replica of another protected disk "
                                              f"({other})")
    code, message = check_device_free(path, size)
    if code:
        return code, f"{message} ({path} is {real})" if real != path else message
    return "", ""
