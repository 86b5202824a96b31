"""Recovery requests of the configuration service: list points, fail over, commit, test failover and its
cleanup, app-consistent points on demand. The process server picks the point of each disk (it sees
the whole machine) and relays the work to the master target and the agent.

Choosing points (`choose`, pure): `latest` and `latest-processed` take each disk's newest point (for
`latest` after the cache was drained into the replicas), `latest-app` the newest app-consistent one,
`at` the newest at or before a time, and a point id (`SEQ`, or `DISK:SEQ` on a machine with several
disks) that point — the other disks of the machine then take their newest point at or before its time.
Points are per disk: disks of one machine are each crash-consistent, not consistent as a group
(consistency groups come later).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from standby.plumbing import failpoints
from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import LinkClosed
from standby.proto.enums import Consistency, ErrorCode
from standby.proto.mt_requests import DiskHistory, PointInfo, PointList
from standby.proto.states import FAILED_OVER, Replication
from standby.proto.wire import BadRequest

from .hub import Hub, MTPeer
from .registry import DiskRow
from .vmsteps import hand_over

log = logging.getLogger("standby.ps.recovery")
DRAIN_TIMEOUT = 900.0
LONG = 6 * 3600.0  # a rollback or a copy of a large disk may take long: the master target reports its end


class ChoiceError(Exception):
    pass


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def choose(points: dict[str, list[PointInfo]], point: str | None, at: float | None) -> dict[str, PointInfo]:
    """The point each disk goes to. `points`: disk name -> listed points (oldest first)."""
    if (point is None) == (at is None):
        raise ChoiceError("give exactly one of --point and --at")
    for disk, pts in points.items():
        if not pts:
            raise ChoiceError(f"disk {disk} has no recovery point yet")
    if at is not None:
        return {d: _at(d, pts, at) for d, pts in points.items()}
    assert point is not None
    if point in ("latest", "latest-processed"):
        return {d: pts[-1] for d, pts in points.items()}
    if point == "latest-app":
        out = {}
        for d, pts in points.items():
            app = [p for p in pts if p.consistency is Consistency.APP]
            if not app:
                raise ChoiceError(f"disk {d} has no app-consistent point in its retention window "
                                  "(make one with: standby app-point MACHINE)")
            out[d] = app[-1]
        return out
    disk, sep, seq_text = point.rpartition(":")
    if not sep:
        if len(points) != 1:
            raise ChoiceError(f"point ids of a machine with several disks are DISK:SEQ (disks: {', '.join(points)})")
        disk = next(iter(points))
    if disk not in points:
        raise ChoiceError(f"no disk {disk!r} (disks: {', '.join(points)})")
    if not re.fullmatch(r"[0-9]+", seq_text):
        raise ChoiceError(
            f"not a point: {point!r} (latest, latest-processed, latest-app, or an id from standby points)"
        )
    chosen = next((p for p in points[disk] if p.sequence == int(seq_text)), None)
    if chosen is None:
        raise ChoiceError(f"disk {disk} has no recovery point {seq_text} (see: standby points)")
    out = {d: _at(d, pts, chosen.time) for d, pts in points.items() if d != disk}
    out[disk] = chosen
    return out


def future_at(at: float | None, now: float) -> str | None:
    """Why `--at` names no point, when it is after `now`: "the newest point at or before it" would silently
    be the newest point now, and another one a moment later."""
    if at is None or at <= now:
        return None
    return (f"--at {_when(at)} is in the future (the process server's clock says {_when(now)}): give an earlier "
            "time, or --point latest-processed for the newest point")


def _at(disk: str, pts: list[PointInfo], at: float) -> PointInfo:
    before = [p for p in pts if p.time <= at]
    if not before:
        raise ChoiceError(f"disk {disk} has no recovery point at or before {_when(at)}; its oldest is "
                          f"{_when(pts[0].time)}")
    return before[-1]


def _shown(p: PointInfo) -> dict[str, str]:
    """What a failover's answer says of the chosen point beside the master target's reply."""
    return {"consistency": p.consistency.value, "tag": p.tag}


def protected_disks(ps: Hub, machine: str) -> list[DiskRow]:
    """The machine's protected disks; a clear refusal for an unknown machine or one with none. A machine on a
    round trip is named by its original name in either direction: without protected disks of its own, the
    round trip's active agent identity answers."""
    disks = [d for d in ps.registry.disks(machine=machine) if d.mt is not None]
    if not disks and ps.active_identity(machine) != machine:
        disks = [d for d in ps.registry.disks(machine=ps.active_identity(machine)) if d.mt is not None]
    if not disks:
        m = ps.registry.machine(machine)
        if m is None or m["role"] != "agent":
            raise RequestFailed(ErrorCode.UNKNOWN_MACHINE, f"unknown machine {machine!r}")
        raise RequestFailed(ErrorCode.BAD_INPUT, f"machine {machine!r} has no protected disk")
    return disks


class RecoveryAdmin:
    """The recovery half of the admin session (see admin.AdminSession)."""

    def __init__(self, ps: Hub) -> None:
        self.ps = ps

    def _disks(self, machine: str) -> tuple[list[DiskRow], MTPeer]:
        disks = protected_disks(self.ps, machine)
        mts = {d.mt for d in disks}
        if len(mts) != 1:
            raise RequestFailed(ErrorCode.BAD_INPUT,
                                f"machine {machine!r} has disks on several master targets: {sorted(mts)}")
        mt = disks[0].mt or ""
        session = self.ps.mt_sessions.get(mt)
        if session is None:
            raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {mt!r} is not connected: start it and retry")
        return disks, session

    async def _mt(self, session: MTPeer, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        try:
            return await session.link.request(op, timeout=timeout, **args)
        except RequestFailed as exc:
            raise RequestFailed(exc.code, str(exc)) from None
        except (TimeoutError, LinkClosed) as exc:
            raise RequestFailed(ErrorCode.UNREACHABLE,
                                f"master target {session.name!r} did not answer: {exc or 'timeout'}") from None

    async def _points(self, disks: list[DiskRow], session: MTPeer) -> dict[str, dict[str, Any]]:
        return {d.name: await self._mt(session, "points", disk=d.id) for d in disks}

    async def _note_history(self, d: DiskRow, session: MTPeer) -> None:
        """Status at once, not at the master target's next report: the failover (point, committed) it names
        must never be the one before this request's."""
        try:
            listed = PointList.from_wire(await self._mt(session, "points", disk=d.id), ErrorCode.BAD_REPLY)
        except (RequestFailed, BadRequest) as exc:  # the failover is done: status catches up at the next report
            log.warning("disk %s: no fresh history after the failover: %s", d.label, exc)
            return
        st = self.ps.open_stream(d)
        st.mt_report = {**st.mt_report, **DiskHistory.of(listed).to_wire()}

    async def points(self, machine: str) -> dict[str, Any]:
        disks, session = self._disks(machine)
        listed = await self._points(disks, session)
        out = [{**res, "disk": name, "disk_id": res["disk"]} for name, res in listed.items()]
        trip = self.ps.trips.get(machine)
        where = {"direction": trip.direction.value, "phase": trip.phase.value, "active": trip.active} if trip else None
        return {"machine": machine, "disks": out, "roundtrip": where}

    async def _drain(self, disks: list[DiskRow], hold: bool) -> None:
        """Wait until everything the process server held at the start of the request is applied. With
        `hold`, nothing newer is forwarded (the failover stops there)."""
        fences = {}
        held = []
        for d in disks:
            st = self.ps.open_stream(d)
            fences[d.id] = st.received_seq
            if hold:
                if not st.pause:
                    held.append(st)
                # An operator's pause included: everything received so far is applied, nothing newer.
                st.pause, st.paused_at = True, max(st.received_seq, st.applied_seq)
                st.resumed.set()
        try:
            await self._wait_applied(disks, fences)
        except RequestFailed:
            for st in held:  # the failover did not happen: replication goes on as before
                st.pause, st.paused_at = False, 0
                st.resumed.set()
            raise

    async def _wait_applied(self, disks: list[DiskRow], fences: dict[int, int],
                            otherwise: str = ", or fail over to latest-processed") -> None:
        """Wait until each disk has applied up to its fence; `otherwise`: what else the operator may do."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        mt = disks[0].mt or ""
        while any(self.ps.open_stream(d).applied_seq < fences[d.id] for d in disks):
            left = sum(fences[d.id] - self.ps.open_stream(d).applied_seq for d in disks)
            if mt not in self.ps.mt_sessions:
                raise RequestFailed(ErrorCode.UNREACHABLE,
                                    f"master target {mt!r} went away with {left} record(s) still to apply; "
                                    f"start it and retry{otherwise}")
            if time.monotonic() > deadline:
                raise RequestFailed(ErrorCode.FAILED, f"the master target did not apply the cached records within "
                                    f"{DRAIN_TIMEOUT:.0f} s ({left} left); retry{otherwise}")
            await asyncio.sleep(0.1)

    def _choose(self, listed: dict[str, dict[str, Any]], point: str | None, at: float | None) -> dict[str, PointInfo]:
        """The point of each disk, from the master target's `points` replies (already checked by the link)."""
        try:
            return choose({d: PointList.from_wire(r, ErrorCode.BAD_REPLY).points for d, r in listed.items()}, point, at)
        except ChoiceError as exc:
            raise RequestFailed(ErrorCode.BAD_INPUT, str(exc)) from None

    @staticmethod
    def _check_choice(point: str | None, at: float | None) -> None:
        """Before anything moves: exactly one of point and at, and at not in the future."""
        if (point is None) == (at is None):
            raise RequestFailed(ErrorCode.BAD_INPUT, "give exactly one of --point and --at")
        why = future_at(at, time.time())
        if why is not None:
            raise RequestFailed(ErrorCode.BAD_INPUT, why)

    async def failover(self, machine: str, point: str | None = None, at: float | None = None) -> dict[str, Any]:
        disks, session = self._disks(machine)
        self._check_choice(point, at)
        if point == "latest" and any(d.replication in FAILED_OVER for d in disks):
            raise RequestFailed(ErrorCode.BAD_INPUT,
                                f"{machine} is already failed over: 'latest' would drain nothing; use "
                                "latest-processed or a point")
        if any(d.replication is Replication.COMMITTED for d in disks):
            raise RequestFailed(ErrorCode.REFUSED, f"{machine}: the failover was committed")
        if point == "latest":
            await self._drain(disks, hold=True)
        self._hold(disks, session)
        chosen = self._choose(await self._points(disks, session), point, at)
        return await self._fail_over(machine, disks, session, chosen)

    def _hold(self, disks: list[DiskRow], session: MTPeer) -> None:
        """Stop forwarding now: the master target stops applying at once."""
        for d in disks:
            st = self.ps.open_stream(d)
            if not st.pause or not st.paused_at:
                st.pause, st.paused_at = True, max(st.applied_seq, 1)
            session.stop_sender(d.id)

    async def failover_to(self, machine: str, sequences: dict[str, int]) -> dict[str, Any]:
        """Fail over to exactly these points (disk name -> sequence), once each is applied: the final points
        of a planned failback (processserver.roundtrip)."""
        disks, session = self._disks(machine)
        before = {d.id: (self.ps.open_stream(d).pause, self.ps.open_stream(d).paused_at) for d in disks}
        for d in disks:  # forward up to the point, nothing after it
            st = self.ps.open_stream(d)
            st.pause, st.paused_at = True, sequences[d.name]
            st.resumed.set()
        try:
            await failpoints.stall("ps.final_sync")
            await self._wait_applied(disks, {d.id: sequences[d.name] for d in disks}, otherwise="")
            self._hold(disks, session)
            listed = await self._points(disks, session)
            chosen = {}
            for name, res in listed.items():
                pts = {p.sequence: p for p in PointList.from_wire(res, ErrorCode.BAD_REPLY).points}
                if sequences[name] not in pts:
                    raise RequestFailed(ErrorCode.FAILED, f"disk {name}: point {sequences[name]} is not in the "
                                                          "master target's history")
                chosen[name] = pts[sequences[name]]
        except RequestFailed:
            # No failover: applying goes on past this final point, or the records that arrive meanwhile
            # (idle epochs, too) would pile up behind it and the failback never be ready to complete again.
            for d in disks:  # as it was before (an operator's pause stays)
                st = self.ps.open_stream(d)
                st.pause, st.paused_at = before[d.id]
                st.resumed.set()
            raise
        return await self._fail_over(machine, disks, session, chosen)

    async def _fail_over(self, machine: str, disks: list[DiskRow], session: MTPeer,
                         chosen: dict[str, PointInfo]) -> dict[str, Any]:
        out = []
        for d in disks:
            res = await self._mt(session, "failover", timeout=LONG, disk=d.id, sequence=chosen[d.name].sequence)
            if d.replication is Replication.FAILED_OVER:
                log.info("disk %s: failed over again, to point %d", d.label, res["sequence"])
            # A resync asked for before would be refused for ever (hub.no_resync): it goes with the failover.
            self.ps.registry.move(d, Replication.FAILED_OVER, f"failed over to point {res['sequence']}", paused=1,
                                  resync_request=None)
            self.ps.open_stream(d).failed_over = True
            await self._note_history(d, session)
            out.append({**res, "disk": d.name, "disk_id": d.id, **_shown(chosen[d.name])})
        return {"machine": machine, "disks": out}

    async def commit(self, machine: str, vm: str | None = None, vm_name: str | None = None,
                     power_on: bool = False) -> dict[str, Any]:
        """Make the failover final; when the replicas are VMDKs on a master-target VM, then hand them to the
        machine's VM in vSphere (vmsteps.hand_over: `vm` alternate or original, `vm_name`, `power_on`). A
        commit whose vSphere step failed is run again by the same command: the disks already committed and
        released by the master target are not committed again."""
        disks, session = self._disks(machine)
        if not all(d.replication in FAILED_OVER for d in disks):
            raise RequestFailed(ErrorCode.REFUSED, f"{machine} is not failed over: run standby failover first")
        identity = disks[0].machine
        in_vsphere = {d.disk for d in self.ps.vmdisks.disks(identity) if d.at_mt}
        out = []
        for d in disks:
            if d.replication is Replication.COMMITTED and d.name in in_vsphere:
                out.append({"disk": d.name, "disk_id": d.id, "sequence": d.applied_seq, "time": 0,
                            "replica": d.replica_path})
                continue  # committed and released by an earlier try whose vSphere step failed
            res = await self._mt(session, "failover_commit", timeout=LONG, disk=d.id)
            self.ps.registry.move(d, Replication.COMMITTED, "failover committed")
            await self._note_history(d, session)
            out.append({**res, "disk": d.name, "disk_id": d.id})
        log.info("%s: failover committed", machine)
        done = await hand_over(self.ps, identity, disks, vm, vm_name, power_on)
        return {"machine": machine, "disks": out, **({"vm": done} if done else {})}

    async def test_failover(
        self, machine: str, point: str | None = None, at: float | None = None, directory: str | None = None
    ) -> dict[str, Any]:
        disks, session = self._disks(machine)
        self._check_choice(point, at)
        if point == "latest":
            await self._drain(disks, hold=False)
        chosen = self._choose(await self._points(disks, session), point, at)
        out = []
        for d in disks:
            res = await self._mt(session, "test_failover", timeout=LONG, disk=d.id,
                                 sequence=chosen[d.name].sequence, directory=directory)
            out.append({**res, "disk": d.name, "disk_id": d.id, **_shown(chosen[d.name]),
                        "replication": d.replication.value})
        return {"machine": machine, "disks": out}

    async def test_failover_cleanup(self, machine: str) -> dict[str, Any]:
        disks, session = self._disks(machine)
        out = [{**await self._mt(session, "test_failover_cleanup", disk=d.id), "disk": d.name} for d in disks]
        return {"machine": machine, "disks": out}

    async def app_point(self, machine: str, tag: str = "") -> dict[str, Any]:
        disks, _ = self._disks(machine)
        if any(d.replication in FAILED_OVER for d in disks):
            raise RequestFailed(ErrorCode.REFUSED, f"{machine} is failed over: no new points")
        agent = self.ps.agent_sessions.get(self.ps.active_identity(machine))
        if agent is None:
            raise RequestFailed(ErrorCode.UNREACHABLE, f"the agent of {machine!r} is not connected")
        try:
            res = await agent.link.request("app_point", timeout=300.0, tag=tag)
        except RequestFailed as exc:
            raise RequestFailed(exc.code, f"{machine}: {exc}") from None
        except (TimeoutError, LinkClosed) as exc:
            raise RequestFailed(ErrorCode.UNREACHABLE,
                                f"the agent of {machine!r} did not answer: {exc or 'timeout'}") from None
        return {"machine": machine, **res}
