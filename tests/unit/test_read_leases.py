"""Read-only participants in the participant core (specs/PROTOCOL.md §5.8), without I/O.

A validation holds read locks in memory for a lease (no record); an expired lease no longer
blocks a writer; the commit point refuses past the leases' deadline less the skew bound;
a shard refuses new write intents during its restart grace; a one-phase commit holding
leases elsewhere waits for a lease only if its id is smaller (wait-die). The clocks are
fakes the tests move by hand.
"""

from __future__ import annotations

import pytest

from oribus.delivery_log import DeliveryLog, DeliveryLogConfig
from oribus.errors import InvalidRequest, SessionExpired, Unavailable
from oribus.messages import LEASE_EXPIRED, ReadRequest, ShardTxn, TxnState, VoteKind
from oribus.shards.participant import Known, Late, Leased, Nothing, Participant, Pending, Refused
from oribus.shards.store import VersionedStore
from oribus.shards.txn import RecordType
from oribus.types import SessionRef

A = SessionRef("a", "1")
B = SessionRef("b", "1")
LEASE = 2.0
SKEW = 0.25
WALL0 = 1_700_000_000.0


class Clocks:
    """A monotonic clock and a wall clock that move only when told to."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = WALL0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def make(clocks: Clocks, *, grace: bool = False, epoch: int = 7) -> Participant:
    return Participant(
        0, epoch, VersionedStore(history_limit=5), DeliveryLog(DeliveryLogConfig(), clock=lambda: clocks.mono),
        clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall,
        read_lease_seconds=LEASE, clock_skew_seconds=SKEW, restart_grace=grace,
    )


def write(p: Participant, txn_id: str, key: str, session: SessionRef = B, **kw) -> object:
    """A one-phase commit of ``key`` (applied if it passes)."""
    r = p.begin_one_phase(ShardTxn(txn_id=txn_id, session=session, writes={key: b"\x01"}, **kw))
    if isinstance(r, Pending):
        p.apply_commit(txn_id)
    return r


def validation(p: Participant, txn_id: str, session: SessionRef = A, **kw) -> ShardTxn:
    token = p.read(ReadRequest(session, ["k"])).token
    return ShardTxn(txn_id=txn_id, session=session, token=token, **kw)


def test_a_validation_leases_read_locks_without_a_record():
    c = Clocks()
    p = make(c)
    r = p.validate_reads(validation(p, "ro"))
    assert isinstance(r, Leased) and r.seconds == LEASE
    assert p.read_locks == {"k": {"ro"}} and set(p.leases) == {"ro"}
    assert not p.prepared and p.known("ro") is None  # nothing to log, nothing to recover
    assert p.to_snapshot()["txns"] == []
    # a writer of the leased key is refused (no-wait here), its reason "locked"
    refused = write(p, "w", "k")
    assert isinstance(refused, Refused) and refused.stale[0].reason == "locked" and refused.blockers == {"ro"}
    # a reader is never blocked by it
    assert p.read(ReadRequest(B, ["k"])).items[0].version == 0


def test_a_validation_checks_like_prepare():
    c = Clocks()
    p = make(c)
    st = validation(p, "ro")
    write(p, "w", "k")  # the session's read is stale now
    r = p.validate_reads(st)
    assert isinstance(r, Refused) and r.stale[0].reason == "stale_read"
    assert not p.leases and not p.read_locks
    # a write intent on a read key is a refusal too, not a wait
    st2 = validation(p, "ro2")
    blocker = p.begin_one_phase(ShardTxn(txn_id="inflight", session=B, writes={"k": b"\x02"}))
    assert isinstance(blocker, Pending)
    r2 = p.validate_reads(st2)
    assert isinstance(r2, Refused) and r2.stale[0].reason == "locked" and r2.blockers == {"inflight"}
    # a token of an earlier life of the shard: SessionExpired, first
    other = make(c, epoch=8)
    with pytest.raises(SessionExpired):
        other.validate_reads(ShardTxn(txn_id="ro3", session=A, token=(7, 1)))
    # a part that writes is not a read-only validation
    with pytest.raises(InvalidRequest):
        p.validate_reads(ShardTxn(txn_id="ro4", session=A, writes={"x": b"\x01"}))


def test_nothing_to_hold_is_nothing():
    c = Clocks()
    p = make(c)
    p.read(ReadRequest(A, ["k"]))
    p.dlog.forget(A, ["k"])
    token = (7, p.dlog.incarnation_of(A))
    assert isinstance(p.validate_reads(ShardTxn(txn_id="ro", session=A, token=token)), Nothing)
    assert not p.leases


def test_a_lease_ends_on_its_own_and_on_release():
    c = Clocks()
    p = make(c)
    p.validate_reads(validation(p, "ro"))
    c.advance(LEASE - 0.01)
    assert isinstance(write(p, "w1", "k"), Refused)  # still held
    assert p.lease_left("ro") == pytest.approx(0.01)
    c.advance(0.02)
    assert not isinstance(write(p, "w2", "k"), Refused)  # expired: the writer passes
    assert not p.leases and "k" not in p.read_locks
    p.validate_reads(validation(p, "ro2"))
    assert p.release_lease("ro2") and not p.read_locks
    assert not p.release_lease("ro2")  # once


def test_a_retry_extends_a_lease_and_never_shrinks_it():
    c = Clocks()
    p = make(c)
    st = validation(p, "ro", read_set={"other": 0})
    p.validate_reads(st)
    c.advance(1.5)
    p.dlog.forget(A, ["k"])  # the retry validates less than the first attempt did
    token = (7, p.dlog.incarnation_of(A))
    again = p.validate_reads(ShardTxn(txn_id="ro", session=A, token=token, read_set={"other": 0}))
    assert isinstance(again, Leased)
    assert p.leases["ro"].keys == {"k", "other"}  # the first attempt's keys stay covered
    c.advance(1.0)  # 2.5 s after the first validation, 1.0 after the retry
    assert isinstance(write(p, "w", "k"), Refused)


def test_the_one_phase_commit_point_refuses_past_the_deadline():
    c = Clocks()
    p = make(c)
    deadline = WALL0 + LEASE
    ok = p.begin_one_phase(ShardTxn(txn_id="t1", session=A, writes={"x": b"\x01"}, deadline=deadline))
    assert isinstance(ok, Pending)
    p.apply_commit("t1")
    # within ε of the deadline is already too late: the writer's clock may be ahead by ε
    c.wall = deadline - SKEW + 0.001
    late = p.begin_one_phase(ShardTxn(txn_id="t2", session=A, writes={"x": b"\x02"}, deadline=deadline))
    assert isinstance(late, Late) and late.deadline == deadline
    assert p.store.version("x") == 1 and not p.write_locks
    # without a deadline (no lease relied on) time does not matter
    assert isinstance(p.begin_one_phase(ShardTxn(txn_id="t3", session=A, writes={"x": b"\x03"})), Pending)
    # a known id answers from its record before any check, the deadline's included
    assert isinstance(p.begin_one_phase(ShardTxn(txn_id="t1", session=A, writes={"x": b"\x01"},
                                                 deadline=deadline)), Known)


def test_the_primary_refuses_to_commit_past_the_deadline():
    c = Clocks()
    p = make(c)
    for t in ("d1", "d2"):
        p.prepare(ShardTxn(txn_id=t, session=A, writes={t: b"\x01"}, participants=(0, 1), primary=0))
    state, record, reason = p.begin_decide("d1", True, WALL0 + LEASE)
    assert state is TxnState.COMMITTED and record[0] == RecordType.COMMIT and reason == ""
    c.advance(LEASE)
    state, record, reason = p.begin_decide("d2", True, WALL0 + LEASE)
    assert state is TxnState.ABORTED and record[0] == RecordType.ABORT and reason == LEASE_EXPIRED
    # an abort asked for is not "late", and no deadline means no check
    assert p.begin_decide("d2", False, WALL0)[2] == ""
    assert p.begin_decide("d2", True)[0] is TxnState.COMMITTED


def test_the_restart_grace_refuses_new_write_intents_only():
    c = Clocks()
    p = make(c, grace=True)
    assert p.grace_left() == pytest.approx(LEASE + 2 * SKEW)
    with pytest.raises(Unavailable) as e:
        p.begin_one_phase(ShardTxn(txn_id="w", session=B, writes={"k": b"\x01"}))
    assert "restart" in e.value.message and e.value.details["retry_after"] > 0
    with pytest.raises(Unavailable):
        p.prepare(ShardTxn(txn_id="w2", session=B, writes={"k": b"\x01"}, participants=(0, 1), primary=1))
    assert not p.write_locks and not p.prepared  # nothing taken
    # reads, validations and commits that write nothing pass
    assert isinstance(p.validate_reads(validation(p, "ro")), Leased)
    assert isinstance(p.begin_one_phase(ShardTxn(txn_id="r", session=B, expect={"k": 0})), Pending)
    c.advance(LEASE + 2 * SKEW)
    assert p.grace_left() == 0
    p.release_lease("ro")
    assert isinstance(write(p, "w3", "k"), Pending)


def test_a_prepared_transaction_recovered_in_the_grace_still_decides_and_applies():
    c = Clocks()
    p = make(c)
    rec = p.prepare(ShardTxn(txn_id="d", session=A, writes={"k": b"\x01"}, participants=(0, 1), primary=0))
    q = make(c, grace=True, epoch=8)  # the shard restarts: the PREPARE is replayed
    q.replay(*rec.record)
    state, _, _ = q.begin_decide("d", True)
    assert state is TxnState.COMMITTED
    q.apply_commit("d")
    assert q.store.version("k") == 1


def test_wait_die_between_leases():
    c = Clocks()
    p = make(c)
    p.validate_reads(validation(p, "m"))  # a lease held by "m"
    older = ShardTxn(txn_id="a", session=B, writes={"k": b"\x01"}, deadline=WALL0 + LEASE)
    younger = ShardTxn(txn_id="z", session=B, writes={"k": b"\x01"}, deadline=WALL0 + LEASE)
    plain = ShardTxn(txn_id="z", session=B, writes={"k": b"\x01"})  # holds nothing elsewhere
    for st in (older, younger, plain):
        r = p.begin_one_phase(st)
        assert isinstance(r, Refused) and r.only_locked and r.blockers == {"m"}
    assert p.may_wait(older, {"m"})  # "a" < "m": it may wait for the lease
    assert not p.may_wait(younger, {"m"})  # "z" > "m": refused at once, no cycle can form
    assert p.may_wait(plain, {"m"})
    # write intents never wait for anything: waiting for one is always allowed
    assert p.may_wait(younger, {"someone-prepared"})


def test_vote_for_a_lease():
    c = Clocks()
    p = make(c)
    st = validation(p, "ro")
    write(p, "w", "k")
    assert p.vote_for(p.validate_reads(st)).kind is VoteKind.NO
    assert p.vote_for(Nothing()).kind is VoteKind.NOTHING


def test_withdraw_answers_a_known_id_or_leaves_a_tombstone_and_names_what_is_wrong():
    c = Clocks()
    p = make(c)
    write(p, "done", "x")
    assert isinstance(p.withdraw(ShardTxn(txn_id="done", session=B, writes={"x": b"\x01"})), Known)
    # unknown: a tombstone first, then this shard's own refusal (here a stale read)
    st = validation(p, "w")
    write(p, "moved", "k")
    st.writes = {"y": b"\x01"}
    r = p.withdraw(st)
    assert isinstance(r, Refused) and [s.reason for s in r.stale] == ["stale_read"]
    assert p.known("w").state is TxnState.ABORTED
    assert isinstance(p.begin_one_phase(st), Known)  # a late copy finds the tombstone
    # SessionExpired still comes first, after the tombstone is down
    other = make(c, epoch=9)
    with pytest.raises(SessionExpired):
        other.withdraw(ShardTxn(txn_id="z", session=A, token=(7, 1), writes={"y": b"\x01"}))
    assert other.known("z").state is TxnState.ABORTED
