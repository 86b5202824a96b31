"""The torn-tail rule (proto.frames.classify_tail): what follows a segment's last good record is clean, a
torn tail (cut it off) or damage (refuse / set aside) — the one rule the cache and the journal share."""

from __future__ import annotations

import pytest

from standby.proto.frames import CLEAN, DAMAGE, HEADER_SIZE, TORN, classify_tail, encode_frame, scan_segment

REC = encode_frame(0x10, 1, 7, b"p" * 64)


def tail_of(buf: bytes, good_end: int, **kw: bool) -> str:
    return classify_tail(buf[good_end : good_end + HEADER_SIZE], len(buf) - good_end, "why", **kw).verdict


def test_nothing_after_the_last_good_record_is_clean() -> None:
    assert classify_tail(b"", 0).verdict == CLEAN
    records, good_end, tail = scan_segment(REC + REC)
    assert len(records) == 2 and good_end == 2 * len(REC) and tail.verdict == CLEAN and tail.reason is None


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, len(REC) - 1])
def test_a_record_cut_short_is_a_torn_tail(cut: int) -> None:
    buf = REC + REC[:cut]
    assert tail_of(buf, len(REC)) == TORN
    records, good_end, tail = scan_segment(buf)
    assert len(records) == 1 and good_end == len(REC) and tail.torn and tail.reason


def test_a_last_record_reaching_the_end_with_a_bad_payload_is_torn() -> None:
    bad = REC[:-1] + bytes([REC[-1] ^ 1])  # the file was extended before the payload's blocks were written
    assert tail_of(REC + bad, len(REC)) == TORN


def test_a_bad_payload_with_bytes_after_it_is_damage() -> None:
    bad = REC[:-1] + bytes([REC[-1] ^ 1])
    _, good_end, tail = scan_segment(REC + bad + REC)
    assert good_end == len(REC) and tail.verdict == DAMAGE and "checksum" in (tail.reason or "")


def test_a_header_that_does_not_decode_is_damage_even_at_the_end() -> None:
    bad = bytes([REC[0] ^ 1]) + REC[1:]
    assert tail_of(REC + bad, len(REC)) == DAMAGE
    assert tail_of(REC + b"\0" * HEADER_SIZE, len(REC)) == DAMAGE


def test_torn_only_in_the_newest_segment_and_never_when_acknowledged() -> None:
    buf = REC + REC[:10]
    assert tail_of(buf, len(REC), newest=False) == DAMAGE
    assert tail_of(buf, len(REC), acknowledged=True) == DAMAGE
    assert scan_segment(buf, newest=False)[2].damaged


def test_the_reason_is_kept() -> None:
    assert classify_tail(REC[:5], 5, "torn record header at offset 0").reason == "torn record header at offset 0"
    assert classify_tail(REC[:5], 5).reason  # one is made up without it
