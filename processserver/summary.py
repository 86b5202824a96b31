"""The process server in one line, for systemd's STATUS= (`systemctl status standby-ps`): how many disks
replicate and the worst RPO among them, the disks in other states, the disks with an error, and who is
connected — e.g. `3 disks replicating, worst RPO 0.6 s; 1 agent, 1 master target connected`.

The RPO is status's (admin.py): now minus the newest point the master target applied; disks failed over
have none.
"""

from __future__ import annotations

import time

from standby.proto.states import FAILED_OVER, Replication

from .health import ERROR
from .hub import Hub

# How each replication state is counted, in the order the line names them.
WORDS = {
    Replication.INITIAL: "in initial replication",
    Replication.RESYNC: "resyncing",
    Replication.FAILED_OVER: "failed over",
    Replication.COMMITTED: "committed",
    Replication.OFF: "not protected",
}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def summary(hub: Hub, now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = hub.registry.disks()
    delta = [r for r in rows if r.replication is Replication.DELTA]
    parts: list[str] = []
    if delta:
        rpos = [now - r.last_point_at for r in delta if r.last_point_at]
        worst = f", worst RPO {seconds(max(rpos))}" if rpos else ", no point yet"
        parts.append(f"{plural(len(delta), 'disk')} replicating{worst}")
    for state, word in WORDS.items():
        n = sum(1 for r in rows if r.replication is state)
        if n:
            parts.append(f"{plural(n, 'disk') if not parts else n} {word}")
    failing = sum(1 for r in rows if (st := hub.streams.get(r.id)) is not None and st.health.texts(ERROR)
                  and r.replication not in FAILED_OVER)
    if failing:
        parts.append(f"{failing} with an error (standby status)")
    disks = ", ".join(parts) if parts else "no disks"
    peers = f"{plural(len(hub.agent_sessions), 'agent')}, {plural(len(hub.mt_sessions), 'master target')} connected"
    return f"{disks}; {peers}"
