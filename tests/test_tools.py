"""tests/tools.py: a test whose outside program is missing skips with the program and its package named;
CI installs every package the tests need, and README's "Install" lists what CI installs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests import tools

ROOT = Path(__file__).resolve().parent.parent


def absent(*names: str):
    """A shutil.which that finds everything but `names`."""
    return lambda prog, *a, **k: None if prog in names else f"/usr/bin/{prog}"


def test_nothing_missing_means_no_reason(monkeypatch):
    monkeypatch.setattr(shutil, "which", absent())
    assert tools.missing("fio", "sfdisk", "qemu-img") is None
    tools.need("fio")  # does not skip


def test_a_missing_program_is_named_with_its_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", absent("fio", "sfdisk"))
    assert tools.missing("fio") == "fio is not installed: apt-get install fio"
    assert tools.missing("sfdisk", "qemu-img") == "sfdisk is not installed: apt-get install fdisk"
    assert tools.missing("fio", "sfdisk") == "fio, sfdisk are not installed: apt-get install fdisk fio"
    with pytest.raises(pytest.skip.Exception, match="sfdisk is not installed: apt-get install fdisk"):
        tools.need("mkfs.ext4", "sfdisk")


def test_the_mark_skips_with_the_reason(monkeypatch):
    monkeypatch.setattr(shutil, "which", absent("qemu-img"))
    mark = tools.needs("qemu-img").mark
    assert mark.args == (True,) and mark.kwargs["reason"] == "qemu-img is not installed: apt-get install qemu-utils"
    monkeypatch.setattr(shutil, "which", absent())
    assert tools.needs("qemu-img").mark.args == (False,)


def test_an_unlisted_program_is_an_error_not_a_skip():
    with pytest.raises(ValueError, match="which package gives nosuchprog"):
        tools.missing("nosuchprog")


def apt_packages(text: str) -> set[str]:
    """The packages of every `apt-get install` command in `text` (continuation lines joined)."""
    text = text.replace("\\\n", " ")
    found: set[str] = set()
    for line in re.findall(r"apt-get install ([^\n#>]*)", text):
        found |= {w for w in line.split() if not w.startswith("-")}
    return found


def test_ci_installs_every_package_the_tests_name_and_the_readme_lists_the_same():
    ci = apt_packages((ROOT / ".ci" / "run").read_text())
    readme = apt_packages((ROOT / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0])
    assert set(tools.PACKAGES.values()) <= ci
    assert readme == ci
