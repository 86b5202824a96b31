"""A test disk with a realistic mix of contents: runs of zeros (never-written space), compressible text
(logs, configs, documents) and random data (compressed or encrypted files). Used by `standby demo`
and by the benchmark, so their figures describe the same data.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

REGION = 1024 * 1024
# One region in this many is each of these kinds; the rest of the pattern is left unwritten (zeros).
PATTERN = ("text", "random", "zero", "text", "random", "text", "zero", "random")


def _text_blocks(rng: random.Random, count: int = 64, size: int = 256 * 1024) -> list[bytes]:
    syll = ["ka", "lo", "mi", "ner", "to", "sa", "vex", "din", "pra", "os", "ul", "tre", "gan", "fi"]
    words = ["".join(rng.choices(syll, k=rng.randint(1, 4))) for _ in range(3000)]
    words += ["error", "INFO", "the", "and", "request", "user", "id=", "GET", "/api/v1/", "200", "\n"] * 40
    blocks = []
    for _ in range(count):
        parts: list[str] = []
        n = 0
        while n < size:
            line = " ".join(rng.choices(words, k=rng.randint(4, 16))) + "\n"
            parts.append(line)
            n += len(line)
        blocks.append("".join(parts).encode()[:size])
    return blocks


def make_test_disk(path: Path, size: int, seed: int = 1) -> None:
    """Write a sparse image file of `size` bytes (a multiple of 1 MiB) with the mix above."""
    if size % REGION:
        raise ValueError("test disk size must be a multiple of 1 MiB")
    rng = random.Random(seed)
    texts = _text_blocks(rng)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // REGION):
            kind = PATTERN[i % len(PATTERN)]
            if kind == "zero":
                continue
            if kind == "random":
                data = os.urandom(REGION)
            else:
                data = b"".join(rng.choice(texts) for _ in range(REGION // len(texts[0])))
            f.seek(i * REGION)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
