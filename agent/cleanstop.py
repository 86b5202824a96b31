"""The clean-stop record: what lets an agent restart without a resync (promise 3).

No tracker runs while the agent is stopped, so a restart can only continue from the saved dirty map if
nothing wrote the disk in between. The kernel counts every write, write-zeroes and discard a block
device completes (/sys/dev/block/M:m/stat); those counters and the boot id are saved with the map at a
clean stop and compared at start. Same boot, same counters: no write happened, the map is complete.
Anything else — no record (killed, crashed), a reboot (counters restart), moved counters, an image file
(no counters) — means the writes in between are unknown, and the caller resyncs with the reason.

The record is deleted when read, so it is used at most once.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from standby.plumbing.durable import load_json, save_json

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# Fields of the block stat file that count completed writes and discards (write-zeroes count as writes):
# write I/Os, write sectors, discard I/Os, discard sectors.
_WRITE_FIELDS = (4, 6, 11, 13)


def _record(directory: Path, name: str) -> Path:
    return directory / f"{name}.clean-stop.json"


def write_counters(path: str) -> list[int] | None:
    """The kernel's completed-write counters of a block device, or None for anything else."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return None
    fields = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/stat").read_text().split()
    return [int(fields[i]) for i in _WRITE_FIELDS if i < len(fields)]


def boot_id() -> str:
    return BOOT_ID.read_text().strip()


def save(directory: Path, name: str, path: str, size: int, counters: list[int], extents: list[tuple[int, int]]) -> None:
    rec = {"path": path, "size": size, "boot_id": boot_id(), "counters": counters, "extents": extents}
    save_json(_record(directory, name), rec, 0o600)


def load(directory: Path, name: str, path: str, size: int) -> tuple[list[tuple[int, int]], str]:
    """(dirty extents carried over, "") when the record proves no write was missed, else ([], reason)."""
    p = _record(directory, name)
    if not p.exists():
        return [], "the agent did not stop cleanly (no clean-stop record): writes meanwhile are unknown"
    try:
        rec = load_json(p)
        if rec["path"] != path or rec["size"] != size:
            return [], f"the disk changed since the agent stopped (path or size: {rec['size']} -> {size} bytes)"
        if rec["boot_id"] != boot_id():
            return [], "the machine restarted since the agent stopped: writes meanwhile are unknown"
        now = write_counters(path)
        if now is None or now != rec["counters"]:
            return [], "the disk was written while the agent was stopped (kernel write counters moved)"
        extents = [(int(a), int(b)) for a, b in rec["extents"]]
        if any(not (0 <= a < size and 0 < b <= size - a) for a, b in extents):
            raise ValueError("an extent lies outside the disk")
        return extents, ""
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError, OSError) as exc:
        return [], f"the clean-stop record is unreadable ({exc})"
    finally:
        p.unlink(missing_ok=True)
