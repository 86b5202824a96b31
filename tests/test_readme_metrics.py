"""README's Prometheus examples are valid: promtool accepts its alerting rules, and every metric name it
lists is one a daemon exposes (the collectors' own tests check the pages)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.tools import needs

ROOT = Path(__file__).resolve().parent.parent
SECTION = (ROOT / "README.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]


@needs("promtool")
def test_the_alert_rules_pass_promtool(tmp_path: Path):
    (rules,) = [b for b in re.findall(r"```yaml\n(.*?)```", SECTION, re.S) if b.startswith("groups:")]
    (tmp_path / "rules.yml").write_text(rules)
    res = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_metric_named_is_exposed_by_some_collector():
    source = "".join((ROOT / d / "metrics.py").read_text() for d in ("processserver", "mastertarget", "agent"))
    for name in set(re.findall(r"`(standby_[a-z_]+?)(?:_total)?[`{]", SECTION)):
        base = re.sub(r"_(sum|count)$", "", name)
        assert f'"{base}"' in source, f"README names {name}, which no collector exposes"
