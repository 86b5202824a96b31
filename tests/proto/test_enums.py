"""The closed sets of wire words (`standby.proto.enums`): their values are the strings the wire carried
before the enums existed, a decoded request or reply holds the member, and `to_wire()` gives back plain
strings, so the JSON (and a MARKER's sealed meta) does not change.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from standby.proto import fields
from standby.proto import requests as rq
from standby.proto.enums import Consistency, ErrorCode, MarkerKind, ReplicaFormat
from standby.proto.messages import meta_bytes
from standby.proto.requests import BadRequest

from .test_requests import EXAMPLES, METAS, T


def test_the_values_are_the_wire_words_of_before():
    assert tuple(ReplicaFormat) == ("vmdk", "vmdk-thick", "vmdk-monolithic-flat", "vmdk-sparse", "raw", "device")
    assert tuple(MarkerKind) == ("initial-complete", "resync-complete", "point", "batch")
    assert tuple(Consistency) == ("crash-consistent", "app-consistent")
    # The old tuple names stay, derived from the enums, and hold plain strings.
    for old, enum in ((fields.REPLICA_FORMATS, ReplicaFormat), (fields.MARKER_KINDS, MarkerKind),
                      (fields.CONSISTENCIES, Consistency)):
        assert old == tuple(enum) and all(type(w) is str for w in old)
    assert rq.REPLICA_FORMATS is fields.REPLICA_FORMATS and rq.CONSISTENCIES is fields.CONSISTENCIES


def test_every_code_the_cli_maps_is_an_error_code():
    from standby.plumbing.errors import REPLY_CODES

    assert set(REPLY_CODES) <= set(ErrorCode)


def _plain(v: Any) -> bool:
    """JSON of plain types only: no enum member (a str subclass) anywhere."""
    if isinstance(v, dict):
        return all(type(k) is str and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return v is None or type(v) in (bool, int, float, str)


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: f"{k[1]}-{k[0]}")
def test_to_wire_gives_plain_json(key):
    op, sender = key
    args, result = EXAMPLES[key]
    req = rq.parse_request(op, args, sender)
    rep = rq.parse_reply(op, result, sender)
    assert _plain(req.to_wire()) and _plain(rep.to_wire())
    assert json.dumps(rep.to_wire(), sort_keys=True) == json.dumps(result, sort_keys=True)


def test_decoded_words_are_members():
    p = rq.parse_request("protect", {"machine": "web1", "mt": "mt1", "format": "raw"}, "admin")
    assert p.format is ReplicaFormat.RAW
    assert rq.parse_request("protect", {"machine": "web1", "mt": "mt1"}, "admin").format is ReplicaFormat.VMDK
    points = rq.parse_reply("points", EXAMPLES[("points", "ps")][1], "ps")
    assert points.points[0].consistency is Consistency.APP
    made = rq.parse_reply("app_point", EXAMPLES[("app_point", "ps")][1], "ps")
    assert all(d.consistency is None or type(d.consistency) is Consistency for d in made.disks)


@pytest.mark.parametrize("meta", METAS, ids=lambda m: m["kind"])
def test_marker_meta_holds_members_and_seals_the_same_bytes(meta):
    cm = rq.MarkerMeta.from_marker(meta)
    assert cm.kind is MarkerKind(meta["kind"])
    if "consistency" in meta:
        assert cm.consistency is Consistency(meta["consistency"])
    assert meta_bytes(cm.to_wire()) == meta_bytes(meta)
    assert _plain(cm.to_wire())


def test_built_with_a_member_or_its_string_alike():
    a = rq.MarkerMeta(generation=1, kind=MarkerKind.POINT, time=T, consistency=Consistency.CRASH)
    b = rq.MarkerMeta(generation=1, kind="point", time=T, consistency="crash-consistent")
    assert a == b and b.kind is MarkerKind.POINT
    assert a.to_wire() == {"generation": 1, "kind": "point", "time": T, "consistency": "crash-consistent"}


def test_an_unknown_word_is_refused_naming_the_choices():
    with pytest.raises(BadRequest) as exc:
        rq.parse_request("protect", {"machine": "web1", "mt": "mt1", "format": "qcow2"}, "admin")
    assert exc.value.code is ErrorCode.BAD_INPUT and exc.value.code == "bad-input"
    assert str(exc.value) == (
        "protect: format must be one of vmdk, vmdk-thick, vmdk-monolithic-flat, vmdk-sparse, raw, device, "
        "got 'qcow2'"
    )
    for junk in (7, None, ["raw"], "Point", "\ud800"):
        with pytest.raises(BadRequest) as exc:
            rq.MarkerMeta.from_marker({"generation": 1, "kind": junk})
        assert exc.value.code == ErrorCode.BAD_MARKER


def test_refusal_codes_are_members():
    for op, args, role, code in (
        ("nope", {}, "admin", ErrorCode.UNKNOWN_REQUEST),
        ("status", {}, "agent", ErrorCode.FORBIDDEN),
        ("status", {"machine": 5}, "admin", ErrorCode.BAD_INPUT),
    ):
        with pytest.raises(BadRequest) as exc:
            rq.parse_request(op, args, role)
        assert exc.value.code is code
    with pytest.raises(BadRequest) as exc:
        rq.parse_reply("pull", {"received_seq": -1}, "mt")
    assert exc.value.code is ErrorCode.BAD_REPLY
