"""Every decoder of peer and disk input, fuzzed in process (issue 9): the CI budget of each target, or a
share of STANDBY_FUZZ_INPUTS in a long run. A target fails when anything but its documented error escapes,
when an input runs over the hang bound, or when a result breaks its contract; the failure lists each
distinct bug once, with the file holding its minimal reproducer."""

from __future__ import annotations

import pytest

from . import disk_targets, engine, wire_targets

ALL = wire_targets.TARGETS + disk_targets.TARGETS


@pytest.mark.parametrize("target", ALL, ids=[t.name for t in ALL])
def test_decoder(target: engine.Target) -> None:
    res = engine.run_target(target, engine.budget(target, ALL))
    print(engine.report(res))
    assert res.refused + res.accepted + sum(f.count for f in res.findings.values()) == res.inputs
    # The mutations must reach the parser's checks, and the seeds must decode: else the target proves nothing.
    assert res.accepted > 0, f"{target.name}: no input was accepted, not even the valid seeds"
    assert not res.findings, f"{target.name}: {len(res.findings)} distinct failure(s):\n" + "\n".join(
        f.line() for f in res.findings.values()
    )
