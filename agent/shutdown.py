"""The recovered machine's part of a planned failback (issue 12): the shutdown step, and starting the
workload again when the operator cancels the failback after it.

The shutdown step, asked by the process server at `standby failback --complete`:

1. the shutdown script (`shutdown_script`, STANDBY_PHASE=shutdown) stops the workload: every writer of
   the protected disks. If it fails, nothing more is done and the reply says so: the workload may be half
   stopped, and the operator decides (cancel starts it again; complete tries again);
2. the final point: flush, freeze, cut every disk at once, thaw — agent.appoint's app-consistent point,
   without the pre- and post-script (the workload must stay stopped, not be resumed by a post-script);
3. every disk must have its final point; the reply names each one's sequence. That the point is after the
   last write is checked where the records arrive (the process server: no data after the final point).

The machine keeps replicating after the step: a write that comes anyway (the script did not stop every
writer) travels as usual, and the process server refuses to call the failback lossless.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from standby.proto.enums import ErrorCode

from .appoint import AppPointFailed, AppPoints
from .freeze import ScriptFailed, run_script

if TYPE_CHECKING:
    from .config import AgentConfig

log = logging.getLogger("standby.agent.shutdown")
FINAL_TAG = "failback-final"


class ShutdownStep:
    def __init__(self, cfg: AgentConfig, points: AppPoints) -> None:
        self.cfg = cfg
        self.points = points

    async def shutdown(self, tag: str = FINAL_TAG) -> dict[str, Any]:
        """Stop the workload and cut the final point of every disk (see the module's docstring)."""
        cfg = self.cfg
        ran = False
        if cfg.shutdown_script is not None:
            try:
                out = await asyncio.to_thread(run_script, cfg.shutdown_script, "shutdown", tag, cfg.script_timeout)
            except ScriptFailed as exc:
                raise AppPointFailed(f"{exc}; no final point was cut (the workload may be partly stopped)") from None
            ran = True
            log.warning("shutdown step: %s stopped the workload%s", cfg.shutdown_script,
                        f": {out.strip()[-500:]}" if out.strip() else "")
        quiesced = f"the workload was stopped by {cfg.shutdown_script}" if ran else ""
        res = await self.points.make(tag, scripts=False, quiesced=quiesced)
        missing = [d for d in res["disks"] if not d.get("sequence")]
        if missing:
            why = "; ".join(f"{d['disk']}: {d.get('reason') or 'no point'}" for d in missing)
            raise AppPointFailed(f"no final point for every disk ({why}); the workload stays stopped: "
                                 "complete the failback again, or cancel it to start the workload")
        for d in res["disks"]:
            log.warning("shutdown step: final point of disk %s is sequence %d (%s); the workload stays stopped",
                        d["disk"], d["sequence"], d["consistency"])
        return {**res, "shutdown_script": str(cfg.shutdown_script) if ran else None}

    async def start(self) -> dict[str, Any]:
        """A failback cancelled after the shutdown step: start the workload again (start_script)."""
        cfg = self.cfg
        if cfg.start_script is None:
            return {"started": False, "reason": "no start_script in agent.toml: start the workload yourself"}
        try:
            await asyncio.to_thread(run_script, cfg.start_script, "start", "", cfg.script_timeout)
        except ScriptFailed as exc:
            raise AppPointFailed(str(exc), ErrorCode.FAILED) from None
        log.warning("failback cancelled: %s started the workload again", cfg.start_script)
        return {"started": True, "reason": ""}
