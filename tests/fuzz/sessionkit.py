"""What the two session fuzzers share: inputs as sent, the findings they keep (one file per distinct
problem), and the reading of a daemon's log for tracebacks and logging errors."""

from __future__ import annotations

import math
import os
import pickle
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from standby.proto.errors import ProtocolError
from standby.proto.frames import decode_header
from standby.proto.messages import FrameType

from . import engine

# How long a daemon may take to answer one input (a REPLY, an ACK...) before it counts as no answer.
ANSWER_SECONDS = float(os.environ.get("STANDBY_FUZZ_ANSWER_SECONDS", "5"))


class Findings:
    """Distinct problems of a session run, each saved once: a .txt (what, the input, the frames sent on that
    connection before it, the daemon's log tail) and a .pickle of those frames for replaying by hand."""

    def __init__(self, subdir: str, log_tail: Callable[[], str]) -> None:
        self.dir = engine.FINDINGS_DIR / subdir
        self.log_tail = log_tail
        self.lines: dict[str, str] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, inp: Input, history: list[Input], detail: str = "") -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        if key in self.lines:
            return
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:120]
        self.dir.mkdir(parents=True, exist_ok=True)
        history = history[-20:]
        if not history or history[-1] is not inp:
            history = [*history, inp]
        with open(self.dir / f"{slug}.pickle", "wb") as f:
            pickle.dump([(h.role, h.kind, h.desc, h.frame) for h in history], f)
        text = [f"finding: {key}", f"input: [{inp.role}] {inp.desc}", f"detail: {detail}", "",
                "frames sent on that connection before it, oldest first (role, kind, description):"]
        text += [f"  [{h.role}] {h.kind}: {h.desc[:300]}" for h in history]
        text += ["", "daemon log, last 40 lines:", *self.log_tail().splitlines()[-40:]]
        (self.dir / f"{slug}.txt").write_text("\n".join(text) + "\n")
        first = detail.strip().splitlines()[-1][:200] if detail.strip() else ""
        self.lines[key] = f"{key} -- input: {inp.desc[:160]}{' -- ' + first if first else ''} -> {self.dir / slug}.txt"

    def note(self, key: str, note: str) -> None:
        if key in self.lines and "also seen as" not in self.lines[key]:
            self.lines[key] += f" (also seen as: {note[:200]})"

    def summary(self) -> list[str]:
        return [f"{v} (x{self.counts[k]})" for k, v in self.lines.items()]


class LogWatch:
    """What a daemon's log gained since the last look: tracebacks, logging errors, "unexpected error"."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0

    def peek(self) -> str:
        """What the log gained since the last `problems()`, without consuming it."""
        if not self.path.exists():
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            return f.read().decode("utf-8", "replace")

    def problems(self) -> list[tuple[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        return [(f"log: {key}", excerpt) for key, excerpt in log_errors(data.decode("utf-8", "replace"))]


@dataclass
class Input:
    role: str  # agent | mt | admin | enroll | handshake
    kind: str  # request | record | frame
    frame: bytes
    desc: str
    rid: int | None = None
    record: tuple[int, int] | None = None  # (disk, sequence) of a BATCH or MARKER
    op: str = ""
    args: Any = None
    hello: tuple[str, str] | None = None  # handshake: (identity, role in the HELLO)


def finite(t: Any) -> bool:
    try:
        return isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
    except OverflowError:  # an integer too large for a float
        return False


def is_goodbye(frame: bytes) -> bool:
    try:
        return decode_header(frame).type == FrameType.GOODBYE
    except ProtocolError:
        return False


def is_uuid(v: Any) -> bool:
    try:
        uuid.UUID(v)
        return isinstance(v, str)
    except (ValueError, TypeError, AttributeError):
        return False


_TB_FILE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_DISPATCH = {"handle", "_session", "run", "reply_to", "session", "answer", "_run_once", "_run"}


def log_errors(text: str) -> list[tuple[str, str]]:
    """(key, excerpt) for each traceback, logging error, "unexpected error" line or unobserved task death in
    a piece of log. A traceback's key is its exception type, the handler it went through (the first frame
    after the session's dispatch: `reply_to`, `run`...) and its innermost standby frame — so one missing
    check is one finding, whichever input reached it."""
    out: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- Logging error ---"):
            # A log call whose arguments do not fit its format (a peer's value logged with %d): the message
            # is lost. Python prints the error, then the call stack of the log call.
            j = i + 1
            while j < len(lines) and not lines[j].startswith("Arguments:"):
                j += 1
            block = lines[i : j + 1]
            exc = next((x.split(":")[0] for x in block if re.match(r"^[A-Za-z_.]+(Error|Exception):", x)), "?")
            frames = [m.groups() for x in block if (m := _TB_FILE.search(x)) and "/standby/" in m.group(1)]
            site = f"{frames[-1][0].split('/standby/')[-1]}:{frames[-1][1]} {frames[-1][2]}" if frames else "?"
            out.append((f"logging error {exc} (a log call's arguments do not fit its format) @ {site}",
                        "\n".join(block)[-2500:]))
            i = j + 1
            continue
        if "Traceback (most recent call last)" in line:
            j = i + 1
            frames = []
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("\t")):
                m = _TB_FILE.search(lines[j])
                if m and "/standby/" in m.group(1):
                    frames.append((m.group(1).split("/standby/")[-1], m.group(2), m.group(3)))
                j += 1
            exc = lines[j].split(":")[0].strip() if j < len(lines) else "?"
            k = 0
            while k < len(frames) - 1 and frames[k][2] in _DISPATCH:
                k += 1
            handler = frames[k][2] if frames else "?"
            site = f"{frames[-1][0]}:{frames[-1][1]} {frames[-1][2]}" if frames else "?"
            out.append((f"{exc} in {handler}() @ {site}", "\n".join(lines[max(i - 1, 0) : j + 1])[-2500:]))
            i = j
        elif "unexpected error" in line.lower() and not any("Traceback" in x for x in lines[i + 1 : i + 2]):
            out.append(("unexpected error line", line[-500:]))
        elif "Task exception was never retrieved" in line:
            out.append(("an asyncio task died unobserved", "\n".join(lines[i : i + 12])[-2000:]))
        i += 1
    return out
