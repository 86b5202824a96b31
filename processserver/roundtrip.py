"""A machine's way back and forth (issue 12): reprotect, planned failback, reverse replication.

Theory of operation
-------------------
Each direction is an ordinary protection of one agent identity's disks (processserver.protect), so
everything a protected disk does — seeding by checksum, delta replication, points, failover, commit,
status — works the same both ways. What the round trip adds (its store: processserver.trips) is the
order of the steps and what must never happen between them:

- **reprotect** (after a committed failover): the forward protection is set aside (processserver.unprotect:
  the recovery site keeps its replicas, now the recovered machine's disks), the original identity is
  retired (refused at the door, so neither the original agent nor a clone of it on the recovered disks
  writes anything), and the recovered machine's agent is protected into the original disks (original
  location: a checksum comparison against what they still hold, so only differences travel) or into new
  ones (alternate location: a full copy, or seeded from a copy the operator names). Refused before any
  change when an original disk is missing, of another size or in use, or the original agent is running.
- **failback** (a planned failover towards the original site). `start`, with sync before shutdown: the
  recovered machine keeps running while replication catches up. `complete`: the agent's shutdown step
  (agent.shutdown: the workload stopped, a final point cut on every disk), the final points applied, the
  original site failed over to exactly them; "no data loss" is checked — no record carrying data arrived
  after any final point — and the answer gives the downtime and the bytes shipped after the shutdown.
  With sync `full`, the shutdown comes first and every block is copied (a full resync), then `complete`.
  `cancel` before the shutdown step changes nothing but the phase; after it (full), the workload is started
  again (start_script) and the original disks are inconsistent until a failback is started again.
- **commit** is the operator's usual `standby commit`, by the machine's name.
- **reverse**: once the failback is committed, the recovered identity is retired, the original one comes
  back, and the original machine is protected again into the recovery site's replicas kept at reprotect:
  a checksum comparison, so only what changed since the recovered machine stopped travels. The recovery
  site's retention starts again as a new journal (the old one is set aside, as unprotect does).

Every step moves the round trip's phase (proto.states PHASE_MOVES) and opens an entry in its history with
the time and the bytes on the wire, which `standby status` shows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import LinkClosed
from standby.proto.enums import ErrorCode, ReplicaFormat
from standby.proto.states import Direction, Phase, Replication, phase_move

from . import vmsteps
from .hub import Hub
from .protect import protect, replica_name
from .recovery import RecoveryAdmin
from .registry import DiskRow
from .trips import Trip
from .tripstatus import failback_ready
from .unprotect import unprotect

log = logging.getLogger("standby.ps.roundtrip")
# The failback direction's policy (the seeds' failback policy): RPO threshold 15 min; retention 24 h and an
# app-consistent point every 60 min are the master target's and the agent's defaults, shown here.
FAILBACK_POLICY = {"rpo_threshold": 900.0, "retention_hours": 24, "app_consistent_minutes": 60}
AGENT_WAIT = 30.0  # an agent set aside and let in again reconnects within its 10 s backoff
SHUTDOWN_TIMEOUT = 600.0  # the shutdown script and the final point (agent.appoint limits each part)


def refuse(message: str, code: str = ErrorCode.REFUSED) -> RequestFailed:
    return RequestFailed(code, message)


class RoundTrips:
    """The round-trip half of the admin session (see admin.AdminSession)."""

    def __init__(self, ps: Hub, recovery: RecoveryAdmin) -> None:
        self.ps = ps
        self.recovery = recovery

    # -- helpers ------------------------------------------------------------------------------------
    def _move(self, trip: Trip, phase: Phase, detail: str = "") -> None:
        old = trip.phase
        trip.phase = phase_move(old, phase)
        self.ps.trips.save(trip)
        self.ps.trips.begin(trip.name, phase, self.ps.wire_bytes(trip.active), detail)
        log.info("round trip %s: %s -> %s%s", trip.name, old, phase, f" ({detail})" if detail else "")

    async def _agent_disks(self, identity: str, names: set[str]) -> dict[str, DiskRow]:
        """The agent's disks once it has reported every one of `names` (it may be reconnecting)."""
        deadline = time.monotonic() + AGENT_WAIT
        while True:
            have = {d.name: d for d in self.ps.registry.disks(machine=identity)}
            if names <= set(have) and identity in self.ps.agent_sessions:
                return have
            if time.monotonic() > deadline:
                missing = sorted(names - set(have))
                raise refuse(f"the agent {identity!r} is not connected or has not reported "
                             f"{'disk ' + ', '.join(missing) if missing else 'its disks'} (its agent.toml must name "
                             f"the disks {', '.join(sorted(names))}): start it and retry", ErrorCode.UNREACHABLE)
            await asyncio.sleep(0.2)

    def _trip(self, machine: str, direction: Direction) -> Trip:
        trip = self.ps.trips.get(machine)
        if trip is None or trip.direction is not direction:
            if direction is Direction.REVERSE:
                raise refuse(f"{machine} does not replicate back to its original site: run standby reprotect first")
            raise refuse(f"{machine} is not on a round trip")
        return trip

    # -- reprotect ----------------------------------------------------------------------------------
    async def reprotect(self, machine: str, agent: str, mt: str, location: str = "original",
                        format: str | None = None, replica_dir: str | None = None,
                        replicas: dict[str, str] | None = None, full: bool = False, existing: bool = False,
                        rpo_threshold: float | None = None) -> dict[str, Any]:
        ps, reg = self.ps, self.ps.registry
        if agent == machine:
            raise refuse(f"the recovered machine must run its own agent identity, not {machine}'s: a copy of the "
                         f"original agent's identity on the recovered disks is refused; enroll the recovered machine's "
                         f"agent under another name (standby-agent enroll --name {machine}-rec ...)",
                         ErrorCode.BAD_INPUT)
        trip = ps.trips.get(machine)
        forward = [d for d in reg.disks(machine=machine) if d.mt is not None]
        if trip is not None and trip.direction is Direction.REVERSE and trip.phase is not Phase.REPROTECTING:
            raise refuse(f"{machine} already replicates back from {trip.active} (phase {trip.phase})")
        if forward:
            if any(d.replication is not Replication.COMMITTED for d in forward):
                states = ", ".join(f"{d.name} {d.replication}" for d in forward)
                raise refuse(f"reprotect follows a committed failover ({machine}: {states}): run standby failover "
                             f"{machine} --point ... and standby commit {machine} first")
            away = {d.name: {"mt": d.mt, "replica": d.replica_path, "format": d.replica_format, "size": d.size,
                             "path": d.path} for d in forward}
        elif trip is not None and trip.data.get("away") and trip.phase is Phase.REPROTECTING:
            away = trip.data["away"]  # a reprotect that stopped halfway: go on
        else:
            raise refuse(f"{machine} has no committed failover to reprotect", ErrorCode.BAD_INPUT)
        m = reg.machine(agent)
        if m is None or m["role"] != "agent":
            raise refuse(f"unknown agent {agent!r}: enroll the recovered machine's agent first",
                         ErrorCode.UNKNOWN_MACHINE)
        if location == "original" and machine in ps.agent_sessions:
            raise refuse(f"{machine}'s agent is connected: the original machine is running and its disks are in use; "
                         "stop its workload and its agent (systemctl stop standby-agent) before reprotecting into its "
                         "disks", ErrorCode.IN_USE)
        # The recovered machine of an earlier round trip, set aside by reverse, is let in to report its disks;
        # a refusal below sets it aside again (nothing changed).
        aside = ps.trips.retired(agent) if trip is not None and trip.recovered == agent else None
        if aside is not None:
            ps.trips.reinstate(agent)
        lent = None
        try:
            rec = await self._agent_disks(agent, set(away))
            targets, fmt, existing = self._targets(machine, agent, location, format, replica_dir, replicas, full,
                                                   existing, away, rec)
            if location == "original" and not replicas:  # the original VM's own disks, lent to the master target
                sizes = {n: int(a["size"]) for n, a in away.items()}
                lent = await vmsteps.lend_originals(ps, machine, agent, mt, sizes)
                targets, fmt = (lent, ReplicaFormat.DEVICE) if lent is not None else (targets, fmt)
            await self._check_home(machine, mt, targets, fmt, location == "original" or existing, away, forward)
        except RequestFailed as exc:
            if aside is not None:
                ps.trips.retire(agent, aside)
            if lent is not None:
                raise await vmsteps.give_back(ps, agent, exc) from None
            raise
        policy = {**FAILBACK_POLICY, **({"rpo_threshold": rpo_threshold} if rpo_threshold else {})}
        trip = Trip(machine, Direction.REVERSE, Phase.REPROTECTING, agent, agent, trip.trips if trip else 0,
                    {**(trip.data if trip else {}), "away": away, "home_mt": mt, "location": location,
                     "policy": policy, "final": None, "sync": None})
        ps.trips.save(trip)
        mode = "full" if not existing else "checksum"
        ps.trips.begin(machine, Phase.REPROTECTING, self.ps.wire_bytes(agent),
                       f"{agent} -> {mt} ({location} location, {mode})")
        if forward:
            await unprotect(ps, machine)  # the recovery site keeps the replicas: they are the recovered disks
        ps.trips.retire(machine, f"{machine} failed over and its disks are written by reprotect from {agent}; this "
                                 f"identity comes back at 'standby reverse {machine}' (a clone of it on the recovered "
                                 "machine must not act as the original)")
        res = await protect(ps, agent, mt, fmt, None, targets, existing)
        log.warning("reprotect %s: %s replicates back to %s (%s location, %s)", machine, agent, mt, location, mode)
        return {"machine": machine, "agent": agent, "mt": mt, "mode": mode, "disks": res["disks"]}

    async def _check_home(self, machine: str, mt: str, targets: dict[str, str], fmt: str, existing: bool,
                          away: dict[str, Any], forward: list[DiskRow]) -> None:
        """RequestFailed unless every target can be written (an original disk: there, of the same size, used
        by nobody) and both sites' master targets are connected: checked before any change."""
        ps = self.ps
        session = ps.mt_sessions.get(mt)
        if session is None:
            raise refuse(f"master target {mt!r} is not connected: start it and retry", ErrorCode.UNREACHABLE)
        for name, path in targets.items():
            try:
                await session.check_replica(path, fmt, int(away[name]["size"]), existing)
            except RequestFailed as exc:
                raise RequestFailed(exc.code, f"{machine}/{name} at {mt}:{path}: {exc}") from None
            except (TimeoutError, LinkClosed) as exc:
                raise refuse(f"master target {mt!r} did not answer: {exc}", ErrorCode.UNREACHABLE) from None
        away_mts = sorted({d.mt or "" for d in forward} - set(ps.mt_sessions))
        if away_mts:
            raise refuse(f"master target {', '.join(away_mts)} (the recovery site) is not connected: start it and "
                         "retry (nothing was changed)", ErrorCode.UNREACHABLE)

    def _targets(self, machine: str, agent: str, location: str, format: str | None, replica_dir: str | None,
                 replicas: dict[str, str] | None, full: bool, existing: bool, away: dict[str, Any],
                 rec: dict[str, DiskRow]) -> tuple[dict[str, str], str, bool]:
        """Where each disk goes at the original site, its format, and whether it is compared (checksum) or
        copied whole."""
        replicas = dict(replicas or {})
        unknown = set(replicas) - set(away)
        if unknown:
            raise refuse(f"{machine} has no disk {', '.join(sorted(unknown))}", ErrorCode.UNKNOWN_DISK)
        for name, a in away.items():
            if rec[name].size != int(a["size"]):
                raise refuse(f"{agent}/{name} has {rec[name].size} bytes, but the replica it was recovered from has "
                             f"{a['size']}: is it the recovered disk?", ErrorCode.SIZE_MISMATCH)
            if rec[name].mt is not None:
                raise refuse(f"{agent}/{name} is already protected (to {rec[name].mt})", ErrorCode.BAD_INPUT)
        if location == "original":
            fmt = format or ReplicaFormat.DEVICE
            targets = {name: replicas.get(name) or str(a["path"]) for name, a in away.items()}
            return targets, fmt, not full
        fmt = format or ReplicaFormat.VMDK
        targets = {}
        for name in away:
            path = replicas.get(name)
            if path is None:
                if replica_dir is None:
                    raise refuse(f"alternate location: give --replica {name}=PATH or --replica-dir",
                                 ErrorCode.BAD_INPUT)
                path = replica_name(replica_dir, machine, name, fmt)
            targets[name] = path
        return targets, fmt, existing and not full

    # -- failback -----------------------------------------------------------------------------------
    async def failback(self, machine: str, action: str = "start", sync: str = "before-shutdown") -> dict[str, Any]:
        trip = self._trip(machine, Direction.REVERSE)
        if action == "cancel":
            return await self._cancel(trip)
        if action == "complete":
            return await self._complete(trip)
        if trip.phase is not Phase.REPROTECTING:
            raise refuse(f"a failback of {machine} is already under way (phase {trip.phase})"
                         + ("; complete it with --complete or cancel it with --cancel"
                            if trip.phase is Phase.SYNCHRONISING else ""))
        disks = self.recovery._disks(trip.active)[0]
        if any(d.replication in (Replication.FAILED_OVER, Replication.COMMITTED) for d in disks):
            raise refuse(f"{machine} is failed over at the original site already: commit it, or fail over again")
        await vmsteps.check_master_target(self.ps, str(trip.data.get("home_mt") or disks[0].mt))
        trip.data["sync"] = sync
        if sync == "before-shutdown":
            self._move(trip, Phase.SYNCHRONISING, "sync before shutdown: the recovered machine keeps running")
            return {"machine": machine, "phase": trip.phase.value, "result": None,
                    "message": f"synchronising {machine} while it runs; when standby status says ready, shut it down "
                               f"and fail over with: standby failback {machine} --complete"}
        # full download: stop first, then copy every block
        self._move(trip, Phase.SHUTTING_DOWN, "full download: the recovered machine stops first")
        # The downtime starts here, not at --complete.
        stopped = {"at": time.time(), "wire": self.ps.wire_bytes(trip.active)}
        try:
            await self._shutdown(trip)
        except RequestFailed:
            self._move(trip, Phase.SYNCHRONISING, "the shutdown step failed")
            self._move(trip, Phase.REPROTECTING, "failback not started")
            raise
        trip.data["stopped"] = stopped
        self._move(trip, Phase.SYNCHRONISING, "full download: every block is copied")
        for d in disks:
            self.ps.request_resync(d, "full", "failback with full download")
        return {"machine": machine, "phase": trip.phase.value, "result": None,
                "message": f"{machine} is stopped and every block is being copied; when standby status says ready, "
                           f"fail over with: standby failback {machine} --complete"}

    async def _shutdown(self, trip: Trip) -> dict[str, Any]:
        agent = self.ps.agent_sessions.get(trip.active)
        if agent is None:
            raise refuse(f"the recovered machine's agent {trip.active!r} is not connected", ErrorCode.UNREACHABLE)
        try:
            return await agent.link.request("shutdown", timeout=SHUTDOWN_TIMEOUT, tag="failback-final")
        except RequestFailed as exc:
            raise RequestFailed(exc.code, f"the shutdown step on {trip.active} failed: {exc}") from None
        except (TimeoutError, LinkClosed) as exc:
            raise refuse(f"the agent {trip.active!r} did not answer the shutdown step: {exc or 'timeout'}",
                         ErrorCode.UNREACHABLE) from None

    async def _complete(self, trip: Trip) -> dict[str, Any]:
        machine = trip.name
        if trip.phase is not Phase.SYNCHRONISING:
            raise refuse(f"{machine}: no failback to complete (phase {trip.phase}); start one with standby failback "
                         f"{machine}")
        why = failback_ready(self.ps, trip)
        if why:
            raise refuse(f"{machine} is not ready to fail back: {why}; see standby status {machine}")
        t0, wire0 = time.time(), self.ps.wire_bytes(trip.active)
        stopped = trip.data.get("stopped") if trip.data.get("sync") == "full" else None
        if stopped:  # a full download: the machine has been down since its shutdown step, the copy came after it
            t0, wire0 = stopped["at"], stopped["wire"]
        self._move(trip, Phase.SHUTTING_DOWN, "the workload stops, the final point is cut")
        try:
            shut = await self._shutdown(trip)
        except RequestFailed as exc:
            self._move(trip, Phase.SYNCHRONISING, f"the shutdown step failed: {exc}")
            raise
        final = {d["disk"]: int(d["sequence"]) for d in shut["disks"]}
        self._move(trip, Phase.FINAL_SYNC, "final points " + ", ".join(f"{k}:{v}" for k, v in final.items()))
        try:
            res = await self.recovery.failover_to(trip.active, final)
        except RequestFailed as exc:
            self._move(trip, Phase.SYNCHRONISING, f"the final sync failed: {exc}")
            raise RequestFailed(exc.code, f"the final sync failed: {exc}; the recovered machine's workload is stopped "
                                          f"(cancel starts it: standby failback {machine} --cancel), or complete "
                                          "again") from None
        downtime = time.time() - t0
        after = self._written_after(trip, final)
        shipped = self.ps.wire_bytes(trip.active) - wire0
        result = {"final": [{"disk": d["disk"], "sequence": d["sequence"], "time": d["time"],
                             "consistency": d["consistency"]} for d in shut["disks"]],
                  "downtime_seconds": round(downtime, 3), "bytes_after_shutdown": shipped,
                  "no_data_loss": not after, "written_after_final": after, "failover": res["disks"],
                  "completed_at": time.time()}
        trip.data["final"] = result
        self._move(trip, Phase.FAILED_BACK,
                   f"downtime {downtime:.1f} s, {shipped} bytes shipped after the shutdown, "
                   + ("no data loss (checked)" if not after else "DATA WRITTEN AFTER THE FINAL POINT"))
        if after:
            msg = (f"{machine} failed over at the original site to its final points, but data arrived after them "
                   f"({'; '.join(after)}): the shutdown did not stop every writer. Do not commit: fail over to a newer "
                   f"point (standby points {machine}) or start the failback again")
        else:
            msg = (f"{machine} failed back with no data loss (checked: no data after the final points); downtime "
                   f"{downtime:.1f} s, {shipped} bytes shipped after the shutdown; make it final with: standby "
                   f"commit {machine}")
        log.warning("failback %s: %s", machine, msg)
        return {"machine": machine, "phase": trip.phase.value, "message": msg, "result": result}

    def _written_after(self, trip: Trip, final: dict[str, int]) -> list[str]:
        """Disks that received a record carrying data after their final point (the workload was not stopped)."""
        out = []
        for d in self.ps.registry.disks(machine=trip.active):
            st = self.ps.streams.get(d.id)
            if st is not None and d.name in final and st.last_data_seq > final[d.name]:
                out.append(f"{d.name}: data in record {st.last_data_seq}, after final point {final[d.name]}")
        return out

    async def _cancel(self, trip: Trip) -> dict[str, Any]:
        machine = trip.name
        if trip.phase is not Phase.SYNCHRONISING:
            raise refuse(f"{machine}: no failback to cancel (phase {trip.phase})"
                         + ("; it is failed over at the original site: commit it, or fail over to another point"
                            if trip.phase is Phase.FAILED_BACK else ""))
        notes = []
        if trip.data.get("sync") == "full":
            inconsistent = [d.name for d in self.ps.registry.disks(machine=trip.active)
                            if d.mt is not None and (d.replication is not Replication.DELTA or d.resync_request)]
            if inconsistent:
                notes.append(f"the original disks are inconsistent ({', '.join(inconsistent)}: the full copy did not "
                             f"finish); it goes on while {trip.active} replicates, and standby failback {machine} "
                             "starts a failback again")
            started = await self._start_workload(trip)
            notes.append(started)
        self._move(trip, Phase.REPROTECTING, "failback cancelled")
        msg = f"failback of {machine} cancelled; {trip.active} goes on replicating to the original site"
        return {"machine": machine, "phase": trip.phase.value, "message": "; ".join([msg, *notes]), "result": None}

    async def _start_workload(self, trip: Trip) -> str:
        agent = self.ps.agent_sessions.get(trip.active)
        if agent is None:
            return f"the agent {trip.active} is not connected: start the workload yourself"
        try:
            res = await agent.link.request("start_workload", timeout=SHUTDOWN_TIMEOUT)
        except (RequestFailed, TimeoutError, LinkClosed) as exc:
            return f"the workload could not be started ({exc}): start it yourself"
        return "the workload was started again" if res["started"] else res["reason"]

    # -- reverse ------------------------------------------------------------------------------------
    async def reverse(self, machine: str) -> dict[str, Any]:
        ps = self.ps
        trip = self._trip(machine, Direction.REVERSE)
        rec = [d for d in ps.registry.disks(machine=trip.active) if d.mt is not None]
        if trip.phase is not Phase.FAILED_BACK or any(d.replication is not Replication.COMMITTED for d in rec):
            raise refuse(f"reverse replication follows a committed failback ({machine}: phase {trip.phase}, "
                         f"{', '.join(f'{d.name} {d.replication}' for d in rec)}): standby failback {machine} "
                         f"--complete, then standby commit {machine}")
        if trip.active in ps.agent_sessions:
            raise refuse(f"the recovered machine's agent {trip.active} is connected: the recovered machine still runs "
                         "and its disks are the replicas reverse replication writes into; shut it down first",
                         ErrorCode.IN_USE)
        away: dict[str, Any] = trip.data["away"]
        mts = {a["mt"] for a in away.values()}
        if len(mts) != 1:
            raise refuse(f"{machine}'s replicas are on several master targets ({sorted(mts)})", ErrorCode.BAD_INPUT)
        mt = mts.pop()
        session = ps.mt_sessions.get(mt)
        if session is None or trip.data["home_mt"] not in ps.mt_sessions:
            raise refuse(f"master targets {mt} and {trip.data['home_mt']} must be connected (nothing was changed)",
                         ErrorCode.UNREACHABLE)
        fmts = {a["format"] for a in away.values()}
        fmt = fmts.pop() if len(fmts) == 1 else ReplicaFormat.VMDK
        targets = {n: (a["replica"], a["format"]) for n, a in away.items()}
        # Replicas that are VMDKs, given to the recovered VM at commit: it lends them to the master target VM.
        lent = await vmsteps.lend_recovered(ps, machine, mt, {n: int(a["size"]) for n, a in away.items()})
        if lent is not None:
            targets, fmt = {n: (path, ReplicaFormat.DEVICE) for n, path in lent.items()}, ReplicaFormat.DEVICE
        try:
            await self._check_recovery_site(machine, session, targets, away)
        except RequestFailed as exc:
            if lent is not None:
                raise await vmsteps.give_back(ps, machine, exc) from None
            raise
        wire = self.ps.wire_bytes(trip.active)
        await unprotect(ps, trip.active)  # the original disks are the machine now: nothing applies to them
        ps.trips.retire(trip.active, f"{machine} failed back to its original site: {trip.active}'s disks are "
                                     "replicas again (reprotect lets it in again)")
        trip.direction, trip.active, trip.trips = Direction.FORWARD, machine, trip.trips + 1
        trip.phase = phase_move(trip.phase, Phase.REVERSING)
        ps.trips.save(trip)
        ps.trips.end(machine, wire)
        ps.trips.begin(machine, Phase.REVERSING, self.ps.wire_bytes(machine), f"{machine} -> {mt} (checksum)")
        res = await protect(ps, machine, mt, fmt, None, {n: path for n, (path, _) in targets.items()}, True)
        log.warning("reverse replication of %s: %s replicates to %s again", machine, machine, mt)
        return {"machine": machine, "mt": mt, "disks": res["disks"]}

    async def _check_recovery_site(self, machine: str, session: Any, targets: dict[str, tuple[str, str]],
                                   away: dict[str, Any]) -> None:
        """RequestFailed unless each replica at the recovery site can be seeded from, and the original
        machine's agent reports disks of the replicas' sizes (it is let in again for that)."""
        for name, a in away.items():
            path, fmt = targets[name]
            try:
                await session.check_replica(path, fmt, int(a["size"]), True)
            except RequestFailed as exc:
                raise RequestFailed(exc.code, f"the recovery site's replica of {name}: {exc}") from None
        self.ps.trips.reinstate(machine)
        orig = await self._agent_disks(machine, set(away))
        for name, a in away.items():
            if orig[name].size != int(a["size"]):
                raise refuse(f"{machine}/{name} has {orig[name].size} bytes, its replica {a['size']}",
                             ErrorCode.SIZE_MISMATCH)
