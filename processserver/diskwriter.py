"""One disk's records from one agent connection: appended to the cache in order and acknowledged once
fsynced (promise 1), refused with BUSY when they cannot be stored (promise 8), the connection closed at a
sequence gap. What to do with each group is decided by intake.py; this module does it.

Whatever is queued is appended as a group under one fsync. The frames are stored as
received (already verified), byte for byte, never encoded again.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from standby.plumbing import failpoints
from standby.plumbing.link import Link, LinkClosed
from standby.plumbing.supervise import describe
from standby.proto.enums import GoodbyeCode, MarkerKind
from standby.proto.messages import Ack, Batch, Busy, Marker

from .cache import drop_quarantine, record_info
from .hub import Hub
from .intake import CACHE_RETRY, FAILED_OVER_RETRY, QUOTA_RETRY, Intake, after_failed_store, sort_group
from .streams import DiskStream

log = logging.getLogger("standby.ps")

Arrival = tuple[Batch | Marker, bytes | bytearray]  # a record and its frame as received
# Records appended to the cache under one fsync at most.
GROUP_MAX = 8
# Records queued between the session's read loop and the writer; beyond, the read loop waits (and with it
# the agent's connection).
QUEUE_MAX = 4


class DiskWriter:
    """The cache writer of one disk for one agent session; started at its first record."""

    def __init__(self, hub: Hub, link: Link, st: DiskStream) -> None:
        self.hub = hub
        self.link = link
        self.st = st
        self.queue: asyncio.Queue[Arrival] = asyncio.Queue(maxsize=QUEUE_MAX)
        self.refused_from: int | None = None  # the first sequence refused since the last one stored in order
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def put(self, msg: Batch | Marker, frame: bytes | bytearray) -> None:
        await self.queue.put((msg, frame))

    async def run(self) -> None:
        """The writer; if it fails unexpectedly (a bug), the records it held would never be answered: log
        the traceback, fail the disk in status, and end the session so the agent sends again from what is
        stored (nothing is lost: it keeps what was not acknowledged)."""
        try:
            await self.write()
        except (asyncio.CancelledError, LinkClosed):
            raise
        except Exception as exc:
            log.exception("%s: the cache writer of disk %d failed unexpectedly (a bug: please report it with "
                          "this trace)", self.link.name, self.st.id)
            self.st.health.set("ps-writer", f"the process server's cache writer failed: {describe(exc)} (the "
                               "agent reconnects and sends again)")
            await self.link.close(GoodbyeCode.INTERNAL_ERROR, "the process server failed to store a record; send again")

    async def write(self) -> None:
        """Take whatever is queued (up to GROUP_MAX records) as one group, until the connection ends."""
        try:
            while True:
                group = [await self.queue.get()]
                while not self.queue.empty() and len(group) < GROUP_MAX:
                    group.append(self.queue.get_nowait())
                if not await self.write_group(group):
                    return
        except LinkClosed:
            pass

    async def write_group(self, group: list[Arrival]) -> bool:
        """Store, acknowledge and refuse one group as intake.sort_group decides. False once the connection
        was closed (a sequence gap)."""
        st = self.st
        if st.failed_over:
            # After a failover nothing more is replicated: the agent keeps its changes in its dirty map.
            for m, _ in group:
                await self.link.send(Busy(m.disk, m.sequence, FAILED_OVER_RETRY, "the machine is failed over"))
            return True
        quota = self.hub.cfg.cache_quota
        numbers = [(m.sequence, len(r)) for m, r in group]
        intake = sort_group(numbers, st.received_seq, quota - self.hub.cache_bytes, self.refused_from)
        if intake.gap is not None:
            expect, got = intake.gap
            log.warning("%s: disk %d sequence gap (%d after %d)", self.link.name, st.id, got, expect - 1)
            await self.link.close(GoodbyeCode.SEQUENCE_GAP, f"expected sequence {expect}, got {got}")
            return False
        failpoints.hit("ps.writer")
        why, retry = f"process server cache over quota ({quota >> 20} MiB)", QUOTA_RETRY
        if intake.take:
            try:
                # Shielded: once an append has started, the session ending (agent gone) must not cut it off
                # between the fsync and the bookkeeping, or the resent record would be cached twice.
                stored = await asyncio.shield(self.hub.track(self.store([group[i] for i in intake.take])))
            except OSError as exc:
                # A full or failing cache file system: back-pressure, like the quota (promise 8), with the
                # reason in status; this disk only, and replication goes on once it clears.
                why, retry = f"process server cannot write its cache: {exc.strerror or exc}", CACHE_RETRY
                intake = after_failed_store(intake, numbers, st.received_seq)
                await self.cache_failed(exc, why)
            else:
                self.cache_ok()
                if stored < len(intake.take):  # another session of this machine stored in between
                    m = group[intake.take[stored]][0]
                    await self.link.close(GoodbyeCode.SEQUENCE_GAP, f"sequence {m.sequence} is out of order")
                    return False
        self.refused_from = intake.refused_from
        await self.answer(group, intake, why, retry)
        return True

    async def answer(self, group: list[Arrival], intake: Intake, why: str, retry: float) -> None:
        """ACK what is durable, BUSY what was refused (the agent backs off `retry` seconds and resends)."""
        st = self.st
        for i in intake.take:
            m = group[i][0]
            await self.link.send(Ack(m.disk, m.sequence, m.generation))
        if intake.refuse:
            if intake.starts_refusing:
                log.log(logging.INFO if st.refusing else logging.WARNING, "disk %d: %s: refusing data", st.id, why)
                st.refusing = True
            st.refused_records += len(intake.refuse)
            for i in intake.refuse:
                m = group[i][0]
                await self.link.send(Busy(m.disk, m.sequence, retry, why))
        elif intake.take and st.refusing:
            st.refusing = False
            log.info("disk %d: the cache accepts data again", st.id)

    async def cache_failed(self, exc: OSError, why: str) -> None:
        self.st.health.set("cache-write", f"{why}; refusing this disk's data until it can be written (the agent "
                                          "keeps its changes and sends them again)")
        if exc.errno == errno.ENOSPC:
            # Segments set aside after damage give way first; the refused records come again.
            await asyncio.to_thread(drop_quarantine, self.hub.cfg.cache_dir)

    def cache_ok(self) -> None:
        self.st.health.clear("cache-write")
        self.st.health.clear("ps-writer")
        self.st.health.clear("agent-record")

    async def store(self, records: list[Arrival]) -> int:
        """Append the records that follow what is cached, as one step with their accounting. Returns how
        many leading records are durable now (stored, or already cached before); the rest broke the order."""
        st = self.st
        reg = self.hub.registry
        async with st.append_lock:
            durable = 0
            fresh: list[Arrival] = []
            expect = st.received_seq + 1
            for m, r in records:
                if m.sequence < expect and not fresh:
                    durable += 1  # a retransmission: already durable here
                elif m.sequence == expect:
                    fresh.append((m, r))
                    expect += 1
                else:
                    break
            if not fresh:
                return durable
            await asyncio.to_thread(st.cache.append_group, [(m.sequence, r) for m, r in fresh])
            for m, r in fresh:
                info = record_info(m)
                st.records[m.sequence] = info
                if info.marker is None and info.nbytes:
                    st.last_data_seq = max(st.last_data_seq, m.sequence)
                if info.cursor:
                    st.cursor = info.cursor
                if info.marker in (MarkerKind.INITIAL_COMPLETE, MarkerKind.RESYNC_COMPLETE):
                    st.initial_complete = True
                st.generation = max(st.generation, m.generation)
                if isinstance(m, Batch):
                    reg.add_counters(st.id, bytes_logical=m.logical_bytes, bytes_data=m.data_bytes, bytes_wire=len(r))
                    st.receive_rate.add(m.logical_bytes)
            st.received_seq = fresh[-1][0].sequence
            reg.update_disk(st.id, received_seq=st.received_seq, cursor=st.cursor, generation=st.generation)
        st.new_data.set()
        return durable + len(fresh)
