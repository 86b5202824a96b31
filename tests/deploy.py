"""The test harness's local deployment: `standby demo`'s (standby.admin.localdeploy: the daemons as separate
processes on 127.0.0.1 with real TLS, driven through their command-line tools) plus what only tests ask
of it. The benchmarks use the demo's: they run as plain scripts, without the tests on their path."""

from __future__ import annotations

import subprocess
from typing import Any

from standby.admin import localdeploy
from standby.plumbing.config import load_toml, save_toml


class LocalDeployment(localdeploy.LocalDeployment):
    def set_ps_option(self, **options: Any) -> None:
        """Change ps.toml (takes effect at the process server's next start)."""
        conf = self.ps_dir / "ps.toml"
        raw = load_toml(conf)
        raw.update(options)
        save_toml(conf, raw)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`standby ARGS` as the deployment's admin; the result whatever the exit code."""
        return self.run("admin", "--admin", str(self.ps_dir / "admin"), "--server", self.server, *args, check=False,
                        timeout=timeout)

    def set_mt_config(self, mt: str, **options: Any) -> None:
        """Change top-level keys of mt.toml (takes effect at the master target's next start)."""
        conf = self.root / f"mt-{mt}" / "mt.toml"
        raw = load_toml(conf)
        raw.update(options)
        save_toml(conf, raw)
