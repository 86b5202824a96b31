"""The failback's shutdown step on the agent (agent.shutdown): the shutdown script stops the workload, the
final point is cut without the pre- and post-script (the workload must stay stopped), a failed script
cuts no point, a disk without a final point fails the step, and a cancelled failback starts the workload
again with start_script."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from standby.agent.appoint import AppPointFailed
from standby.agent.shutdown import ShutdownStep

from .test_delta_points import Harness, script


async def run_step(h: Harness, step: ShutdownStep) -> dict[str, Any]:
    """The step while the disk is in delta replication (its Shipper runs), as in the agent."""
    task = asyncio.create_task(h.shipper.run(0, 1))
    poll = asyncio.Event()
    poller = asyncio.create_task(h.tracking.run(poll))
    try:
        for _ in range(100):
            if h.rd.shipper is not None:
                break
            await asyncio.sleep(0.01)
        return await step.shutdown()
    finally:
        poll.set()
        task.cancel()
        await asyncio.gather(task, poller, return_exceptions=True)


def test_the_shutdown_script_runs_then_the_final_point_without_pre_and_post(tmp_path: Path) -> None:
    log = tmp_path / "scripts.log"
    hooks = {k: script(tmp_path / k, f'echo "$STANDBY_PHASE $STANDBY_TAG" >> {log}')
             for k in ("pre_script", "post_script", "shutdown_script")}
    h = Harness(tmp_path, **hooks)
    h.tracker.write(100, 200, 0, 4096)
    res = asyncio.run(run_step(h, ShutdownStep(h.cfg, h.app_points)))
    assert log.read_text().splitlines() == ["shutdown failback-final"]  # neither pre nor post: stays stopped
    [entry] = res["disks"]
    [marker] = h.link.markers()
    assert entry["sequence"] == marker.sequence and marker.meta["tag"] == "failback-final"
    # Nothing mounted, but the script quiesced the machine: no "nothing was quiesced" lesser reason.
    assert entry["reason"] == "" and res["shutdown_script"] == str(hooks["shutdown_script"])
    assert h.builder.reads == [[(0, 4096)]]  # the last write before the shutdown is in the final epoch


def test_without_a_script_the_final_point_says_nothing_was_quiesced(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    res = asyncio.run(run_step(h, ShutdownStep(h.cfg, h.app_points)))
    [entry] = res["disks"]
    assert entry["sequence"] and entry["consistency"] == "crash-consistent"
    assert "nothing was quiesced" in entry["reason"] and res["shutdown_script"] is None


def test_a_failing_shutdown_script_cuts_no_point(tmp_path: Path) -> None:
    stop = script(tmp_path / "stop", "echo the database would not stop; exit 4")
    h = Harness(tmp_path, shutdown_script=stop)
    with pytest.raises(AppPointFailed, match="the database would not stop.*no final point was cut"):
        asyncio.run(run_step(h, ShutdownStep(h.cfg, h.app_points)))
    assert h.link.markers() == []


def test_no_disk_in_delta_replication_is_no_final_point(tmp_path: Path) -> None:
    h = Harness(tmp_path)  # its Shipper is not running: the disk is not in delta replication
    with pytest.raises(AppPointFailed, match="no disk is in delta replication"):
        asyncio.run(ShutdownStep(h.cfg, h.app_points).shutdown())


def test_a_cancelled_failback_starts_the_workload_again(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert asyncio.run(ShutdownStep(h.cfg, h.app_points).start()) == {
        "started": False, "reason": "no start_script in agent.toml: start the workload yourself"}
    mark = tmp_path / "started"
    h = Harness(tmp_path, start_script=script(tmp_path / "start", f'echo "$STANDBY_PHASE" > {mark}'))
    assert asyncio.run(ShutdownStep(h.cfg, h.app_points).start()) == {"started": True, "reason": ""}
    assert mark.read_text() == "start\n"
    h = Harness(tmp_path, start_script=script(tmp_path / "start2", "exit 1"))
    with pytest.raises(AppPointFailed, match="start"):
        asyncio.run(ShutdownStep(h.cfg, h.app_points).start())
