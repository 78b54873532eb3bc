"""Unit tests of the per-shard delivery log (oribus/delivery_log)."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from oribus.delivery_log import MAX_SEQ, DeliveryLog, DeliveryLogConfig
from oribus.errors import InvalidRequest, LimitExceeded, SessionExpired
from oribus.types import SessionRef

A = SessionRef("alice", "run-1")
B = SessionRef("bob", "run-1")
C = SessionRef("carol", "run-1")
D = SessionRef("dave", "run-1")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_log(
    ttl: float = 60.0, max_entries: int = 1000, max_sessions: int = 1000
) -> tuple[DeliveryLog, FakeClock]:
    clock = FakeClock()
    config = DeliveryLogConfig(
        ttl_seconds=ttl, max_entries_per_session=max_entries, max_sessions=max_sessions
    )
    return DeliveryLog(config, clock=clock), clock


# ---------------------------------------------------------------- record / read


def test_record_returns_incarnation_and_increasing_seq():
    log, _ = make_log()
    assert log.record(A, "x", 3) == (1, 1)
    assert log.record(A, "y", 5) == (1, 2)
    # A second session gets its own incarnation and its own sequence counter.
    assert log.record(B, "x", 3) == (2, 1)
    assert log.read_set(A) == {"x": 3, "y": 5}
    assert log.read_set(B) == {"x": 3}


def test_rereading_a_key_replaces_its_entry_with_a_new_seq():
    log, _ = make_log()
    log.record(A, "x", 3)
    log.record(A, "y", 1)
    assert log.record(A, "x", 4) == (1, 3)
    assert log.read_set(A) == {"x": 4, "y": 1}
    assert log.stats()["entries"] == 2
    # The new seq puts the re-read inside a scope that began after the first read.
    assert log.read_set(A, since_seq=3) == {"x": 4}


def test_record_many_returns_seq_of_first_and_numbers_in_order():
    log, _ = make_log()
    log.record(A, "w", 1)
    assert log.record_many(A, [("x", 1), ("y", 2), ("z", 3)]) == (1, 2)
    assert log.read_set(A, since_seq=3) == {"y": 2, "z": 3}
    assert log.record(A, "v", 9) == (1, 5)


def test_record_many_with_a_repeated_key_keeps_the_last_version():
    log, _ = make_log()
    log.record_many(A, [("x", 1), ("y", 2), ("x", 7)])
    assert log.read_set(A) == {"x": 7, "y": 2}
    assert log.stats()["entries"] == 2
    # x was delivered last with seq 3.
    assert log.read_set(A, since_seq=3) == {"x": 7}


def test_record_many_with_no_items_opens_a_scope():
    log, _ = make_log()
    log.record(A, "old", 1)
    inc, since = log.record_many(A, ())
    assert (inc, since) == (1, 2)
    log.record(A, "new", 1)
    assert log.read_set(A, incarnation=inc, since_seq=since) == {"new": 1}
    # On a session with no record it creates one.
    assert log.record_many(B, []) == (2, 1)
    assert log.incarnation_of(B) == 2


def test_record_many_accepts_a_generator():
    log, _ = make_log()
    log.record_many(A, ((f"k{i}", i) for i in range(3)))
    assert log.read_set(A) == {"k0": 0, "k1": 1, "k2": 2}


def test_version_zero_and_versions_beyond_the_seq_field_round_trip():
    log, _ = make_log()
    big = 2**70 + 12345
    log.record(A, "absent", 0)
    log.record(A, "big", big)
    log.advance(A, {"big2": big + 1})
    assert log.read_set(A) == {"absent": 0, "big": big, "big2": big + 1}


@pytest.mark.parametrize("bad", [-1, 1.0, "3", None, True])
def test_bad_versions_are_refused_and_change_nothing(bad):
    log, _ = make_log()
    log.record(A, "x", 1)
    with pytest.raises(InvalidRequest):
        log.record(A, "y", bad)
    with pytest.raises(InvalidRequest):
        log.record_many(A, [("y", 1), ("z", bad)])
    with pytest.raises(InvalidRequest):
        log.advance(A, {"y": bad})
    assert log.read_set(A) == {"x": 1}
    assert log.record(A, "q", 1) == (1, 2)


def test_unknown_session_without_incarnation_has_an_empty_read_set():
    log, _ = make_log()
    assert log.read_set(A) == {}
    assert log.read_set(A, since_seq=1) == {}
    # Reading the read set does not create a record.
    assert log.stats()["sessions"] == 0
    assert log.incarnation_of(A) is None


# ---------------------------------------------------------------- scopes


def test_since_seq_selects_the_transaction_scope():
    log, _ = make_log()
    log.record(A, "before", 1)  # seq 1
    _, since = log.record(A, "first-in-txn", 2)  # seq 2
    log.record(A, "second-in-txn", 3)  # seq 3
    assert log.read_set(A, since_seq=since) == {"first-in-txn": 2, "second-in-txn": 3}
    assert log.read_set(A, since_seq=since + 1) == {"second-in-txn": 3}
    assert log.read_set(A, since_seq=since + 2) == {}
    assert log.read_set(A, since_seq=1) == log.read_set(A)


def test_reread_of_an_old_key_enters_the_scope():
    log, _ = make_log()
    log.record(A, "x", 1)
    _, since = log.record_many(A, ())
    assert log.read_set(A, since_seq=since) == {}
    log.record(A, "x", 1)
    assert log.read_set(A, since_seq=since) == {"x": 1}


# ---------------------------------------------------------------- advance


def test_advance_keeps_seq_of_existing_entry_and_gives_new_key_a_new_seq():
    log, _ = make_log()
    log.record(A, "x", 1)  # seq 1, before the transaction
    _, since = log.record(A, "y", 1)  # seq 2, the transaction's first read
    assert log.advance(A, {"x": 2, "y": 2, "z": 1}) == 1
    # Session scope sees every own write as current.
    assert log.read_set(A) == {"x": 2, "y": 2, "z": 1}
    # x kept seq 1 (outside the scope), y kept seq 2 (inside), z is new (inside).
    assert log.read_set(A, since_seq=since) == {"y": 2, "z": 1}
    assert log.read_set(A, since_seq=since + 1) == {"z": 1}
    # z took seq 3, so the next delivery gets 4.
    assert log.record(A, "w", 1) == (1, 4)


def test_advance_creates_the_record_if_absent():
    log, _ = make_log()
    inc = log.advance(A, {"x": 5})
    assert inc == 1 == log.incarnation_of(A)
    assert log.read_set(A, incarnation=inc) == {"x": 5}
    assert log.record(A, "y", 1) == (1, 2)


def test_advance_after_expiry_starts_a_new_incarnation():
    log, clock = make_log(ttl=10)
    log.record(A, "x", 1)
    clock.advance(11)
    assert log.advance(A, {"x": 2}) == 2
    with pytest.raises(SessionExpired):
        log.read_set(A, incarnation=1)
    assert log.read_set(A, incarnation=2) == {"x": 2}


# ---------------------------------------------------------------- forget / reset / drop


def test_forget_removes_only_the_named_keys():
    log, _ = make_log()
    log.record_many(A, [("x", 1), ("y", 1), ("z", 1)])
    assert log.forget(A, ["x", "z", "never-read"]) == 2
    assert log.read_set(A) == {"y": 1}
    assert log.stats()["entries"] == 1
    assert log.forget(B, ["x"]) == 0
    assert log.stats()["sessions"] == 1


def test_reset_keeps_incarnation_and_sequence_counter():
    log, _ = make_log()
    _, since = log.record_many(A, [("x", 1), ("y", 1)])
    log.record(B, "x", 1)
    assert log.reset(A) == 2
    assert log.read_set(A, incarnation=1) == {}
    assert log.incarnation_of(A) == 1
    # The counter keeps going, so a scope opened before the reset still sees new reads.
    assert log.record(A, "z", 1) == (1, 3)
    assert log.read_set(A, incarnation=1, since_seq=since) == {"z": 1}
    assert log.read_set(B) == {"x": 1}
    assert log.stats()["entries"] == 2
    assert log.reset(C) == 0
    assert log.incarnation_of(C) is None


def test_reset_all_empties_every_session_and_keeps_incarnations():
    log, _ = make_log()
    log.record_many(A, [("x", 1), ("y", 1)])
    log.record(B, "x", 1)
    log.record(C, "z", 1)
    log.reset(C)
    assert log.reset_all() == 2  # A and B had entries
    assert [log.read_set(s, incarnation=log.incarnation_of(s)) for s in (A, B, C)] == [{}, {}, {}]
    assert (log.incarnation_of(A), log.incarnation_of(B)) == (1, 2)
    assert log.stats()["entries"] == 0 and log.stats()["sessions"] == 3
    assert log.record(A, "x", 2)[0] == 1  # the same incarnation reads on
    assert log.read_set(A, incarnation=1) == {"x": 2} and log.stats()["entries"] == 1


def test_drop_removes_the_record_and_fails_closed():
    log, _ = make_log()
    log.record(A, "x", 1)
    log.record(B, "x", 1)
    assert log.drop(A) is True
    assert log.drop(A) is False
    assert log.read_set(A) == {}
    with pytest.raises(SessionExpired, match="no record"):
        log.read_set(A, incarnation=1)
    # The next read starts a new incarnation; the old one still fails.
    assert log.record(A, "y", 1) == (3, 1)
    with pytest.raises(SessionExpired, match="recreated|not 1"):
        log.read_set(A, incarnation=1)
    assert log.read_set(A, incarnation=3) == {"y": 1}
    assert log.stats() == {"sessions": 2, "entries": 2, "expired": 0, "evicted": 0}


# ---------------------------------------------------------------- incarnations / fail closed


def test_ttl_expiry_is_lazy_and_fails_closed():
    log, clock = make_log(ttl=10)
    log.record(A, "x", 1)
    clock.advance(10)  # exactly the TTL: not yet idle *longer* than it
    assert log.read_set(A, incarnation=1) == {"x": 1}
    clock.advance(10.5)
    with pytest.raises(SessionExpired, match="idle") as e:
        log.read_set(A, incarnation=1)
    assert e.value.details["reason"] == "ttl"
    assert log.stats() == {"sessions": 0, "entries": 0, "expired": 1, "evicted": 0}


def test_read_after_expiry_creates_a_new_incarnation_and_old_one_fails():
    log, clock = make_log(ttl=10)
    inc, _ = log.record(A, "x", 1)
    clock.advance(11)
    new_inc, seq = log.record(A, "y", 1)
    assert (new_inc, seq) == (2, 1)
    # The delivery of x was lost with the old record: a commit under it must fail.
    with pytest.raises(SessionExpired) as e:
        log.read_set(A, incarnation=inc)
    assert e.value.details["reason"] == "recreated"
    assert log.read_set(A, incarnation=new_inc) == {"y": 1}


def test_any_access_counts_as_activity():
    log, clock = make_log(ttl=10)
    log.record(A, "x", 1)
    for access in (
        lambda: log.touch(A),
        lambda: log.read_set(A),
        lambda: log.forget(A, ["nothing"]),
        lambda: log.reset(A),
        lambda: log.advance(A, {"x": 2}),
        lambda: log.record(A, "x", 2),
    ):
        clock.advance(8)
        access()
    clock.advance(8)
    assert log.read_set(A, incarnation=1) == {"x": 2}


def test_idle_means_longer_than_the_ttl_for_every_access():
    log, clock = make_log(ttl=10)
    log.record(A, "x", 1)
    log.record(B, "x", 1)
    log.record(C, "x", 1)
    clock.advance(10)
    assert log.expire_idle() == 0
    assert log.incarnation_of(A) == 1
    assert log.touch(B) is True
    assert log.record(C, "y", 1) == (3, 2)
    clock.advance(0.001)
    # Only A is idle now: incarnation_of() did not count as activity, touch() did.
    assert log.expire_idle() == 1
    assert log.incarnation_of(A) is None
    assert log.incarnation_of(B) == 2
    assert log.record(C, "z", 1) == (3, 3)


def test_incarnation_of_does_not_count_as_activity_and_expires_idle_records():
    log, clock = make_log(ttl=10)
    log.record(A, "x", 1)
    clock.advance(8)
    assert log.incarnation_of(A) == 1
    clock.advance(8)
    assert log.incarnation_of(A) is None
    assert log.stats()["expired"] == 1


def test_touch_of_an_idle_session_expires_it_instead_of_reviving_it():
    log, clock = make_log(ttl=10)
    log.record(A, "x", 1)
    clock.advance(11)
    assert log.touch(A) is False
    assert log.touch(B) is False
    with pytest.raises(SessionExpired):
        log.read_set(A, incarnation=1)


def test_a_restarted_shard_fails_closed():
    config = DeliveryLogConfig()
    before = DeliveryLog(config, clock=FakeClock())
    inc, _ = before.record(A, "x", 1)
    after = DeliveryLog(config, clock=FakeClock())  # the shard restarted: a new, empty log
    with pytest.raises(SessionExpired, match="restarted") as e:
        after.read_set(A, incarnation=inc)
    assert e.value.details["reason"] == "restarted"
    # An incarnation this log never issued fails even if the session now has a record.
    after.record(B, "y", 1)
    after.record(A, "y", 1)  # incarnation 2 in the new log
    with pytest.raises(SessionExpired, match="restarted"):
        after.read_set(A, incarnation=7)


def test_first_incarnation_keeps_numbers_apart_across_restarts():
    before = DeliveryLog(clock=FakeClock(), first_incarnation=1)
    inc, _ = before.record(A, "x", 1)
    after = DeliveryLog(clock=FakeClock(), first_incarnation=1 + 2**32)
    assert after.record(A, "y", 1) == (1 + 2**32, 1)
    with pytest.raises(SessionExpired, match="restarted"):
        after.read_set(A, incarnation=inc)
    with pytest.raises(ValueError):
        DeliveryLog(first_incarnation=0)


def test_an_incarnation_of_another_session_is_refused():
    log, _ = make_log()
    log.record(A, "x", 1)
    log.record(B, "x", 1)
    with pytest.raises(SessionExpired):
        log.read_set(A, incarnation=2)


# ---------------------------------------------------------------- caps


def test_per_session_cap_raises_and_changes_nothing():
    log, clock = make_log(ttl=10, max_entries=3)
    log.record_many(A, [("a", 1), ("b", 1), ("c", 1)])
    clock.advance(6)
    with pytest.raises(LimitExceeded, match="has 3 deliveries on this shard") as e:
        log.record(A, "d", 1)
    assert e.value.details["limit"] == 3
    assert "forget keys or reset the session" in e.value.message
    # Nothing changed: not the entries, not the seq counter, not the activity time.
    assert log.read_set(A) == {"a": 1, "b": 1, "c": 1}
    clock.advance(6)
    assert log.incarnation_of(A) == 1
    # Re-recording a logged key never fails.
    assert log.record(A, "b", 2) == (1, 4)
    assert log.read_set(A) == {"a": 1, "b": 2, "c": 1}


def test_refused_record_does_not_refresh_activity():
    log, clock = make_log(ttl=10, max_entries=1)
    log.record(A, "a", 1)
    clock.advance(6)
    with pytest.raises(LimitExceeded):
        log.record(A, "b", 1)
    clock.advance(6)
    assert log.incarnation_of(A) is None


def test_record_many_over_the_cap_is_all_or_nothing():
    log, _ = make_log(max_entries=3)
    log.record(A, "a", 1)
    with pytest.raises(LimitExceeded):
        log.record_many(A, [("a", 2), ("b", 1), ("c", 1), ("d", 1)])
    assert log.read_set(A) == {"a": 1}
    assert log.record(A, "z", 1) == (1, 2)
    # Existing keys and repeats do not count as new.
    log.record_many(A, [("a", 3), ("b", 1), ("b", 2), ("z", 2)])
    assert log.read_set(A) == {"a": 3, "b": 2, "z": 2}
    # Too many for a session with no record: the record is not created either.
    with pytest.raises(LimitExceeded):
        log.record_many(B, [("a", 1), ("b", 1), ("c", 1), ("d", 1)])
    assert log.incarnation_of(B) is None
    assert log.stats() == {"sessions": 1, "entries": 3, "expired": 0, "evicted": 0}
    assert log.record(B, "a", 1) == (2, 1)


def test_advance_may_exceed_the_per_session_cap():
    log, _ = make_log(max_entries=2)
    log.record_many(A, [("a", 1), ("b", 1)])
    log.advance(A, {"c": 2, "d": 2})
    assert log.read_set(A) == {"a": 1, "b": 1, "c": 2, "d": 2}
    # Over the cap, reads of new keys are refused; re-reads still work.
    with pytest.raises(LimitExceeded):
        log.record(A, "e", 1)
    log.record(A, "c", 3)
    assert log.stats()["entries"] == 4


def test_session_cap_evicts_the_most_idle_session_which_then_fails_closed():
    """A full log never refuses a new session (one client opening many would lock every
    other agent out until the TTL ran out): the least recently active record goes, and
    that session's next commit fails closed."""
    log, clock = make_log(ttl=10, max_sessions=2)
    log.record(A, "x", 1)
    log.record(B, "x", 1)
    clock.advance(5)
    log.record(A, "y", 1)  # A active again: B is now the most idle
    assert log.record(C, "x", 1) == (3, 1)
    assert log.stats() == {"sessions": 2, "entries": 3, "expired": 0, "evicted": 1}
    with pytest.raises(SessionExpired, match="evicted"):
        log.read_set(B, incarnation=2)
    assert log.read_set(A, incarnation=1) == {"x": 1, "y": 1}
    assert log.record_many(D, [("x", 1)]) == (4, 1)  # record_many evicts alike (C, idle since A's check)
    with pytest.raises(SessionExpired):
        log.read_set(C, incarnation=3)


def test_session_cap_expires_idle_sessions_to_make_room():
    log, clock = make_log(ttl=10, max_sessions=2)
    log.record(A, "x", 1)
    clock.advance(6)
    log.record(B, "x", 1)
    clock.advance(6)  # A idle 12s, B idle 6s
    assert log.record(C, "x", 1) == (3, 1)
    assert log.stats() == {"sessions": 2, "entries": 2, "expired": 1, "evicted": 0}
    with pytest.raises(SessionExpired):
        log.read_set(A, incarnation=1)
    assert log.read_set(B, incarnation=2) == {"x": 1}


def test_advance_may_exceed_the_session_cap():
    log, _ = make_log(max_sessions=1)
    log.record(A, "x", 1)
    assert log.advance(B, {"y": 1}) == 2
    assert log.stats()["sessions"] == 2
    assert log.record(C, "x", 1) == (3, 1)  # back under the cap: both older records went
    assert log.stats()["sessions"] == 1 and log.stats()["evicted"] == 2


def test_sequence_space_exhaustion_raises_instead_of_wrapping():
    log, _ = make_log()
    log.record(A, "x", 5)
    log._sessions[A].seq = MAX_SEQ - 1  # as if ~10**12 deliveries had been made
    assert log.record(A, "y", 6) == (1, MAX_SEQ)
    with pytest.raises(LimitExceeded, match="sequence numbers"):
        log.record(A, "z", 1)
    with pytest.raises(LimitExceeded):
        log.record_many(A, [("x", 1)])
    assert log.read_set(A) == {"x": 5, "y": 6}
    assert log.read_set(A, since_seq=MAX_SEQ) == {"y": 6}
    # A commit must not fail: advance starts a new incarnation instead.
    assert log.advance(A, {"z": 2}) == 2
    assert log.read_set(A, incarnation=2) == {"z": 2}
    with pytest.raises(SessionExpired):
        log.read_set(A, incarnation=1)
    assert log.stats()["entries"] == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"ttl_seconds": 0}, {"max_entries_per_session": 0}, {"max_sessions": 0}],
)
def test_config_refuses_non_positive_limits(kwargs):
    with pytest.raises(ValueError):
        DeliveryLogConfig(**kwargs)


# ---------------------------------------------------------------- sweep / stats


def test_expire_idle_sweeps_only_idle_sessions():
    log, clock = make_log(ttl=10)
    log.record(A, "x", 1)
    clock.advance(4)
    log.record(B, "x", 1)
    log.record(B, "y", 1)
    clock.advance(4)
    log.record(C, "x", 1)
    clock.advance(4)  # A idle 12s, B 8s, C 4s
    assert log.expire_idle() == 1
    assert log.stats() == {"sessions": 2, "entries": 3, "expired": 1, "evicted": 0}
    assert log.expire_idle() == 0
    # An explicit time: B idle 11s, C idle 7s.
    assert log.expire_idle(now=clock.now + 3) == 1
    assert log.incarnation_of(B) is None
    assert log.incarnation_of(C) == 3
    assert log.expire_idle(now=clock.now + 100) == 1
    assert log.stats() == {"sessions": 0, "entries": 0, "expired": 3, "evicted": 0}


def test_expire_idle_respects_activity_order_not_creation_order():
    log, clock = make_log(ttl=10)
    log.record(A, "x", 1)
    log.record(B, "x", 1)
    clock.advance(6)
    log.read_set(A)  # A is now the most recently active
    clock.advance(6)  # B idle 12s, A idle 6s
    assert log.expire_idle() == 1
    assert log.incarnation_of(A) == 1
    assert log.incarnation_of(B) is None


def test_stats_count_entries_across_operations():
    log, _ = make_log()
    log.record_many(A, [("a", 1), ("b", 1)])
    log.record(B, "a", 1)
    log.advance(B, {"a": 2, "c": 1})
    assert log.stats() == {"sessions": 2, "entries": 4, "expired": 0, "evicted": 0}
    log.forget(A, ["a"])
    log.reset(B)
    assert log.stats() == {"sessions": 2, "entries": 1, "expired": 0, "evicted": 0}


def test_keys_are_shared_with_the_caller_not_copied():
    log, _ = make_log()
    key = "".join(["team-a/", "plan"])  # a fresh, non-interned str like a store's key
    log.record(A, key, 1)
    assert next(iter(log._sessions[A].entries)) is key
    again = "".join(["team-a/", "plan"])  # an equal but distinct object: a re-read re-inserts it
    log.record(A, again, 2)
    stored = next(iter(log._sessions[A].entries))
    assert stored is again and stored is not key


def test_memory_per_entry_stays_small():
    keys = [f"team-{i % 10}/item-{i}" for i in range(20_000)]
    sessions = [SessionRef(f"agent-{i}", "run") for i in range(20)]
    log, _ = make_log(max_entries=100_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for s_index, session in enumerate(sessions):
            for k_index in range(2_500):
                log.record(
                    session, keys[(s_index * 997 + k_index) % len(keys)], k_index % 700 + 300
                )
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    entries = log.stats()["entries"]
    assert entries == 50_000
    assert used / entries <= 150, f"{used / entries:.1f} bytes per entry"


# ---------------------------------------------------------------- model-based


SESSIONS = [A, B, C]
KEYS = ["k0", "k1", "k2", "k3", "k4", "k5"]
TTL = 10.0
MAX_ENTRIES = 4
MAX_SESSIONS = 2


class _ModelSession:
    def __init__(self, incarnation: int, now: float) -> None:
        self.incarnation = incarnation
        self.seq = 0
        self.last = now
        self.entries: dict[str, tuple[int, int]] = {}  # key -> (version, seq)


class DeliveryLogMachine(RuleBasedStateMachine):
    """DeliveryLog against a plain-dict model of the specification."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.log = DeliveryLog(
            DeliveryLogConfig(
                ttl_seconds=TTL, max_entries_per_session=MAX_ENTRIES, max_sessions=MAX_SESSIONS
            ),
            clock=self.clock,
        )
        self.sessions: dict[SessionRef, _ModelSession] = {}
        self.next_inc = 1
        self.expired = 0
        self.evicted = 0
        self.known_incs: dict[SessionRef, list[int]] = {s: [] for s in SESSIONS}

    # -- model helpers

    def _live(self, s: SessionRef) -> _ModelSession | None:
        m = self.sessions.get(s)
        if m is not None and self.clock.now - m.last > TTL:
            del self.sessions[s]
            self.expired += 1
            return None
        return m

    def _create(self, s: SessionRef, enforce: bool = True) -> _ModelSession | None:
        if len(self.sessions) >= MAX_SESSIONS:
            for other in list(self.sessions):
                self._live(other)
            while enforce and len(self.sessions) >= MAX_SESSIONS:
                del self.sessions[next(iter(self.sessions))]  # the least recently active
                self.evicted += 1
        m = _ModelSession(self.next_inc, self.clock.now)
        self.known_incs[s].append(self.next_inc)
        self.next_inc += 1
        self.sessions[s] = m
        return m

    # -- rules

    @rule(dt=st.sampled_from([0.0, 1.0, 4.0, 10.0, 11.0]))
    def tick(self, dt):
        self.clock.advance(dt)

    @rule(
        s=st.sampled_from(SESSIONS),
        items=st.lists(
            st.tuples(st.sampled_from(KEYS), st.integers(0, 2**45)), min_size=0, max_size=5
        ),
    )
    def record_many(self, s, items):
        m = self._live(s)
        if m is None:
            ok = len({k for k, _ in items}) <= MAX_ENTRIES
            if ok:
                m = self._create(s)
                ok = m is not None
        else:
            new_keys = len({k for k, _ in items if k not in m.entries})
            ok = new_keys == 0 or len(m.entries) + new_keys <= MAX_ENTRIES
        if not ok:
            with pytest.raises(LimitExceeded):
                if len(items) == 1:
                    self.log.record(s, *items[0])
                else:
                    self.log.record_many(s, items)
            return
        m.last = self.clock.now
        self.sessions[s] = self.sessions.pop(s)
        first = m.seq + 1
        for k, v in items:
            m.seq += 1
            m.entries[k] = (v, m.seq)
        if len(items) == 1:
            got = self.log.record(s, *items[0])
        else:
            got = self.log.record_many(s, items)
        assert got == (m.incarnation, first)

    @rule(
        s=st.sampled_from(SESSIONS),
        versions=st.dictionaries(st.sampled_from(KEYS), st.integers(0, 1000), max_size=4),
    )
    def advance(self, s, versions):
        m = self._live(s)
        if m is None:
            m = self._create(s, enforce=False)
        m.last = self.clock.now
        self.sessions[s] = self.sessions.pop(s)
        for k, v in versions.items():
            if k in m.entries:
                m.entries[k] = (v, m.entries[k][1])
            else:
                m.seq += 1
                m.entries[k] = (v, m.seq)
        assert self.log.advance(s, versions) == m.incarnation

    @rule(s=st.sampled_from(SESSIONS), keys=st.lists(st.sampled_from(KEYS), max_size=3))
    def forget(self, s, keys):
        m = self._live(s)
        removed = 0
        if m is not None:
            m.last = self.clock.now
            self.sessions[s] = self.sessions.pop(s)
            for k in set(keys):
                removed += m.entries.pop(k, None) is not None
        assert self.log.forget(s, keys) == removed

    @rule(s=st.sampled_from(SESSIONS))
    def reset(self, s):
        m = self._live(s)
        removed = 0
        if m is not None:
            m.last = self.clock.now
            self.sessions[s] = self.sessions.pop(s)
            removed = len(m.entries)
            m.entries.clear()
        assert self.log.reset(s) == removed

    @rule(s=st.sampled_from(SESSIONS))
    def drop(self, s):
        assert self.log.drop(s) is (self.sessions.pop(s, None) is not None)

    @rule(
        s=st.sampled_from(SESSIONS),
        which=st.sampled_from(["none", "current", "old", "bogus"]),
        since=st.none() | st.integers(0, 60),
    )
    def read_set(self, s, which, since):
        m = self._live(s)
        if which == "none":
            inc = None
        elif which == "current":
            inc = m.incarnation if m is not None else (self.known_incs[s] or [None])[-1]
        elif which == "old":
            inc = self.known_incs[s][0] if self.known_incs[s] else None
        else:
            inc = 10_000
        fails = inc is not None and (m is None or m.incarnation != inc)
        if fails:
            with pytest.raises(SessionExpired):
                self.log.read_set(s, incarnation=inc, since_seq=since)
            return
        expected: dict[str, int] = {}
        if m is not None:
            m.last = self.clock.now
            self.sessions[s] = self.sessions.pop(s)
            expected = {k: v for k, (v, q) in m.entries.items() if since is None or q >= since}
        assert self.log.read_set(s, incarnation=inc, since_seq=since) == expected

    @rule(s=st.sampled_from(SESSIONS))
    def incarnation_of(self, s):
        m = self._live(s)
        assert self.log.incarnation_of(s) == (None if m is None else m.incarnation)

    @rule()
    def expire_idle(self):
        count = 0
        for s in list(self.sessions):
            count += self._live(s) is None
        assert self.log.expire_idle() == count

    @invariant()
    def stats_agree(self):
        assert self.log.stats() == {
            "sessions": len(self.sessions),
            "entries": sum(len(m.entries) for m in self.sessions.values()),
            "expired": self.expired,
            "evicted": self.evicted,
        }


DeliveryLogMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_delivery_log_matches_model = DeliveryLogMachine.TestCase
test_delivery_log_matches_model.pytestmark = [pytest.mark.slow]  # 300 examples of 40 steps
