"""The terms of a log (oribus/shards/replica/terms.py): term -> first LSN."""

from __future__ import annotations

import pytest

from oribus.shards.replica.terms import Terms


def test_term_at_is_the_last_term_started_at_or_below_the_lsn() -> None:
    terms = Terms([(1, 1), (3, 10), (4, 11)])
    assert terms.term_at(0) == 0  # the empty log's position is (0, 0)
    assert [terms.term_at(lsn) for lsn in (1, 9, 10, 11, 500)] == [1, 1, 3, 4, 4]
    assert terms.position(9) == (1, 9)
    assert terms.position(0) == (0, 0)
    assert terms.last_term == 4
    assert terms.first_lsn_of(3) == 10
    assert terms.first_lsn_of(2) is None


def test_records_before_any_term_are_in_term_zero() -> None:
    terms = Terms([(2, 50)])
    assert terms.term_at(49) == 0 and terms.term_at(50) == 2


def test_terms_only_go_up_and_a_repeated_entry_is_a_no_op() -> None:
    terms = Terms([(1, 1), (2, 5)])
    terms.start(1, 1)  # replayed again after a snapshot that holds it
    terms.start(2, 5)
    assert terms.to_list() == [[1, 1], [2, 5]]
    with pytest.raises(ValueError):
        terms.start(2, 9)
    with pytest.raises(ValueError):
        terms.start(3, 5)
    with pytest.raises(ValueError):
        terms.start(1, 7)


def test_truncate_after_forgets_the_terms_of_the_cut_records() -> None:
    terms = Terms([(1, 1), (2, 5), (3, 9)])
    terms.truncate_after(8)
    assert terms.to_list() == [[1, 1], [2, 5]]
    assert terms.term_at(20) == 2
    terms.truncate_after(5)  # the TERM_START at 5 stays
    assert terms.to_list() == [[1, 1], [2, 5]]
    terms.truncate_after(4)
    assert terms.to_list() == [[1, 1]]
    terms.start(5, 5)  # a later term may then start where the cut one did
    assert terms.term_at(5) == 5


def test_list_form_round_trips_and_can_stop_at_a_snapshot_lsn() -> None:
    terms = Terms([(1, 1), (2, 5), (3, 9)])
    assert Terms.from_list(terms.to_list()) == terms
    assert terms.to_list(upto_lsn=8) == [[1, 1], [2, 5]]
    assert Terms.from_list(None) == Terms()
