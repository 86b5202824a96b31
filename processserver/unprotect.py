"""The admin's `unprotect` and `forget`: ending a machine's protection, and revoking an enrolled identity.

Unprotect, in an order that no peer can undo halfway: the disks are first unassigned in the registry (a
disk_open now says "not protected", an assignment list no longer names them), then the agent's session
is closed (it reconnects, finds its disks unprotected and stops tracking and sending them), then each
master target stops its senders and releases the disks (stops applying; keeps the replicas and retention
journals unless the operator said --delete-replicas), and last the disks' caches and registry rows go.
The master targets must be connected: without them nothing is changed, so nothing is left half done.

Forget removes a machine's enrollment (its certificate is no longer current: its next connection is
refused with the reason) and closes its session; refused while it is still protected (an agent) or still
holds replicas (a master target), so an identity is never forgotten with replication depending on it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any

from standby.plumbing.errors import RequestFailed
from standby.plumbing.link import LinkClosed
from standby.proto.enums import ErrorCode, GoodbyeCode

from . import vmsteps
from .hub import Hub
from .recovery import protected_disks
from .registry import DiskRow

log = logging.getLogger("standby.ps.admin")
RELEASE_TIMEOUT = 120.0  # a master target stops its apply (a write under way finishes) and deletes files
SESSION_END_TIMEOUT = 10.0


async def _end_session(ps: Hub, machine: str, code: GoodbyeCode, reason: str) -> None:
    """Close the machine's agent session, if any, and wait until it is gone (its writers stopped)."""
    agent = ps.agent_sessions.get(machine)
    if agent is None:
        return
    await agent.link.close(code, reason)
    for _ in range(int(SESSION_END_TIMEOUT / 0.05)):
        if ps.agent_sessions.get(machine) is not agent:
            return
        await asyncio.sleep(0.05)


def _drop_disk(ps: Hub, d: DiskRow) -> None:
    """The disk's cache and registry row go (nothing is left to apply: the disk is not protected)."""
    st = ps.streams.pop(d.id, None)
    if st is not None:
        st.cache.close()
    try:
        shutil.rmtree(ps.cfg.cache_dir / f"disk-{d.id}")
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("disk %s: its cache %s could not be removed: %s (remove it by hand)", d.label,
                  ps.cfg.cache_dir / f"disk-{d.id}", exc)
    ps.registry.remove_disk(d.id)


async def unprotect(ps: Hub, machine: str, delete_replicas: bool = False) -> dict[str, Any]:
    disks = protected_disks(ps, machine)
    by_mt: dict[str, list[DiskRow]] = {}
    for d in disks:
        by_mt.setdefault(d.mt or "", []).append(d)
    away = sorted(mt for mt in by_mt if mt not in ps.mt_sessions)
    if away:
        raise RequestFailed(ErrorCode.UNREACHABLE, f"master target {', '.join(away)} is not connected: start it "
                                                   f"and retry (nothing was changed)")
    for d in disks:
        ps.registry.update_disk(d.id, mt=None, wrapped_key=None)
    log.warning("unprotecting %s (%d disk(s)); replicas %s", machine, len(disks),
                "deleted" if delete_replicas else "kept")
    await _end_session(ps, machine, GoodbyeCode.UNPROTECTED,
                       f"the operator unprotected {machine}: reconnect to learn it")
    await ps.appends_done()  # before the caches close
    out: list[dict[str, Any]] = []
    problems: list[str] = []
    for mt, rows in by_mt.items():
        session = ps.mt_sessions.get(mt)
        for d in rows:
            if session is not None:
                session.stop_sender(d.id)
        try:
            if session is None:
                raise LinkClosed("disconnected")
            res = await session.link.request("release", RELEASE_TIMEOUT, disks=[d.id for d in rows],
                                             delete=delete_replicas)
        except (RequestFailed, LinkClosed, TimeoutError) as exc:
            problems.append(f"master target {mt} did not release {', '.join(d.name for d in rows)}: {exc}")
            res = {"disks": []}
        got = {r["disk"]: r for r in res["disks"]}
        for d in rows:
            r = got.get(d.id, {})
            out.append({"disk": d.name, "mt": mt, "replica": r.get("replica", d.replica_path),
                        "journal": r.get("journal"), "removed": list(r.get("removed", []))})
    try:
        vmdks = await vmsteps.let_go(ps, machine, delete_replicas)
    except RequestFailed as exc:
        problems.append(str(exc))
        vmdks = {}
    out = [{**o, **({"vmdk": vmdks[o["disk"]]} if o["disk"] in vmdks else {})} for o in out]
    for d in disks:
        _drop_disk(ps, d)
    if problems:
        raise RequestFailed(ErrorCode.FAILED, f"{machine} is no longer protected, but " + "; ".join(problems)
                            + " (its state there remains: the disks are not applied, the files are kept)")
    return {"machine": machine, "disks": out}


async def forget(ps: Hub, machine: str) -> dict[str, Any]:
    m = ps.registry.machine(machine)
    if m is None:
        known = ", ".join(x["name"] for x in ps.registry.machines()) or "none"
        raise RequestFailed(ErrorCode.UNKNOWN_MACHINE, f"unknown machine {machine!r} (enrolled: {known})")
    if m["role"] == "agent":
        if any(d.mt is not None for d in ps.registry.disks(machine=machine)):
            raise RequestFailed(ErrorCode.REFUSED, f"{machine} is still protected: run 'standby unprotect "
                                                   f"{machine}' first (replicas are kept unless you ask)")
    else:
        held = sorted({d.machine for d in ps.registry.disks(mt=machine)})
        if held:
            raise RequestFailed(ErrorCode.REFUSED, f"master target {machine} still holds the replicas of "
                                                   f"{', '.join(held)}: unprotect those machines first")
    ps.registry.remove_machine(machine)
    reason = f"the operator forgot {machine}: enroll it again to connect"
    if m["role"] == "agent":
        await _end_session(ps, machine, GoodbyeCode.FORBIDDEN, reason)
        for d in ps.registry.disks(machine=machine):
            _drop_disk(ps, d)
    else:
        session = ps.mt_sessions.get(machine)
        if session is not None:
            await session.link.close(GoodbyeCode.FORBIDDEN, reason)
    log.warning("forgot %s %s: its certificate is no longer accepted", m["role"], machine)
    return {}
