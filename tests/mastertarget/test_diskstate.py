"""mastertarget.diskstate: the replica state file, including one an older release wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from standby.mastertarget.diskstate import ReplicaState
from standby.plumbing.durable import DamagedFile
from standby.proto.enums import ReplicaFormat


def state(**over: object) -> ReplicaState:
    fields = dict(disk=4, machine="web01", name="sda", uid="u", size=1 << 20, format="vmdk-sparse", path="/r/x.vmdk")
    fields.update(over)
    return ReplicaState(**fields)  # type: ignore[arg-type]


def test_round_trip_keeps_the_format_as_a_member(tmp_path: Path) -> None:
    state().save(tmp_path)
    saved = json.loads((tmp_path / "4.json").read_text())
    assert saved["format"] == "vmdk-sparse" and "kind" not in saved
    back = ReplicaState.load(tmp_path, 4)
    assert back is not None and back.format is ReplicaFormat.VMDK_SPARSE and back == state()


def test_a_state_file_that_keeps_the_format_under_kind_still_loads(tmp_path: Path) -> None:
    old = {k: v for k, v in json.loads(json.dumps(state().__dict__)).items() if k != "format"}
    (tmp_path / "4.json").write_text(json.dumps({**old, "kind": "raw"}))
    back = ReplicaState.load(tmp_path, 4)
    assert back is not None and back.format is ReplicaFormat.RAW
    assert [s.format for s in ReplicaState.all(tmp_path)] == [ReplicaFormat.RAW]
    back.save(tmp_path)  # the next save writes the new word
    assert "kind" not in json.loads((tmp_path / "4.json").read_text())


def test_an_unknown_format_is_a_damaged_file_not_a_crash(tmp_path: Path) -> None:
    saved = json.loads(json.dumps(state().__dict__))
    (tmp_path / "4.json").write_text(json.dumps({**saved, "format": "qcow2"}))
    with pytest.raises(DamagedFile, match="damaged"):
        ReplicaState.load(tmp_path, 4)
    assert ReplicaState.all(tmp_path) == []  # logged; the other disks load
