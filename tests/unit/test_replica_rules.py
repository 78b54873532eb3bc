"""The replication rules without IO (oribus/shards/replica/rules.py) and the primary's
ReplicatedWal against scripted peers (oribus/shards/replica/primary.py)."""

from __future__ import annotations

import asyncio

import pytest

from oribus.errors import Unavailable
from oribus.shards.replica import AppendBatch, AppendReply, ReplicatedWal, ReplicationOptions, Terms
from oribus.shards.replica.rules import (
    commit_index,
    may_promise,
    plan_append,
    quorum_lsn,
    resend_from,
)
from oribus.shards.wal import Wal
from oribus.shards.wal.record import TERM_START, encode_record, split_frames


def frames(first: int, count: int, term_start: int | None = None) -> bytes:
    out = []
    for lsn in range(first, first + count):
        if term_start is not None and lsn == first:
            out.append(encode_record(TERM_START, lsn, {"t": term_start, "m": 0}))
        else:
            out.append(encode_record(1, lsn, {"i": str(lsn)}))
    return b"".join(out)


def batch(term: int, prev: tuple[int, int], data: bytes = b"", commit: int = 0) -> AppendBatch:
    last = prev[1] + len(split_frames(data, prev[1] + 1, decode_bodies=False))
    return AppendBatch(term, 0, prev, data, last, commit)


def test_plan_append_rules() -> None:
    terms = Terms([(1, 1), (2, 6)])  # records 1..5 of term 1, 6..8 of term 2
    kw = {"promised_term": 2, "terms": terms, "last_lsn": 8, "floor": 0}
    assert plan_append(batch(1, (2, 8)), **kw).refusal == "term"
    assert plan_append(batch(2, (2, 9)), **kw).refusal == "mismatch"  # beyond its end
    assert plan_append(batch(2, (1, 7)), **kw).refusal == "mismatch"  # 7 is of term 2 here
    damaged = bytearray(frames(9, 2))
    damaged[30] ^= 1
    assert plan_append(AppendBatch(2, 0, (2, 8), bytes(damaged), 10, 0), **kw).refusal == "damaged"
    assert plan_append(AppendBatch(2, 0, (2, 8), frames(9, 2), 11, 0), **kw).refusal == "damaged"
    # new records only
    plan = plan_append(batch(2, (2, 8), frames(9, 2)), **kw)
    assert plan.ok and plan.truncate_after is None and plan.append_from == 0
    # a resend of what it holds: nothing to cut, nothing to append
    plan = plan_append(batch(2, (1, 5), frames(6, 3, term_start=2)), **kw)
    assert plan.ok and plan.truncate_after is None and plan.append_from == 3
    # term 3's primary, whose log has term 1 up to 5 and its own from 6: cut after 5
    plan = plan_append(batch(3, (1, 5), frames(6, 2, term_start=3)), **{**kw, "promised_term": 3})
    assert plan.ok and plan.truncate_after == 5 and plan.append_from == 0
    # records a snapshot covers agree by construction
    below = frames(4, 2) + frames(6, 3, term_start=2) + frames(9, 1)
    plan = plan_append(batch(2, (7, 3), below), **{**kw, "floor": 5})  # prev's term is not checked
    assert plan.ok and plan.truncate_after is None and plan.append_from == 5


def test_quorum_and_commit_index() -> None:
    assert quorum_lsn(10, [7, 3], 3) == 7
    assert quorum_lsn(10, [3], 3) == 3
    assert quorum_lsn(10, [], 3) == 0  # learners are not counted: no majority known
    assert quorum_lsn(10, [9, 8, 1], 5) == 8
    assert commit_index(0, 7, None) == 0  # no term of its own yet
    assert commit_index(0, 7, 8) == 0  # an older term's records do not commit by their copies
    assert commit_index(0, 8, 8) == 8
    assert commit_index(9, 8, 8) == 9  # never goes down


def test_resend_from_moves_back_and_always_progresses() -> None:
    terms = Terms([(1, 1), (3, 10)])
    assert resend_from(terms, (3, 20), 12, 21) == 13  # they end before prev
    assert resend_from(terms, (3, 20), 25, 21) == 10  # their 20 is of another term
    assert resend_from(terms, (3, 10), 25, 11) == 10
    assert resend_from(terms, (0, 0), 0, 1) == 1


def test_may_promise() -> None:
    assert may_promise(True, 3, 3) and may_promise(True, 3, 4)
    assert not may_promise(True, 3, 2)
    assert not may_promise(False, 0, 9)  # a learner promises nothing


class ScriptedPeer:
    """A member that answers as told: accepts (its durable LSN the batch's end), refuses
    naming a term, or is unreachable."""

    def __init__(self, member_id: int, term: int = 1) -> None:
        self.member_id = member_id
        self.term = term
        self.reachable = True
        self.voter = True
        self.batches: list[AppendBatch] = []

    async def append(self, b: AppendBatch) -> AppendReply:
        await asyncio.sleep(0)
        if not self.reachable:
            raise Unavailable("down")
        self.batches.append(b)
        if b.term < self.term:
            return AppendReply(False, self.term, 0, (0, 0), voter=self.voter)
        return AppendReply(True, self.term, b.last_lsn, (b.term, b.last_lsn), voter=self.voter)

    async def promise(self, term: int, candidate: int):  # pragma: no cover - not used here
        raise NotImplementedError

    async def install_snapshot(self, chunk):  # pragma: no cover - not used here
        raise NotImplementedError


OPTS = ReplicationOptions(heartbeat_seconds=0.01, retry_min_seconds=0.001, retry_max_seconds=0.01)


async def started(tmp_path, peers) -> ReplicatedWal:
    rw = ReplicatedWal(Wal.open(tmp_path), Terms(), term=1, member_id=0, replicas=3, peers=peers, options=OPTS)
    rw.start()
    await asyncio.wait_for(rw.sync(rw.begin_term()), 5)
    return rw


async def test_a_learners_acknowledgement_does_not_count(tmp_path) -> None:
    a, b = ScriptedPeer(1), ScriptedPeer(2)
    b.reachable = False
    a.voter = False
    rw = ReplicatedWal(Wal.open(tmp_path), Terms(), term=1, member_id=0, replicas=3, peers=[a, b], options=OPTS)
    rw.start()
    lsn = rw.begin_term()
    done, _ = await asyncio.wait({asyncio.ensure_future(rw.sync(lsn))}, timeout=0.2)
    assert not done and a.batches, "committed with a learner's acknowledgement"
    a.voter = True
    await asyncio.wait_for(asyncio.gather(*done, rw.sync(lsn)), 5)
    assert rw.commit_lsn == lsn
    await rw.close()


async def test_a_reply_naming_a_higher_term_deposes_for_good(tmp_path) -> None:
    a, b = ScriptedPeer(1), ScriptedPeer(2)
    deposed: list[int] = []
    rw = await started(tmp_path, [a, b])
    rw.on_deposed = deposed.append
    a.term = b.term = 2
    lsn = rw.append(1, {"i": "x"})
    with pytest.raises(Unavailable):
        await asyncio.wait_for(rw.sync(lsn), 5)
    assert deposed == [2] and rw.deposed == 2
    with pytest.raises(Unavailable):
        rw.append(1, {"i": "y"})
    a.term = b.term = 1  # even if a majority would take its batches again
    with pytest.raises(Unavailable):
        await rw.sync()
    await rw.close()


async def test_an_unreachable_follower_is_retried_and_catches_up(tmp_path) -> None:
    a, b = ScriptedPeer(1), ScriptedPeer(2)
    b.reachable = False
    rw = await started(tmp_path, [a, b])
    for i in range(10):
        await asyncio.wait_for(rw.sync(rw.append(1, {"i": i})), 5)
    b.reachable = True
    for _ in range(500):
        if rw.followers[1].match_lsn == rw.last_lsn:
            break
        await asyncio.sleep(0.01)
    assert rw.followers[1].match_lsn == rw.last_lsn
    shipped = b"".join(x.frames for x in b.batches)
    assert [f.lsn for f in split_frames(shipped, 1)] == list(range(1, rw.last_lsn + 1))
    await rw.close()
