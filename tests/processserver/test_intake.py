"""The agent session's decisions on arriving records (intake.py) and the master target's on a replica
behind the cache (mtsession.replica_gap), as pure functions: the numbers in, the decision out.

Until these were functions, only the root integration tests (full cache, cut connections, kill -9 of the
process server) reached them."""

from __future__ import annotations

from standby.processserver.intake import Intake, after_failed_store, sort_group
from standby.processserver.mtsession import replica_gap

BIG = 1 << 30


def seqs(records: list[tuple[int, int]], idx: tuple[int, ...]) -> list[int]:
    return [records[i][0] for i in idx]


# -- storing in order ----------------------------------------------------------------------------------


def test_records_in_order_are_taken() -> None:
    group = [(5, 100), (6, 100), (7, 100)]
    assert sort_group(group, 4, BIG, None) == Intake(take=(0, 1, 2))


def test_a_retransmission_is_taken_to_be_acknowledged_again() -> None:
    group = [(3, 100), (4, 100), (5, 100)]
    d = sort_group(group, 4, BIG, None)
    assert seqs(group, d.take) == [3, 4, 5] and not d.refuse and d.gap is None


# -- the quota (promise 8) -----------------------------------------------------------------------------


def test_the_leading_records_that_fit_are_taken_and_the_rest_refused() -> None:
    group = [(1, 100), (2, 100), (3, 100), (4, 100)]
    d = sort_group(group, 0, 250, None)
    assert seqs(group, d.take) == [1, 2]
    assert seqs(group, d.refuse) == [3, 4]
    assert d.refused_from == 3 and d.starts_refusing


def test_a_record_exactly_filling_the_quota_fits() -> None:
    assert sort_group([(1, 100)], 0, 100, None).take == (0,)
    assert sort_group([(1, 101)], 0, 100, None).refuse == (0,)


def test_no_room_refuses_everything_in_order() -> None:
    group = [(1, 10), (2, 10)]
    d = sort_group(group, 0, 0, None)
    assert d.take == () and seqs(group, d.refuse) == [1, 2] and d.refused_from == 1


def test_a_retransmission_costs_no_room() -> None:
    group = [(4, 1000), (5, 100)]
    d = sort_group(group, 4, 100, None)
    assert d.take == (0, 1)


def test_records_behind_a_refused_one_are_refused_even_a_retransmission() -> None:
    group = [(5, 200), (3, 10)]
    d = sort_group(group, 4, 100, None)
    assert d.take == () and d.refuse == (0, 1)


# -- BUSY keeps the order -------------------------------------------------------------------------------


def test_records_sent_before_the_busy_reached_the_agent_are_refused_not_a_gap() -> None:
    # 5 was refused in the previous group; 6 and 7 were on their way before the agent saw the BUSY.
    d = sort_group([(6, 10), (7, 10)], 4, BIG, refused_from=5)
    assert d.refuse == (0, 1) and d.gap is None
    assert d.refused_from == 5 and not d.starts_refusing  # the same episode: logged once


def test_refused_records_stay_refused_until_the_refused_one_arrives_again_even_with_room() -> None:
    first = sort_group([(5, 10), (6, 10)], 4, 0, None)
    assert first.refuse == (0, 1) and first.refused_from == 5
    # Room appeared, but 6 arrives before 5 comes again: still refused.
    assert sort_group([(6, 10)], 4, BIG, first.refused_from).refuse == (0,)
    # 5 again, in order: stored, and the episode is over.
    again = sort_group([(5, 10), (6, 10)], 4, BIG, first.refused_from)
    assert again.take == (0, 1) and again.refused_from is None


def test_the_refused_record_refused_again_is_the_same_episode() -> None:
    d = sort_group([(5, 10)], 4, 0, refused_from=5)
    assert d.refuse == (0,) and d.refused_from == 5 and not d.starts_refusing


def test_a_new_refusal_after_a_stored_record_is_a_new_episode() -> None:
    d = sort_group([(5, 10), (6, 10)], 4, 15, refused_from=5)
    assert d.take == (0,) and d.refuse == (1,)
    assert d.refused_from == 6 and d.starts_refusing


# -- sequence gaps --------------------------------------------------------------------------------------


def test_a_record_skipping_ahead_is_a_gap_and_nothing_is_taken() -> None:
    d = sort_group([(5, 10), (7, 10)], 4, BIG, None)
    assert d == Intake(gap=(6, 7))


def test_a_gap_at_the_first_record() -> None:
    assert sort_group([(9, 10)], 4, BIG, None).gap == (5, 9)


def test_skipping_past_an_older_refusal_is_a_gap() -> None:
    # refused_from is behind what is stored now: a record skipping ahead of the next expected is a gap.
    assert sort_group([(8, 10)], 6, BIG, refused_from=9).gap == (7, 8)
    assert sort_group([(8, 10)], 6, BIG, refused_from=7).refuse == (0,)


# -- a failed cache write -------------------------------------------------------------------------------


def test_after_a_failed_write_the_new_records_are_refused_first_and_retransmissions_still_acknowledged() -> None:
    group = [(4, 10), (5, 10), (6, 10), (7, 500)]
    d = sort_group(group, 4, 100, None)
    assert seqs(group, d.take) == [4, 5, 6] and seqs(group, d.refuse) == [7]
    failed = after_failed_store(d, group, 4)
    assert seqs(group, failed.take) == [4]
    assert seqs(group, failed.refuse) == [5, 6, 7]
    assert failed.refused_from == 5 and failed.starts_refusing


def test_a_failed_write_of_retransmissions_only_changes_nothing() -> None:
    group = [(3, 10), (4, 10)]
    d = sort_group(group, 4, BIG, None)
    assert after_failed_store(d, group, 4) == d


# -- the master target's replica behind the cache -----------------------------------------------------------


def test_a_replica_that_goes_on_from_the_cache_skips_nothing() -> None:
    assert replica_gap(applied_seq=10, received_seq=20, nxt=11, passed=10) is None
    assert replica_gap(applied_seq=20, received_seq=20, nxt=21, passed=20) is None


def test_a_replica_older_than_the_cache_skips_to_what_the_cache_holds() -> None:
    assert replica_gap(applied_seq=3, received_seq=20, nxt=11, passed=10) == 10


def test_records_lost_at_the_end_of_the_cache_are_skipped_to_what_was_received() -> None:
    # Nothing cached after the replica's position, though more was received: all of it is lost.
    assert replica_gap(applied_seq=3, received_seq=20, nxt=21, passed=3) == 20


def test_the_skip_never_goes_below_what_counts_as_applied() -> None:
    assert replica_gap(applied_seq=3, received_seq=20, nxt=8, passed=12) == 12
