"""The outside programs some tests run (fio, sfdisk, qemu-img, mkfs.ext4, ss, ...).

A test that needs one skips when it is truly absent (not on PATH), and the reason names the program and
the Debian package that gives it — it never fails with FileNotFoundError. `.ci/run` installs every
package listed here (tests/test_tools.py checks it, and that README's "Install" lists the same), so
nothing skips in CI for a missing program. Use `needs(...)` as a mark where the test is known up front
(it skips before any setup), and `need(...)` inside a helper that runs the program (every caller is
covered, also a future one).
"""

from __future__ import annotations

import shutil

import pytest

# program -> the Debian package that installs it (README "Install" lists the same packages).
PACKAGES = {
    "fio": "fio",
    "sfdisk": "fdisk",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "filefrag": "e2fsprogs",
    "losetup": "util-linux",
    "partx": "util-linux",
    "blockdev": "util-linux",
    "fsfreeze": "util-linux",
    "ss": "iproute2",
    "openssl": "openssl",
    "systemd-analyze": "systemd",
    "promtool": "prometheus",
    "prometheus": "prometheus",
}


def missing(*programs: str) -> str | None:
    """Why a test cannot run for want of one of `programs`, or None when all are on PATH."""
    unknown = [p for p in programs if p not in PACKAGES]
    if unknown:
        raise ValueError(f"tests/tools.py does not know which package gives {', '.join(unknown)}: add it")
    absent = [p for p in programs if shutil.which(p) is None]
    if not absent:
        return None
    verb = "is" if len(absent) == 1 else "are"
    packages = " ".join(sorted({PACKAGES[p] for p in absent}))
    return f"{', '.join(absent)} {verb} not installed: apt-get install {packages}"


def need(*programs: str) -> None:
    """Skip the running test when one of `programs` is absent."""
    reason = missing(*programs)
    if reason is not None:
        pytest.skip(reason)


def needs(*programs: str) -> pytest.MarkDecorator:
    """A mark that skips the test (or module, as `pytestmark`) when one of `programs` is absent."""
    reason = missing(*programs)
    return pytest.mark.skipif(reason is not None, reason=reason or "")
