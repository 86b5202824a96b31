"""`--version` on the four commands: `PROG VERSION` from the installed package's metadata, exit 0."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest

from standby.plumbing import version as version_mod

COMMANDS = {
    "standby": "standby.admin.cli",
    "standby-ps": "standby.processserver.cli",
    "standby-mt": "standby.mastertarget.cli",
    "standby-agent": "standby.agent.cli",
}


@pytest.mark.parametrize("prog, module", COMMANDS.items())
def test_version_prints_the_installed_version(prog: str, module: str, capsys) -> None:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"{prog} {version('standby')}\n"


@pytest.mark.parametrize("prog, module", COMMANDS.items())
def test_version_as_a_process(prog: str, module: str) -> None:
    res = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == f"{prog} {version('standby')}\n", res.stderr


def test_a_source_tree_never_installed_says_so(monkeypatch) -> None:
    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(version_mod, "version", missing)
    assert version_mod.installed_version() == "unknown (not installed: pip install .)"
