"""The process server's hub: what every session meets at — the registry, each disk's stream (its cache
and positions) and the connected sessions — and the operations on a disk that more than one session
asks for (open its stream, pass over lost records, ask for a resync, wake a peer).

Sessions (agentsession, mtsession, admin, recovery) hold the hub, never each other: they see a connected
agent or master target through the narrow `AgentPeer` / `MTPeer` protocols below. That keeps the import
graph a tree: server.py, at the top, is the one module that knows every session class.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

from standby.plumbing.link import Link, LinkClosed
from standby.plumbing.supervise import spawn
from standby.proto.enums import MarkerKind
from standby.proto.messages import Request
from standby.proto.states import FAILED_OVER, Phase, Replication, phase_move

from .cache import DiskCache
from .deployment import PSConfig
from .registry import DiskRow, Registry
from .streams import DiskStream
from .trips import TripStore
from .vmdisks import VmDiskStore

log = logging.getLogger("standby.ps")


def no_resync(row: DiskRow) -> str:
    """Why a failed-over or committed disk takes no resync, for the operator: a resync copies the source
    onto the replica, and the replica is now the recovered machine (reprotect, processserver.roundtrip,
    replicates it back)."""
    if row.replication is Replication.COMMITTED:
        return (f"{row.label} is committed: its replica is the machine now, and a resync would overwrite it with "
                f"the source's contents (replicate it back with: standby reprotect {row.machine})")
    return (f"{row.label} is failed over: a resync would overwrite the failed-over replica with the source's "
            "contents; choose another point with standby failover, or make it final with standby commit")


class AgentPeer(Protocol):
    """A connected agent, as the other sessions see it (agentsession.AgentSession)."""

    link: Link


class MTPeer(Protocol):
    """A connected master target, as the other sessions see it (mtsession.MTSession)."""

    name: str
    link: Link

    def sending(self, disk: int) -> bool:
        """Whether a sender forwards this disk's records to the master target now."""
        ...

    def stop_sender(self, disk: int) -> None: ...

    async def check_replica(self, path: str, fmt: str, size: int, existing: bool = False) -> None: ...


class Hub:
    def __init__(self, cfg: PSConfig) -> None:
        self.cfg = cfg
        self.registry = Registry(cfg.registry_path)
        self.trips = TripStore(self.registry.db)
        self.vmdisks = VmDiskStore(self.registry.db)  # replicas that are VMDKs in vSphere (vmsteps)
        self.streams: dict[int, DiskStream] = {}
        self.mt_sessions: dict[str, MTPeer] = {}
        self.agent_sessions: dict[str, AgentPeer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._storing: set[asyncio.Future[Any]] = set()

    # -- start-up and shut-down ---------------------------------------------------------------------
    def recover(self) -> None:
        for row in self.registry.disks():
            try:
                self.open_stream(row)
            except Exception:  # one disk's cache must not keep the server from serving every other disk
                log.exception("disk %s/%s: cannot open its cache (a bug: please report it with this trace); the "
                              "disk is not served", row.machine, row.name)
        self._recover_trips()

    def _recover_trips(self) -> None:
        """A failback whose shutdown step or final sync was under way when the previous process server ended:
        the request that owned the phase is gone, and nothing else moves it on, so `failback --complete`
        and `--cancel` would be refused for ever. Back to synchronising (a full download's shutdown: back to
        reprotecting, the failback not started), from where the operator completes again: a new shutdown
        step cuts a new final point after whatever the first one may have let through."""
        for trip in self.trips.all():
            if trip.phase not in (Phase.SHUTTING_DOWN, Phase.FINAL_SYNC):
                continue
            old, wire = trip.phase, self.wire_bytes(trip.active)
            why = f"the process server stopped during {old}: the failback --complete that ran it is gone"
            moves = [Phase.SYNCHRONISING]
            if old is Phase.SHUTTING_DOWN and trip.data.get("sync") == "full":
                moves.append(Phase.REPROTECTING)  # the full copy was never asked for: the failback did not start
            for phase in moves:
                trip.phase = phase_move(trip.phase, phase)
                self.trips.save(trip)
                self.trips.begin(trip.name, phase, wire, why)
            log.warning("round trip %s: %s -> %s (%s); complete it again: standby failback %s%s", trip.name, old,
                        trip.phase, why, trip.name, " --complete" if trip.phase is Phase.SYNCHRONISING else "")

    async def close(self) -> None:
        """Cancel every task, let the appends under way finish (with their bookkeeping), then close the
        caches and the registry."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._storing, return_exceptions=True)
        for st in self.streams.values():
            st.cache.close()
        self.registry.close()

    # -- disks --------------------------------------------------------------------------------------
    def wire_bytes(self, identity: str) -> int:
        """Bytes on the wire so far of an agent identity's disks: what a round trip's history counts."""
        return sum(d.bytes_wire for d in self.registry.disks(machine=identity))

    def active_identity(self, machine: str) -> str:
        """The agent identity whose disks are `machine`'s now: on a round trip that replicates back, the
        recovered machine's (processserver.trips); else `machine` itself."""
        trip = self.trips.get(machine)
        return trip.active if trip is not None else machine

    def rpo_threshold(self, identity: str) -> float:
        """The RPO above which a disk of this agent identity is alerted: the reverse direction's own policy
        while it replicates back, else the deployment's."""
        trip = self.trips.of_identity(identity)
        if trip is not None and trip.active == identity and trip.recovered == identity:
            return float(trip.data.get("policy", {}).get("rpo_threshold", self.cfg.rpo_threshold))
        return self.cfg.rpo_threshold

    def copy_done(self, identity: str) -> None:
        """A disk of this agent identity finished its copy or comparison: once every one has, the round trip
        it replicates for (reprotect, reverse replication) has that phase's history entry end now, with the
        bytes it shipped."""
        trip = self.trips.of_identity(identity)
        if trip is None or trip.active != identity or trip.phase not in (Phase.REPROTECTING, Phase.REVERSING):
            return
        if all(d.replication is Replication.DELTA for d in self.registry.disks(machine=identity) if d.mt is not None):
            self.trips.end(trip.name, self.wire_bytes(identity), detail=None)
            log.info("round trip %s: %s complete", trip.name, trip.phase)

    async def about(self, name: str, system_uuid: str, hostname: str) -> dict[str, Any]:
        """An agent's or a master target's word on the machine it runs on (proto.requests.About), stored for
        vCenter discovery; logged when it changes (a machine moved to another VM or host)."""
        old = self.registry.machine(name)
        if old is not None and (old["system_uuid"], old["hostname"]) != (system_uuid, hostname):
            log.info("%s %s runs on host %r, system UUID %s", old["role"], name, hostname, system_uuid or "unknown")
        self.registry.set_about(name, system_uuid, hostname)
        return {}

    def open_stream(self, row: DiskRow) -> DiskStream:
        st = self.streams.get(row.id)
        if st is not None:
            return st
        cache = DiskCache(self.cfg.cache_dir / f"disk-{row.id}")
        rec = cache.recover(acked=row.received_seq)
        st = DiskStream(row.id, row.machine, cache, row.name)
        st.applied_seq = row.applied_seq
        st.received_seq = max(row.received_seq, rec.last_seq, row.applied_seq)
        st.cursor = max(row.cursor, rec.last_cursor)
        st.generation = max(row.generation, rec.generation)
        st.records = {s: v for s, v in rec.records.items() if s > st.applied_seq}
        st.last_data_seq = max((s for s, v in st.records.items() if v.marker is None and v.nbytes), default=0)
        st.initial_complete = (
            row.synced_at is not None
            or row.replication is Replication.DELTA
            or any(v.marker in (MarkerKind.INITIAL_COMPLETE, MarkerKind.RESYNC_COMPLETE) for v in st.records.values())
        )
        st.pause = bool(row.paused)
        st.failed_over = row.replication in FAILED_OVER
        if st.failed_over:
            st.paused_at = max(st.applied_seq, 1)
        cache.release(st.applied_seq)
        if st.received_seq != row.received_seq or st.cursor != row.cursor:
            self.registry.update_disk(row.id, received_seq=st.received_seq, cursor=st.cursor)
        self.streams[row.id] = st
        if rec.damage is not None:
            # Records the agent was told are durable may be gone: the replica cannot catch up by itself
            # (promise 3). The master target skips what is lost (see MTSession.pull) and a checksum resync
            # repairs the replica; the damaged files are kept in quarantine/ for inspection.
            msg = f"{rec.damage}; moved to {cache.dir / 'quarantine'}; a checksum resync was requested"
            st.health.set("cache-damage", msg)
            self.after_loss(st, row)
            self.skip_lost(st, row)
            if row.mt is not None:
                self.request_resync(row, "checksum", f"the process server's cache was damaged: {rec.damage}")
        return st

    @property
    def cache_bytes(self) -> int:
        return sum(s.cache.bytes for s in self.streams.values())

    def skip_lost(self, st: DiskStream, row: DiskRow) -> None:
        """Records after what is applied were received but are lost (set aside as damaged): nothing will
        ever apply them, so they count as passed (the resync already asked for repairs the replica). The
        master target skips them the next time it pulls (MTSession.pull)."""
        if st.received_seq > st.applied_seq and not st.cache.after(st.applied_seq):
            log.warning("disk %s/%s: records %d..%d are lost: passed over (a resync repairs the replica)",
                        row.machine, row.name, st.applied_seq + 1, st.received_seq)
            st.lost = (st.applied_seq + 1, st.received_seq)
            st.applied_seq = st.received_seq
            self.registry.update_disk(row.id, applied_seq=st.applied_seq)

    def after_loss(self, st: DiskStream, row: DiskRow) -> None:
        """Cached records were set aside (damaged, or refused by the master target): an initial copy goes
        on from what is still held — the newest cached INITIAL batch, else what was applied — so the agent
        sends the lost part again (the master target skips the lost sequence numbers; see MTSession.pull)."""
        cursor = max([v.cursor for v in st.records.values() if v.cursor] + [row.applied_cursor])
        st.initial_complete = (
            row.synced_at is not None
            or row.replication is Replication.DELTA
            or any(v.marker in (MarkerKind.INITIAL_COMPLETE, MarkerKind.RESYNC_COMPLETE) for v in st.records.values())
        )
        if not st.initial_complete and cursor != st.cursor:
            log.warning("disk %s/%s: the initial copy goes on from %d bytes (was %d)", row.machine, row.name, cursor,
                        st.cursor)
            st.cursor = cursor
            self.registry.update_disk(row.id, cursor=cursor)

    def request_resync(self, row: DiskRow, mode: str, reason: str) -> None:
        """Ask the disk's agent for a resync (it learns at its next report, or now if connected)."""
        if row.resync_request:
            return
        if row.replication in FAILED_OVER:  # the agent would be refused at resync_begin, and ask for ever
            log.warning("disk %s: no resync (%s): %s", row.label, reason, no_resync(row))
            return
        log.warning("disk %s/%s: resync requested (%s): %s", row.machine, row.name, mode, reason)
        self.registry.update_disk(row.id, resync_request=json.dumps({"mode": mode, "reason": reason}))
        agent = self.agent_sessions.get(row.machine)
        if agent is not None:
            self.spawn(self.wake(agent.link))

    # -- peers and tasks ----------------------------------------------------------------------------
    async def wake(self, link: Link | None) -> None:
        """Tell a connected agent or master target that its disks changed, so it asks now rather than at
        its next poll. Best effort: the peer's periodic poll is the fallback."""
        if link is None:
            return
        try:
            await link.send(Request(0, "wake", {}))
        except LinkClosed:
            pass

    def track(self, coro: Any) -> asyncio.Future[Any]:
        """A cache append that must run to its end even if its session ends (shielded by the caller); the
        server waits for it before it closes the cache and the registry."""
        fut = asyncio.ensure_future(coro)
        self._storing.add(fut)
        fut.add_done_callback(self._storing.discard)
        return fut

    async def appends_done(self) -> None:
        """Wait for the cache appends under way (a session that ended may have left some running)."""
        await asyncio.gather(*self._storing, return_exceptions=True)

    def spawn(self, coro: Any, name: str = "task") -> asyncio.Task[Any]:
        return spawn(coro, name, self._tasks)
