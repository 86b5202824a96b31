"""asyncio helpers.

Why not `asyncio.wait_for(event.wait(), t)` in long-lived loops: on Python 3.11 `wait_for` swallows a
cancellation that arrives in the same loop iteration as the inner awaitable completing (CPython
gh-86296, fixed in 3.12 where `wait_for` is built on `asyncio.timeout`). A loop around it then keeps
running after it was cancelled, and whoever awaits its end waits forever. `asyncio.timeout` does not
have that flaw.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; True if it was set. Cancellation always
    propagates."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
