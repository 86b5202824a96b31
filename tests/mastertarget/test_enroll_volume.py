"""`standby-mt enroll` checks the retention volume before it enrolls (issue 11, item 6): the seeds' rules,
and a volume of its own unless the operator accepts the root file system (`--shared-volume`)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from standby.mastertarget.cli import main
from standby.mastertarget.config import MTConfig
from standby.mastertarget.volume import on_root_file_system
from standby.plumbing.errors import EXIT_BAD_INPUT, EXIT_UNREACHABLE, NotStarted

FINGERPRINT = "sha256:" + "ab" * 32


@pytest.fixture
def on_root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="standby-retention-", dir="/var/tmp"))
    try:
        if not on_root_file_system(d):
            pytest.skip("/var/tmp is not on the root file system here")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def enroll(tmp_path: Path, retention: Path, *extra: str) -> int:
    pw = tmp_path / "pw"
    pw.write_text("passphrase\n")
    # Port 1 on 127.0.0.1: nothing listens, so an enroll that passed the volume check ends unreachable.
    return main(["enroll", "--server", "127.0.0.1:1", "--fingerprint", FINGERPRINT, "--passphrase-file", str(pw),
                 "--name", "mt1", "--dir", str(tmp_path / "mt"), "--retention-dir", str(retention), *extra])


def test_a_retention_directory_on_the_root_file_system_is_refused_before_enrolling(tmp_path, on_root, capsys):
    assert enroll(tmp_path, on_root) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "root file system" in err and "--shared-volume" in err
    assert not (tmp_path / "mt").exists()  # nothing written, nothing sent


def test_shared_volume_accepts_it_with_a_warning(tmp_path, on_root, capsys):
    assert enroll(tmp_path, on_root, "--shared-volume") == EXIT_UNREACHABLE  # went on to contact the server
    assert "warning: retention volume" in capsys.readouterr().out


def test_a_missing_retention_directory_is_refused_before_enrolling(tmp_path, capsys):
    assert enroll(tmp_path, tmp_path / "nope", "--shared-volume") == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err


def test_a_volume_of_its_own_passes(tmp_path, capsys):
    mnt = tmp_path / "retention"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        assert enroll(tmp_path, mnt) == EXIT_UNREACHABLE  # the volume check passed; the server is not there
        assert "warning" not in capsys.readouterr().out
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_the_config_keeps_what_the_operator_accepted(tmp_path):
    d = tmp_path / "mt"
    (d / "identity").mkdir(parents=True)
    head = 'name = "mt1"\nserver = "127.0.0.1:9443"\n[retention]\ndir = "/r"\n'
    (d / "mt.toml").write_text(head + "shared_volume = true\n")
    assert MTConfig.load(d).shared_volume is True
    (d / "mt.toml").write_text(head)
    assert MTConfig.load(d).shared_volume is False
    (d / "mt.toml").write_text(head + 'shared_volume = "yes"\n')
    with pytest.raises(NotStarted, match="shared_volume"):
        MTConfig.load(d)
