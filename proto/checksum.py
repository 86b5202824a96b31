"""Block checksums: xxh3-128, used for verifying plaintext after decryption and for comparing disks.

xxh3 is not a cryptographic hash; it detects accidental damage (bugs, torn writes, bit rot). Tampering
is detected by AES-GCM (see `envelope`), which this never replaces.
"""

from __future__ import annotations

import xxhash

DIGEST_SIZE = 16


def block_digest(data: bytes | memoryview) -> bytes:
    """xxh3-128 of `data`, 16 bytes big-endian."""
    return xxhash.xxh3_128_digest(data)


class StreamDigest:
    """Incremental xxh3-128 over a stream of blocks (a whole disk, read in chunks)."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
