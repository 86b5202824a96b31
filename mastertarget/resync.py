"""The master target's half of a checksum resync (DESIGN §8): the disk's agent asks, through the process
server, for the top level of the replica's checksum tree or for children of given nodes; the answer is
encrypted for the agent."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import Link
from standby.proto import hashtree
from standby.proto.enums import ErrorCode
from standby.proto.envelope import seal_hashes

from .replicas import ReplicaError
from .worker import DiskWorker

log = logging.getLogger("standby.mt")


async def answer_hashes(w: DiskWorker, link: Link, generation: int, query: dict[str, Any],
                        size: int | None = None) -> dict[str, Any]:
    """A resync hash query for the disk of `w`: the top level of the replica's checksum tree (computed
    afresh), or children of given nodes. A new `size` resizes the replica first."""
    try:
        if size is not None and size != w.state.size:
            await w.resize(link, size)
            if size != w.state.size:
                raise ReplicaError(w.state.error or "the replica could not be resized")
        async with w.lock:
            if query.get("level") is None or w.tree is None or w.tree[0] != generation:
                log.info("disk %s/%s: hashing replica %s for a resync", w.state.machine, w.state.name, w.state.path)
                # Sparse VMDK reads walk shared grain tables: one thread; the flat kinds read with pread.
                threads = 1 if w.state.format == "vmdk-sparse" else 4
                t0 = time.monotonic()
                with w.applier.replica.scanning() as read:
                    leaves = await asyncio.to_thread(
                        hashtree.leaf_hashes, read, w.state.size, hashtree.LEAF, None, threads
                    )
                w.tree = (generation, hashtree.build(leaves))
                log.info("disk %s/%s: replica hashed in %.1f s", w.state.machine, w.state.name,
                         time.monotonic() - t0)
    except (ReplicaError, OSError) as exc:
        raise RequestFailed(ErrorCode.FAILED, f"cannot hash the replica: {exc}") from None
    levels = w.tree[1]
    if query.get("level") is None:
        hashes = levels[-1]
    else:
        level = int(query["level"])
        if level >= len(levels) - 1:
            raise RequestFailed(ErrorCode.BAD_INPUT, f"bad hash query: level {level}, the tree has {len(levels)}")
        try:
            kids = hashtree.children([int(p) for p in query["parents"]], hashtree.count(levels[level]))
            hashes = hashtree.pick(levels[level], kids)
        except ValueError as exc:
            raise RequestFailed(ErrorCode.BAD_INPUT, f"bad hash query: {exc}") from None
    qbytes = json.dumps(query, sort_keys=True, separators=(",", ":")).encode()
    sealed = seal_hashes(w.key, uuid.UUID(w.state.uid).bytes, generation, qbytes, hashes)
    return {"sealed": base64.b64encode(sealed).decode()}
