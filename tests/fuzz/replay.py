"""Replay one saved reproducer: ``python -m tests.fuzz.replay PATH.pickle``.

A decoder reproducer ({"target", "input"}) is run through its target again and the outcome printed with
the full traceback. A session reproducer (a list of (role, kind, description, frame bytes)) lists the
frames that were sent on that connection before the problem, in order; `--hex` prints the bytes too.
"""

from __future__ import annotations

import pickle
import sys
import traceback

from . import disk_targets, engine, wire_targets


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    with open(argv[0], "rb") as f:
        data = pickle.load(f)  # our own files, written by engine.save or sessions.Findings
    if isinstance(data, list):
        for role, kind, desc, frame in data:
            print(f"[{role}] {kind}: {desc}")
            if "--hex" in argv[1:] and frame:
                print("   ", frame.hex())
        return 0
    targets = {t.name: t for t in wire_targets.TARGETS + disk_targets.TARGETS}
    target = targets[data["target"]]
    print(f"target {target.name}; input {repr(data['input'])[:2000]}")
    try:
        target.run(data["input"])
    except target.allowed as exc:
        print(f"refused with the documented error: {type(exc).__name__}: {exc}")
        return 0
    except BaseException as exc:  # the point is to show it, whatever it is
        traceback.print_exception(exc)
        print(f"FAILURE: {engine.crash_key(exc)[0]}")
        return 1
    print("accepted: no failure with this code")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
