"""Where each daemon's CPU goes during a benchmark: py-spy sampling every daemon at once, summarised per
daemon as the functions with the most samples (self: the function itself, including the C it calls
that releases the GIL, such as zstd, AES or a write; inclusive: the function and what it calls).

    with Profiler(out_dir) as prof:        # no-op (and says so) when py-spy is not installed
        prof.attach("agent", pid)
        ... the measured phase ...
    summary = prof.summary()               # also written to out_dir/<phase>.profile.json

py-spy is a benchmarking tool, not a dependency of standby (`pip install py-spy`). It samples with
--nonblocking, so the daemons are not paused; the price is an occasional torn stack, counted as is.
Samples of idle threads (waiting in a lock, a select, a sleep) are left out by py-spy itself, so the
shares are of the time a daemon's threads were doing something.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

TOP = 12
# Frames every stack of a thread or of the main program passes through: their inclusive share says
# nothing about where the time goes.
_WRAPPERS = {"Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run", "_worker", "_WorkItem.run", "<module>",
             "_run_code", "_run_module_as_main", "main", "run_main", "cmd_run", "main.<locals>.<lambda>"}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """`seal (/x/standby/proto/envelope.py:123)` -> `proto/envelope.py:seal`: one name per function."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    parts = Path(m["file"]).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else m["file"]
    return f"{short}:{m['func']}"


def summarise(raw: str, top: int = TOP) -> dict[str, Any]:
    """Self and inclusive shares (percent of all samples) of the `top` busiest functions in py-spy's raw
    (collapsed stack) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            if name.rpartition(":")[2] not in _WRAPPERS:
                inclusive[name] += n

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in c.most_common(top)] if total else []

    return {"samples": total, "self_percent": share(own), "inclusive_percent": share(inclusive)}


def proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user+system, and each) and peak RSS (VmHWM) of a live process."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    user, system = int(stat[11]) / tick, int(stat[12]) / tick
    hwm = rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {"cpu_seconds": round(user + system, 2), "user_seconds": round(user, 2),
            "system_seconds": round(system, 2), "peak_rss_bytes": hwm, "rss_bytes": rss}


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat: the difference over a
    phase says how much of the machine's CPU it used, kernel threads (loop devices, writeback) included."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


class Profiler:
    """py-spy attached to several processes for one phase of a benchmark."""

    def __init__(self, out_dir: Path, phase: str, rate: int = 100) -> None:
        self.out_dir, self.phase, self.rate = Path(out_dir), phase, rate
        self.tool = shutil.which("py-spy")
        self.spies: dict[str, tuple[subprocess.Popen[bytes], Path, int]] = {}
        self.started: dict[str, dict[str, float]] = {}  # each daemon's CPU when sampling started
        self.result: dict[str, Any] = {}

    def __enter__(self) -> Profiler:
        if self.tool is None:
            print("profiling: py-spy is not installed (pip install py-spy); no profile is taken")
        return self

    def attach(self, name: str, pid: int) -> None:
        if self.tool is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        raw = self.out_dir / f"{self.phase}.{name}.raw"
        proc = subprocess.Popen(
            [self.tool, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
             "--nonblocking", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.spies[name] = (proc, raw, pid)
        self.started[name] = proc_usage(pid)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> dict[str, Any]:
        """Stop sampling, summarise each daemon, write `<phase>.profile.json`; returns the summary."""
        if self.result or not self.spies:
            return self.result
        usage = {}
        for name, (_, _, pid) in self.spies.items():
            if Path(f"/proc/{pid}").exists():
                now, then = proc_usage(pid), self.started[name]
                usage[name] = {k: round(now[k] - then[k], 2) for k in ("cpu_seconds", "user_seconds", "system_seconds")}
        for proc, _, _ in self.spies.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for name, (proc, raw, _) in self.spies.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            text = raw.read_text() if raw.exists() else ""
            self.result[name] = {"cpu_while_sampled": usage.get(name), **summarise(text)}
            if raw.exists() and not os.environ.get("STANDBY_BENCH_KEEP_RAW"):
                raw.unlink()
        (self.out_dir / f"{self.phase}.profile.json").write_text(json.dumps(self.result, indent=2) + "\n")
        return self.result


def render(profile: dict[str, Any], top: int = 6) -> str:
    """A short text summary of a `<phase>.profile.json`: per daemon, its CPU and where its samples went."""
    lines = []
    for name, p in profile.items():
        u = p.get("cpu_while_sampled") or {}
        lines.append(f"{name}: {p['samples']} samples; CPU while sampled: user {u.get('user_seconds')} s, "
                     f"system {u.get('system_seconds')} s")
        lines.append("  self:      " + ", ".join(f"{fn} {pct}%" for fn, pct in p["self_percent"][:top]))
        lines.append("  inclusive: " + ", ".join(f"{fn} {pct}%" for fn, pct in p["inclusive_percent"][:top]))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    for path in sys.argv[1:]:
        print(f"== {path}")
        print(render(json.loads(Path(path).read_text())))
