"""The fuzz summary at the end of the pytest run: inputs and rate per target, distinct failures with their
reproducer files, hangs. Printed whether or not the tests passed (a failing fuzz test is a finding)."""

from __future__ import annotations

from typing import Any

from . import engine


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not engine.RESULTS and not engine.SESSION_RESULTS:
        return
    tr = terminalreporter
    title = f"fuzz summary (seed {engine.SEED}, hang bound {engine.HANG_SECONDS} s)"
    tr.section(title)
    lines = []
    total = 0
    for r in engine.RESULTS:
        total += r.inputs
        lines.append(engine.report(r))
    for s in engine.SESSION_RESULTS:
        total += s["inputs"]
        lines.append(engine.session_line(s))
        lines += [f"    {f}" for f in s["findings"]]
    failures = sum(len(r.findings) for r in engine.RESULTS) + sum(len(s["findings"]) for s in engine.SESSION_RESULTS)
    lines.append(f"total inputs: {total}; distinct failures: {failures}; reproducers under {engine.FINDINGS_DIR}")
    for line in lines:
        tr.write_line(line)
    engine.FINDINGS_DIR.mkdir(parents=True, exist_ok=True)
    (engine.FINDINGS_DIR / "summary.txt").write_text(title + "\n" + "\n".join(lines) + "\n")
