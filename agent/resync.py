"""Resync of one disk (DESIGN §8): bring the replica back to the source when tracking cannot be trusted.

A resync starts a new generation. Everything tracked so far is covered by it, so the dirty map starts
afresh first; writes during the resync are tracked and shipped after it, as ordinary epochs.

- **checksum** (default): both ends hash their disk in 4 KiB leaves (proto.hashtree) and compare coarse
  to fine: the master target's hashes come back through the process server encrypted and bound to our
  query (proto.envelope.seal_hashes). Only differing leaves are read and shipped.
- **full**: no hashing; every byte is sent again (zero runs still as zero extents).

No recovery point is made from the start of a resync until its `resync-complete` marker is applied and
the next consistent epoch follows.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from standby.proto import hashtree
from standby.proto.enums import MarkerKind
from standby.proto.envelope import open_hashes
from standby.proto.messages import WINDOW, BatchKind

from .dirtymap import DirtyMap, split_extents
from .replicated import Progress

if TYPE_CHECKING:
    from .delta import Shipper

log = logging.getLogger("standby.agent.resync")
# Parents per hash query: the answer (FAN hashes each, base64 in a JSON reply) stays under 1 MiB.
PARENTS_PER_QUERY = 512
HASH_TIMEOUT = 3600.0  # the first query waits for the master target to hash its whole replica
HASH_THREADS = 4  # parts of the disk read and hashed at once
# Hash queries in flight at once: each is a round trip through the process server, and the three
# daemons' work on different queries overlaps.
QUERIES_AT_ONCE = 4


class HashingStopped(Exception):
    """The resync that asked for these hashes has ended."""


async def resync(sh: Shipper, gen: int, seq: int, mode: str, reason: str) -> tuple[int, int]:
    """Run one resync; returns (new generation, next sequence). Raises on connection loss (the caller
    starts it again at the next connection: the reason is kept until a resync completes)."""
    d, tr, link = sh.d, sh.tracking, sh.link
    name = d.cfg.name
    prog = Progress(mode, reason, tr.size)
    sh.rd.resync_progress = prog
    # Everything sent before must be stored first, so the master target hashes a replica that has it.
    while (restart := await sh.settle(1)) is not None:
        seq = restart
        await sh.wait_busy()  # what was refused is back in the dirty map: the resync covers it
    res = await link.request("resync_begin", disk=d.id, generation=gen + 1, mode=mode, reason=reason)
    gen = int(res.get("generation", gen + 1))
    log.warning("disk %s: %s resync (generation %d): %s", name, mode, gen, reason)
    tr.map = DirtyMap(tr.size, tr.map.granularity)  # the resync covers all of it; new writes count from here
    tr.lost = None
    if mode == "full":
        extents = [(0, tr.size)]
        prog.bytes_differing = tr.size
    else:
        extents = await differing_extents(sh, gen, prog)
    prog.phase = "shipping"
    prog.done = 0
    prog.total = sum(n for _, n in extents) or 1
    sh.window.hold(split_extents(extents, sh.rd.cfg.batch_size))
    meta = {
        "generation": gen,
        "kind": MarkerKind.RESYNC_COMPLETE,
        "mode": mode,
        "reason": reason,
        "bytes_differing": prog.bytes_differing,
    }
    seq = await ship(sh, gen, seq, prog, meta)
    prog.phase = "complete"
    prog.finished = time.time()
    log.info(
        "disk %s: resync complete: %d bytes differed, %d shipped, %d hash bytes, %.1f s",
        name,
        prog.bytes_differing,
        prog.bytes_shipped,
        prog.hash_bytes,
        time.time() - prog.started,
    )
    return gen, seq


async def ship(sh: Shipper, gen: int, seq: int, prog: Progress, meta: dict[str, Any]) -> int:
    """Ship the held groups of a resync and its resync-complete marker; returns the next sequence.
    The window holds what is to be shipped; a BUSY puts back what was not stored (see below)."""
    tr, win, batch_size = sh.tracking, sh.window, sh.rd.cfg.batch_size
    # The differing blocks, then the resync-complete marker, all acknowledged. A BUSY puts what was not
    # stored back into the dirty map (agent.window); the resync then takes the dirty map again (what is
    # in it since the resync began is shipped with it, harmlessly: no point is made before the marker)
    # and goes on after the delay the process server asked for.
    # The next group is read while this one is sealed and sent (as an epoch's are: agent.delta).
    ahead: tuple[list[tuple[int, int]], asyncio.Future[list[tuple[int, memoryview]]]] | None = None

    def read_ahead() -> None:
        nonlocal ahead
        nxt = win.held[1] if len(win.held) > 1 else None
        ahead = (nxt, asyncio.ensure_future(asyncio.to_thread(sh.builder.read_extents, nxt))) if nxt else None

    while True:
        refused = False
        try:
            while (group := win.next_group()) is not None:
                if ahead is not None and ahead[0] is group:
                    pieces = await ahead[1]
                else:
                    pieces = await asyncio.to_thread(sh.builder.read_extents, group)
                read_ahead()
                batch = await asyncio.to_thread(sh.builder.delta_batch, gen, seq, BatchKind.RESYNC, pieces)
                await win.send(seq, batch, group)
                seq += 1
                prog.done = min(prog.done + sum(n for _, n in group), prog.total)
                prog.bytes_shipped += batch.logical_bytes
                restart = await sh.settle(WINDOW)
                if restart is not None:
                    seq, refused = restart, True
                    break
        finally:
            if ahead is not None and not ahead[1].done():
                ahead[1].cancel()
            ahead = None
        if not refused:
            await win.send(seq, sh.rd.make_marker(seq, {**meta, "time": time.time()}))
            seq += 1
            restart = await sh.settle(1)
            if restart is None:
                break
            seq = restart
        await sh.wait_busy()
        win.hold(split_extents(tr.take_all().extents(), batch_size))
    return seq


async def differing_extents(sh: Shipper, gen: int, prog: Progress) -> list[tuple[int, int]]:
    d, tr = sh.d, sh.tracking
    size = tr.size
    prog.phase = "hashing"

    stopped = threading.Event()

    def progress(done: int) -> None:
        # A cancelled resync (connection lost, agent stopping) must not leave threads hashing the whole
        # disk: the agent's exit would wait for them.
        if stopped.is_set():
            raise HashingStopped("resync stopped")
        prog.done = done

    def hash_source() -> bytearray:
        t0 = time.monotonic()
        with sh.builder.scanning() as read:
            leaves = hashtree.leaf_hashes(read, size, hashtree.LEAF, progress, HASH_THREADS)
        log.info("disk %s: source hashed in %.1f s", d.cfg.name, time.monotonic() - t0)
        return leaves

    # Ours and theirs at once: the master target hashes its replica while we hash the source.
    ours_task = asyncio.ensure_future(asyncio.to_thread(hash_source))
    t0 = time.monotonic()
    try:
        top_theirs = await query(sh, gen, None, None, prog)
        log.info("disk %s: the replica's hashes came after %.1f s", d.cfg.name, time.monotonic() - t0)
        leaves = await ours_task
        levels = hashtree.build(leaves)
    finally:
        stopped.set()
        ours_task.cancel()
    prog.phase = "comparing"
    k = len(levels) - 1
    indexes = list(range(hashtree.count(levels[k])))
    diff = hashtree.differing(indexes, hashtree.pick(levels[k], indexes), top_theirs)
    room = asyncio.Semaphore(QUERIES_AT_ONCE)

    async def compare(level: int, parents: list[int]) -> list[int]:
        async with room:
            theirs = await query(sh, gen, level, parents, prog)
        kids = hashtree.children(parents, hashtree.count(levels[level]))
        return hashtree.differing(kids, hashtree.pick(levels[level], kids), theirs)

    while k > 0 and diff:
        k -= 1
        async with asyncio.TaskGroup() as tg:
            asked = [tg.create_task(compare(k, diff[i : i + PARENTS_PER_QUERY]))
                     for i in range(0, len(diff), PARENTS_PER_QUERY)]
        diff = [ix for t in asked for ix in t.result()]
    extents = hashtree.leaf_extents(diff, size) if k == 0 else []
    known = getattr(tr.tracker, "known", None)
    if known is not None:
        known(leaves)  # equal leaves are what the replica holds; differing ones are set when shipped
    prog.bytes_differing = sum(n for _, n in extents)
    log.info(
        "disk %s: checksum comparison: %d of %d bytes differ (%d hash bytes from the master target)",
        d.cfg.name,
        prog.bytes_differing,
        size,
        prog.hash_bytes,
    )
    return extents


async def query(sh: Shipper, gen: int, level: int | None, parents: list[int] | None, prog: Progress) -> bytes:
    """Ask the master target for hashes: its top level (level None), or the children at `level` of
    `parents` (indexes in level + 1)."""
    q = {"level": level, "parents": parents, "nonce": base64.b64encode(os.urandom(16)).decode()}
    qbytes = json.dumps(q, sort_keys=True, separators=(",", ":")).encode()
    res = await sh.link.request("resync_hashes", timeout=HASH_TIMEOUT, disk=sh.d.id, generation=gen, query=q)
    sealed = base64.b64decode(res["sealed"])
    hashes = open_hashes(sh.d.key, sh.d.uid.bytes, gen, qbytes, sealed)
    prog.hash_bytes += len(sealed)
    return hashes
