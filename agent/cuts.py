"""Orders for an early cut: what the app-consistent point coordinator (agent.appoint) hands a disk in delta
replication (agent.delta.Shipper), and how the disk answers. Apart from both so that neither imports the
other."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class AppCut:
    """One app-consistent point being made, shared by the CutOrders of all disks.

    `frozen` tells whether the file systems are still frozen (None: nothing was frozen because the
    pre-script or the freeze failed, so the points can only be crash-consistent, with the tag);
    `thawed` gets the freeze duration once the coordinator has thawed (it is always set, also on errors).
    """

    tag: str
    frozen: Callable[[], bool] | None
    thawed: asyncio.Future[float | None]


def _new_future() -> asyncio.Future[dict[str, Any]]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class CutOrder:
    """Asks a Shipper to cut now. `app` None: an ordinary early cut (the coordinator's flush epoch, which
    empties the dirty map so the frozen epoch is small). `lesser`: why this disk's point cannot be
    app-consistent even though the machine was frozen ("" if it can)."""

    app: AppCut | None = None
    lesser: str = ""
    reads_done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: asyncio.Future[dict[str, Any]] = field(default_factory=_new_future)

    def finish(self, **result: Any) -> None:
        """The disk's entry in the app_point reply: sequence, consistency, time, freeze_seconds, reason."""
        self.reads_done.set()
        if not self.outcome.done():
            out = {"sequence": None, "consistency": None, "time": None, "freeze_seconds": None, "reason": ""}
            self.outcome.set_result({**out, **result})
