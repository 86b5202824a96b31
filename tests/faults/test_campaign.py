"""The standing fault campaign (issue 9) in CI: a mixed run of 30 random faults under live workloads.

Environment (all optional):

    STANDBY_FAULT_TRIALS=1000          the long run (default 30)
    STANDBY_FAULT_SEED=N               the schedule's seed (default 20261205; printed and in the report)
    STANDBY_FAULT_KINDS=reset-agent,kill-ps   only these kinds (see tests/faults/faults.py KINDS)
    STANDBY_FAULTS_REPORT=PATH         write the figures as JSON there
    STANDBY_FAULT_STOP_FIRST=1         stop at the first failure (debugging) instead of collecting them all
    STANDBY_FAULT_RECOVER_TIMEOUT=S    how long a disk may take to make a point after a fault (default 60)
    STANDBY_FAULT_STORM_MIB=N          largest storm of incompressible writes (default 96)
    STANDBY_FAULT_CUT_INTERVAL=S       the agents' cut_interval (default 0.5)
    STANDBY_FAULT_BATCH=SIZE           the agents' batch_size (default: the product's)
    STANDBY_FAULT_BUDGET=S             seconds of trials before going to the final checks (default
                                       max(900, 30 * trials)): stalls cost minutes each on a broken tree
    STANDBY_FAULT_CACHE_MIB=N          size of the cache volume (default 128)
    STANDBY_FAULT_RETENTION_MIB=N      size of the retention volume (default 160)
    STANDBY_FAULT_ROTATE=N             a new write-order log every N trials (default 50)
    STANDBY_FAULT_TF_EVERY=N           a src point through test failover every N trials (default 10)
    STANDBY_FAULT_FS_EVERY=N           an fs point through test failover + e2fsck every N trials (default 10)

Run: ``timeout 1800 python3 -m pytest -x -q -s tests/faults/test_campaign.py`` (about 4 minutes when
nothing stalls; SIGTERM from ``timeout`` still cleans up). Against another
source tree (a baseline commit), run it with a Python in whose environment that tree is installed
(``python3 -m venv V && V/bin/pip install -e 'TREE[test]'``, then ``V/bin/python -m pytest ...`` from TREE):
the daemons inherit the interpreter, and the report names the tree that was used.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest

from tests.conftest import needs_loop
from tests.tools import needs

from .campaign import Campaign, Settings, StopCampaign
from .rig import Rig

pytestmark = [needs_loop, needs("mkfs.ext4", "e2fsck", "ss")]


def test_fault_campaign(make_loop, tmp_path: Path) -> None:
    settings = Settings.from_env()
    print(f"fault campaign seed {settings.seed} (rerun with STANDBY_FAULT_SEED={settings.seed})")
    rig = Rig(tmp_path, make_loop, random.Random(settings.seed ^ 0x5EED), agent_options=settings.agent_options,
              volumes=settings.volumes)
    campaign = Campaign(rig, settings)
    stopped = ""

    def terminated(signum: int, _frame: object) -> None:
        # `timeout` (or CI) ends the run with SIGTERM: unwind so that mounts, loop devices and daemons go.
        raise StopCampaign(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        campaign.run()
    except StopCampaign as exc:
        stopped = str(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            rep = campaign.report()
            text = campaign.summary(rep)
            print(text)
            if settings.report is not None:
                settings.report.write_text(json.dumps(rep, indent=2, default=str))
                print(f"report written to {settings.report}")
            if campaign.failures or stopped:
                for key in ("ps", "mt-mt1", "agent-src", "agent-fs"):
                    tail = "\n".join(rig.dep.log_text(key).splitlines()[-40:]) if hasattr(rig, "dep") else ""
                    print(f"----- {key}.log (last 40 lines) -----\n{tail}")
                print(f"logs and replicas: {tmp_path}")
        finally:
            rig.teardown()
    if stopped:
        pytest.fail(f"stopped at the first failure: {stopped}")
    assert not campaign.failures, f"{len(campaign.failures)} failure(s):\n" + "\n".join(
        f.line() for f in campaign.failures
    )
    assert rep["trials"] >= min(settings.trials, 30) and rep["points_judged"] > rep["trials"], (
        "too few trials or points to mean anything"
    )
