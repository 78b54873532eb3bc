"""The election rule and the role machine of a replica group's member (``oribus.hosts.roles``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oribus.hosts.roles import Decision, Outcome, Role, RoleMachine, decide, majority
from oribus.shards.replica.messages import PromiseReply


def granted(last, voter=True, term=5):
    return PromiseReply(True, term, voter, last)


def test_a_candidate_with_a_majority_and_the_highest_position_takes_over():
    d = decide(3, 0, (4, 10), True, 5, {1: granted((4, 9))})
    assert d == Decision(Outcome.TAKE_OVER, voters=2)


def test_a_more_complete_member_wins_by_term_first_then_lsn():
    # a longer log of an older term loses to a record of a newer term (log positions: term first)
    assert decide(3, 0, (3, 50), True, 5, {1: granted((4, 12))}) == Decision(Outcome.DEFER, to=1, voters=2)
    assert decide(3, 0, (4, 11), True, 5, {2: granted((4, 12))}).to == 2


def test_ties_go_to_the_lowest_member_id():
    assert decide(3, 2, (4, 10), True, 5, {1: granted((4, 10))}) == Decision(Outcome.DEFER, to=1, voters=2)
    assert decide(3, 1, (4, 10), True, 5, {2: granted((4, 10))}).outcome is Outcome.TAKE_OVER


def test_learners_never_count_in_a_majority_nor_win():
    # the learner's log may even look longer: it counts for nothing
    d = decide(3, 0, (4, 10), True, 5, {1: granted((4, 99), voter=False)})
    assert d == Decision(Outcome.NO_QUORUM, voters=1)
    # a learner candidate with two voters' promises defers to the best voter
    d = decide(3, 2, (0, 0), False, 5, {0: granted((4, 10)), 1: granted((4, 11))})
    assert d == Decision(Outcome.DEFER, to=1, voters=2)


def test_too_few_promises_is_no_quorum_and_a_higher_term_abandons():
    assert decide(5, 0, (1, 1), True, 5, {1: granted((1, 1))}).outcome is Outcome.NO_QUORUM
    refused = PromiseReply(False, 9, True, (8, 3))
    assert decide(3, 0, (1, 1), True, 5, {1: granted((1, 1)), 2: refused}) == Decision(Outcome.ABANDON,
                                                                                        newer_term=9)


positions = st.tuples(st.integers(0, 4), st.integers(0, 6))


@given(st.integers(0, 4), positions, st.booleans(),
       st.dictionaries(st.integers(0, 4), st.tuples(positions, st.booleans(), st.booleans()), max_size=5))
def test_the_winner_is_always_the_most_complete_promising_voter(me, my_last, my_voter, answers):
    promises = {m: PromiseReply(g, 5, v, last) for m, (last, g, v) in answers.items() if m != me}
    d = decide(5, me, my_last, my_voter, 5, promises)
    voters = {m: p.last for m, p in promises.items() if p.granted and p.voter}
    if my_voter:
        voters[me] = my_last
    if len(voters) < majority(5):
        assert d.outcome is Outcome.NO_QUORUM
        return
    winner = me if d.outcome is Outcome.TAKE_OVER else d.to
    assert winner in voters
    assert all(voters[winner] >= last for last in voters.values())
    assert all(m >= winner for m, last in voters.items() if last == voters[winner])


def test_roles_move_only_along_their_edges():
    m = RoleMachine()
    assert m.role is Role.JOINING
    with pytest.raises(RuntimeError):
        m.move(Role.PRIMARY)
    for role in (Role.FOLLOWER, Role.CANDIDATE, Role.PRIMARY, Role.FOLLOWER, Role.JOINING):
        m.move(role)
    with pytest.raises(RuntimeError):
        m.move(Role.CANDIDATE)  # a member that lost its lease claims again before anything else
    assert m.moves == 5
