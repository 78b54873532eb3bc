"""The participant core without any I/O: validation, locks, outcomes, replay, snapshots."""

from __future__ import annotations

import pytest

from oribus.delivery_log import DeliveryLog, DeliveryLogConfig
from oribus.errors import InvalidRequest, SessionExpired
from oribus.messages import ReadRequest, Scope, ShardTxn, TxnState, VoteKind
from oribus.shards.participant import Blocked, Known, Participant, Pending, Refused
from oribus.shards.store import VersionedStore
from oribus.shards.txn import InvalidTransition, RecordType, Txn, is_transition_valid
from oribus.types import SessionRef

A = SessionRef("a", "1")
B = SessionRef("b", "1")


def make(epoch: int = 7) -> Participant:
    return Participant(0, epoch, VersionedStore(history_limit=3), DeliveryLog(DeliveryLogConfig()))


def commit(p: Participant, txn_id: str, session=A, **kw) -> Pending | Refused | Known:
    st = ShardTxn(txn_id=txn_id, session=session, participants=(0,), **kw)
    r = p.begin_one_phase(st)
    if isinstance(r, Pending):
        p.apply_commit(txn_id)
    return r


def test_transition_table():
    assert is_transition_valid(None, TxnState.PREPARED)
    assert is_transition_valid(TxnState.PREPARED, TxnState.ABORTED)
    assert not is_transition_valid(TxnState.COMMITTED, TxnState.ABORTED)
    assert not is_transition_valid(TxnState.ABORTED, TxnState.COMMITTED)
    t = Txn("t", A)
    t.transition(TxnState.PREPARED)
    t.transition(TxnState.COMMITTED)
    with pytest.raises(InvalidTransition):
        t.transition(TxnState.ABORTED)


def test_read_records_delivery_and_returns_token():
    p = make()
    commit(p, "t1", writes={"k": b"\x01"})
    reply = p.read(ReadRequest(B, ["k", "absent"]))
    assert [(i.key, i.version) for i in reply.items] == [("k", 1), ("absent", 0)]
    assert reply.token[0] == 7
    assert p.dlog.read_set(B) == {"k": 1, "absent": 0}


def test_stale_logged_read_is_refused_with_details():
    p = make()
    p.read(ReadRequest(B, ["k"]))
    commit(p, "t1", writes={"k": b"\x01"})
    r = commit(p, "t2", session=B, writes={"other": b"\x02"})
    assert isinstance(r, Refused)
    assert r.stale == [("k", 0, 1, "stale_read")]
    assert p.store.version("other") == 0


def test_explicit_entry_checked_in_addition_to_log():
    p = make()
    commit(p, "t1", writes={"k": b"\x01"})
    p.read(ReadRequest(B, ["k"]))  # logged at 1 (current)
    r = commit(p, "t2", session=B, writes={"o": b"1"}, read_set={"k": 0})
    assert isinstance(r, Refused) and r.stale == [("k", 0, 1, "stale_read")]


def test_write_intent_blocks_reads_and_writers():
    p = make()
    st = ShardTxn(txn_id="t1", session=A, writes={"k": b"1"}, participants=(0, 1), primary=0)
    pending = p.prepare(st)
    assert isinstance(pending, Pending) and pending.record[0] == RecordType.PREPARE
    assert isinstance(p.read(ReadRequest(B, ["k"])), Blocked)
    r = p.prepare(ShardTxn(txn_id="t2", session=B, writes={"k": b"2"}, participants=(0, 1)))
    assert isinstance(r, Refused) and r.stale[0].reason == "locked" and r.blockers == {"t1"}
    p.apply_abort("t1")
    assert not p.write_locks and not isinstance(p.read(ReadRequest(B, ["k"])), Blocked)


def test_read_lock_blocks_writer_not_reader():
    p = make()
    p.read(ReadRequest(A, ["r"]))
    st = ShardTxn(txn_id="t1", session=A, writes={"w": b"1"}, participants=(0, 1))
    assert isinstance(p.prepare(st), Pending)
    assert "r" in p.read_locks
    assert not isinstance(p.read(ReadRequest(B, ["r"])), Blocked)
    r = commit(p, "t2", session=B, writes={"r": b"x"})
    assert isinstance(r, Refused) and r.only_locked


def test_token_mismatch_is_session_expired():
    p = make(epoch=7)
    reply = p.read(ReadRequest(A, ["k"]))
    with pytest.raises(SessionExpired):
        commit(p, "t1", writes={"k": b"1"}, token=(6, reply.token[1]))
    with pytest.raises(SessionExpired):
        commit(p, "t1", writes={"k": b"1"}, token=(7, reply.token[1] + 1))
    assert not p.write_locks and p.store.version("k") == 0


def test_refusal_order_expired_then_invalid_then_conflict():
    p = make()
    p.read(ReadRequest(A, ["k"]))
    commit(p, "t0", session=B, writes={"k": b"1"})  # A's read is now stale
    with pytest.raises(SessionExpired):
        commit(p, "t1", rollback={"k": 99}, token=(1, 1))
    with pytest.raises(InvalidRequest):
        commit(p, "t1", rollback={"k": 99})
    assert isinstance(commit(p, "t1", rollback={"k": 1}), Refused)


def test_rollback_resolves_from_history_and_limits():
    p = make()
    for i in range(5):
        commit(p, f"t{i}", session=B, writes={"k": bytes([i])})
    with pytest.raises(InvalidRequest):
        commit(p, "r1", session=B, rollback={"k": 1})  # history keeps 3 versions
    commit(p, "r2", session=B, rollback={"k": 3})
    e = p.store.current("k")
    assert e.version == 6 and e.value == bytes([2])
    commit(p, "r3", session=B, rollback={"k": 0})
    assert p.store.current("k").deleted


def test_resolved_transactions_keep_versions_not_values():
    """The last max_resolved outcomes must not hold their values in memory (issue 20)."""
    p = make()
    big = b"x" * 10_000
    commit(p, "t1", writes={"k": big, "gone": None})
    commit(p, "t2", writes={"k": b"newer"})
    t1 = p.known("t1")
    assert t1 is not None and t1.state is TxnState.COMMITTED
    assert all(w.value is None for w in t1.writes.values())
    assert t1.versions == {"k": 1, "gone": 1} and t1.writes["gone"].deleted
    assert p.store.entry_at("k", 1).value == big  # the store keeps it
    r = commit(p, "t1", writes={"k": big})  # a retry still gets its versions
    assert isinstance(r, Known) and p.vote_for(r).versions == {"k": 1, "gone": 1}


def test_idempotent_one_phase_retry():
    p = make()
    commit(p, "same", writes={"k": b"1"})
    r = commit(p, "same", writes={"k": b"1"})
    assert isinstance(r, Known) and r.txn.state is TxnState.COMMITTED
    assert p.vote_for(r).kind is VoteKind.COMMITTED and p.vote_for(r).versions == {"k": 1}
    assert p.store.version("k") == 1


def test_decide_is_compare_and_set_with_tombstones():
    p = make()
    state, rec, reason = p.begin_decide("never-prepared", True)
    assert state is TxnState.ABORTED and rec[0] == RecordType.ABORT and reason == ""
    p.apply_abort("never-prepared")
    late = p.prepare(ShardTxn(txn_id="never-prepared", session=A, writes={"k": b"1"}))
    assert p.vote_for(late).kind is VoteKind.NO
    assert p.begin_decide("never-prepared", True) == (TxnState.ABORTED, None, "")


def test_transaction_scope_uses_deliveries_since_begin():
    p = make()
    old = p.read(ReadRequest(A, ["old"]))
    commit(p, "t0", session=B, writes={"old": b"1"})
    new = p.read(ReadRequest(A, ["new"]))
    assert new.seq > old.seq
    st = dict(scope=Scope.TRANSACTION, since_seq=new.seq, read_set={"new": 0})
    assert isinstance(commit(p, "t1", writes={"w": b"1"}, **st), Pending)
    assert isinstance(commit(p, "t2", writes={"w": b"2"}), Refused)  # session scope sees "old"


def test_replay_and_snapshot_rebuild_the_same_state():
    p = make()
    records = []
    for i in range(4):
        r = p.begin_one_phase(ShardTxn(txn_id=f"c{i}", session=A, writes={"k": bytes([i])}))
        records.append(r.record)
        p.apply_commit(f"c{i}")
    r = p.prepare(ShardTxn(txn_id="p1", session=A, writes={"x": b"1"}, read_set={"k": 4},
                           participants=(0, 1), primary=1))
    records.append(r.record)
    q = make(epoch=8)
    for rtype, body in records + records:  # replay twice: idempotent
        q.replay(rtype, body)
    assert q.store.history("k") == p.store.history("k")
    assert set(q.prepared) == {"p1"} and q.write_locks == {"x": "p1"} and "k" in q.read_locks
    snap = q.to_snapshot()
    s = make(epoch=9)
    s.load_snapshot(snap)
    assert s.store.history("k") == q.store.history("k")
    assert set(s.prepared) == {"p1"} and s.write_locks == {"x": "p1"}
    assert s.known("c2").state is TxnState.COMMITTED
    s.replay(RecordType.COMMIT, {"i": "p1"})
    assert s.store.version("x") == 1 and not s.write_locks


def test_kept_decision_is_released_and_release_replays():
    p = make()
    st = ShardTxn(txn_id="d1", session=A, writes={"k": b"1"}, participants=(0, 1), primary=0)
    prep = p.prepare(st)
    state, rec, _ = p.begin_decide("d1", True)
    p.apply_commit("d1")
    assert "d1" in p.decisions  # primary of a multi-shard commit: kept outside the LRU
    assert p.release("d1") and "d1" not in p.decisions and p.known("d1").state is TxnState.COMMITTED
    q = make(epoch=8)
    for rtype, body in (prep.record, rec):
        q.replay(rtype, body)
    assert "d1" in q.decisions  # without the RELEASE record a restart keeps it again
    q.replay(RecordType.RELEASE, {"i": "d1"})
    assert "d1" not in q.decisions and q.known("d1").state is TxnState.COMMITTED
