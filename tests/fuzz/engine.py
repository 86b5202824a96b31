"""The mutation loop: run a target on many mutated inputs, each under a time guard, and keep one minimal
reproducer per distinct failure.

A failure is anything the target's decoder raises that is not its documented error type (a "crash"), an
input that takes longer than HANG_SECONDS (a "hang"), or a result that breaks a stated contract (a
"property" failure, raised by the target as `PropertyViolation`). Failures are told apart by the exception
type and the innermost frame inside `standby` where it was raised, so a thousand inputs hitting the same
line count as one bug.

Environment:
    STANDBY_FUZZ_INPUTS    total decoder inputs of a long run, split over the targets by weight
                           (unset: the CI budget of each target)
    STANDBY_FUZZ_SEED      seed of every mutation loop (default 9): a run is repeatable
    STANDBY_FUZZ_HANG_SECONDS   the time one input may take (default 1.0)
    STANDBY_FUZZ_FINDINGS  where reproducers go (default $TMPDIR/standby-fuzz-findings)

A reproducer is a pickle of the input next to a .txt with the exception and traceback; replay one with
``python -m tests.fuzz.replay PATH.pickle``.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip().replace("_", "")
    return int(float(text)) if text else default


SEED = env_int("STANDBY_FUZZ_SEED", 9)
LONG_INPUTS = env_int("STANDBY_FUZZ_INPUTS", 0)
HANG_SECONDS = float(os.environ.get("STANDBY_FUZZ_HANG_SECONDS", "1.0"))
FINDINGS_DIR = Path(os.environ.get("STANDBY_FUZZ_FINDINGS", Path(tempfile.gettempdir()) / "standby-fuzz-findings"))
SHRINK_ATTEMPTS = 400


class Hang(BaseException):
    """Raised by the alarm inside an input that runs too long. A BaseException so that no `except
    Exception` in the code under test swallows it."""


class PropertyViolation(AssertionError):
    """The target's result breaks its contract (wrong length, index out of range, ...)."""


@dataclass
class Target:
    name: str
    seeds: Callable[[random.Random], list[Any]]  # valid inputs, built with the real encoders
    mutate: Callable[[random.Random, Any, list[Any]], Any]  # (rng, one seed, all seeds) -> input
    run: Callable[[Any], Any]  # decode one input; raises `allowed` for invalid input
    allowed: tuple[type[BaseException], ...]
    ci_inputs: int  # inputs in the CI-sized run
    weight: float = 1.0  # share of STANDBY_FUZZ_INPUTS in a long run
    note: str = ""  # what the allowed errors are, from the module's documentation


@dataclass
class Finding:
    target: str
    kind: str  # crash | hang | property
    key: str  # exception type @ innermost standby frame
    error: str
    trace: str
    input: Any
    count: int = 1
    path: Path | None = None

    def line(self) -> str:
        where = f" -> {self.path}" if self.path else ""
        return f"[{self.target}] {self.kind}: {self.key}: {self.error[:200]} (x{self.count}){where}"


@dataclass
class Result:
    target: str
    inputs: int
    seconds: float
    refused: int  # inputs refused with the documented error (shows mutations reach the parser)
    accepted: int  # inputs decoded without error
    findings: dict[str, Finding] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        crashes = sum(1 for f in self.findings.values() if f.kind != "hang")
        hangs = sum(1 for f in self.findings.values() if f.kind == "hang")
        return (
            f"{self.target:34s} {self.inputs:>9d} inputs {self.seconds:7.1f} s {self.rate:9.0f}/s  "
            f"refused {self.refused:>8d} accepted {self.accepted:>8d}  distinct failures {crashes}, hangs {hangs}"
        )


RESULTS: list[Result] = []  # every decoder run of this process, for the terminal summary
SESSION_RESULTS: list[dict[str, Any]] = []  # every session run: name, inputs, seconds, findings (lines)


def session_line(s: dict[str, Any]) -> str:
    rate = s["inputs"] / s["seconds"] if s["seconds"] else 0.0
    return (f"{s['name']:34s} {s['inputs']:>9d} inputs {s['seconds']:7.1f} s {rate:9.0f}/s  "
            f"answered {s.get('answered', 0):>8d} closed {s.get('closed', 0):>6d}  distinct failures "
            f"{len(s['findings'])}")


def budget(target: Target, all_targets: list[Target]) -> int:
    if LONG_INPUTS <= 0:
        return target.ci_inputs
    total = sum(t.weight for t in all_targets)
    return max(1, round(LONG_INPUTS * target.weight / total))


def crash_key(exc: BaseException) -> tuple[str, str]:
    """(key, traceback top). The key is the exception type and the innermost frame inside the standby
    package — except for standby's own error types (a RemoteProtocolError escaping the cache, say): those
    are keyed by the innermost frame outside the package that defines them, i.e. where they leaked out, so
    one missing `except` counts once however many lines inside proto/ raise."""
    tb = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in tb if _in_product(f.filename)]
    home = type(exc).__module__
    if home.startswith("standby."):
        pkg = "/" + "/".join(home.split(".")[:2]) + "/"
        outside = [f for f in ours if pkg not in f.filename.replace(os.sep, "/")]
        ours = outside or ours
    site = ours[-1] if ours else (tb[-1] if tb else None)
    where = f"{_short(site.filename)}:{site.lineno} {site.name}" if site else "?"
    top = "".join(traceback.format_list(tb[-6:]))
    return f"{_type_name(exc)} @ {where}", top


def _type_name(exc: BaseException) -> str:
    t = type(exc)
    return t.__qualname__ if t.__module__ in ("builtins", "__main__") else f"{t.__module__}.{t.__qualname__}"


def _in_product(filename: str) -> bool:
    f = filename.replace(os.sep, "/")
    return "/standby/" in f and "/tests/" not in f


def _short(path: str) -> str:
    m = re.search(r"((?:tests|standby)/.*)$", path.replace(os.sep, "/"))
    return m.group(1) if m else path


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def classify(target: Target, inp: Any) -> tuple[str, BaseException | None, float]:
    """Run one input under the time guard: ("ok" | "refused" | "crash" | "hang" | "property", exc, seconds)."""
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    t0 = time.perf_counter()
    try:
        target.run(inp)
        outcome: tuple[str, BaseException | None] = ("ok", None)
    except Hang as exc:
        outcome = ("hang", exc)
    except target.allowed as exc:
        outcome = ("refused", exc)
    except PropertyViolation as exc:
        outcome = ("property", exc)
    except Exception as exc:  # RecursionError and MemoryError are Exceptions too: all of them are bugs here
        outcome = ("crash", exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    dt = time.perf_counter() - t0
    if outcome[0] != "hang" and dt > HANG_SECONDS * 1.5:
        # The alarm fell inside C code that swallowed it or ran on: still too slow.
        return "hang", TimeoutError(f"input took {dt:.2f} s"), dt
    return outcome[0], outcome[1], dt


def _same(target: Target, inp: Any, key: str, kind: str) -> bool:
    k, exc, _ = classify(target, inp)
    if k != kind or exc is None:
        return False
    return kind == "hang" or crash_key(exc)[0] == key


def shrink(target: Target, inp: Any, key: str, kind: str) -> Any:
    """Greedy chunk removal on the bytes part of an input (bytes, or a tuple whose last item is bytes),
    keeping the same failure. Hangs are not shrunk (each attempt costs the full time bound)."""
    if kind == "hang":
        return inp
    if isinstance(inp, bytes | bytearray):
        wrap: Callable[[bytes], Any] = bytes
        data = bytes(inp)
    elif isinstance(inp, tuple) and inp and isinstance(inp[-1], bytes | bytearray):
        head = inp[:-1]

        def wrap(b: bytes) -> Any:
            return (*head, b)

        data = bytes(inp[-1])
    else:
        return inp
    attempts = 0
    chunk = max(len(data) // 2, 1)
    while chunk >= 1 and attempts < SHRINK_ATTEMPTS:
        i = 0
        progressed = False
        while i < len(data) and attempts < SHRINK_ATTEMPTS:
            cand = data[:i] + data[i + chunk :]
            attempts += 1
            if _same(target, wrap(cand), key, kind):
                data, progressed = cand, True
            else:
                i += chunk
        if not progressed:
            chunk //= 2
    return wrap(data)


def save(f: Finding) -> Path:
    d = FINDINGS_DIR / f.target
    d.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f.key)[:120]
    path = d / f"{slug}.pickle"
    with open(path, "wb") as fh:
        pickle.dump({"target": f.target, "input": f.input}, fh)
    text = (
        f"target: {f.target}\nkind: {f.kind}\nkey: {f.key}\nerror: {f.error}\n"
        f"replay: python -m tests.fuzz.replay {path}\n\ninput (repr, cut at 4000 chars):\n{repr(f.input)[:4000]}\n\n"
        f"traceback (innermost frames):\n{f.trace}\n"
    )
    path.with_suffix(".txt").write_text(text)
    return path


def run_target(target: Target, n: int, seed: int = SEED, keep: bool = True) -> Result:
    """Run `n` mutated inputs of `target`. Returns the result (also appended to RESULTS)."""
    rng = random.Random(f"{seed}:{target.name}")
    seeds = target.seeds(rng)
    res = Result(target.name, 0, 0.0, 0, 0)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    logging.disable(logging.CRITICAL)  # the code under test logs every refusal: thousands of lines
    t_start = time.perf_counter()
    try:
        for i in range(n):
            # Every 20th input is a seed as is: the decoders must accept what the encoders make.
            seed = seeds[i % len(seeds)] if i % 20 == 0 else rng.choice(seeds)
            try:
                inp = seed if i % 20 == 0 else target.mutate(rng, seed, seeds)
            except Exception:  # a mutator choking on what an earlier edit made: use the seed, go on
                inp = seed
            kind, exc, _ = classify(target, inp)
            res.inputs += 1
            if kind == "ok":
                res.accepted += 1
                continue
            if kind == "refused":
                res.refused += 1
                continue
            assert exc is not None
            key, top = crash_key(exc) if kind != "hang" else (f"hang @ {crash_key(exc)[0].split(' @ ')[-1]}", "")
            if kind == "hang":
                top = crash_key(exc)[1]
            old_f = res.findings.get(key)
            if old_f is not None:
                old_f.count += 1
                if keep and _size(inp) < _size(old_f.input):
                    old_f.input = inp
                continue
            res.findings[key] = Finding(target.name, kind, key, f"{_type_name(exc)}: {exc}"[:1000], top, inp)
    finally:
        res.seconds = time.perf_counter() - t_start
        signal.signal(signal.SIGALRM, old)
        logging.disable(logging.NOTSET)
    if keep:
        for f in res.findings.values():
            old_h = signal.signal(signal.SIGALRM, _on_alarm)
            logging.disable(logging.CRITICAL)
            try:
                f.input = shrink(target, f.input, f.key, f.kind)
            finally:
                signal.signal(signal.SIGALRM, old_h)
                logging.disable(logging.NOTSET)
            f.path = save(f)
    RESULTS.append(res)
    return res


def _size(inp: Any) -> int:
    try:
        return len(pickle.dumps(inp))
    except Exception:
        return 1 << 30


def report(res: Result) -> str:
    lines = [res.summary()]
    lines += ["    " + f.line() + "\n      " + f.trace.strip().replace("\n", "\n      ") for f in res.findings.values()]
    return "\n".join(lines)
