"""Two-phase commit across shards: atomic visibility, recovery, tombstones, waiting readers."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

import oribus
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig
from oribus.messages import ShardTxn, TxnState, VoteKind
from oribus.types import SessionRef

S = SessionRef("coord", "c1")


def keys_on_two_shards(engine: EmbeddedEngine) -> tuple[str, str]:
    by_shard: dict[int, str] = {}
    i = 0
    while len(by_shard) < 2:
        k = f"acct/{i}"
        by_shard.setdefault(engine.slot_map.shard_for(k), k)
        i += 1
    a, b = sorted(by_shard.values())
    return a, b


def txn_parts(engine: EmbeddedEngine, txn_id: str, writes: dict[str, object]) -> dict[int, ShardTxn]:
    from oribus.contract import CommitRequest

    req = CommitRequest(
        session=S,
        commit_id=txn_id,
        writes={k: msgpack.packb(v) for k, v in writes.items()},
        committed_at=time.time(),
    )
    return engine.bus.coordinator.split(req)


async def prepare_all(engine: EmbeddedEngine, parts: dict[int, ShardTxn]) -> list[VoteKind]:
    """Phase one on every participant, as a coordinator would; returns the votes."""
    return [(await engine.shards[sid].prepare(st)).kind for sid, st in parts.items()]


async def open_engine(data_dir, **kw) -> EmbeddedEngine:
    return await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=2, **kw))


async def value_of(engine: EmbeddedEngine, key: str):
    r = await engine.bus.read(SessionRef("reader", "r"), [key])
    raw = r.items[0].value
    return None if raw is None else msgpack.unpackb(raw)


async def test_prepared_without_decision_is_aborted_on_recovery(data_dir):
    engine = await open_engine(data_dir)
    a, b = keys_on_two_shards(engine)
    parts = txn_parts(engine, "t-orphan", {a: 1, b: 1})
    assert len(parts) == 2
    assert await prepare_all(engine, parts) == [VoteKind.YES, VoteKind.YES]
    await engine.close()  # the coordinator dies between prepare and decision

    engine = await open_engine(data_dir)
    try:
        for shard in engine.shards.values():
            assert not shard.core.prepared  # resolved at open, locks released
            assert (await shard.status("t-orphan")).state is TxnState.ABORTED
        assert await value_of(engine, a) is None and await value_of(engine, b) is None
        # a late decision from the dead coordinator can no longer commit it
        primary = next(iter(parts.values())).primary
        assert (await engine.shards[primary].decide("t-orphan", True)).state is TxnState.ABORTED
    finally:
        await engine.close()


async def test_decided_commit_is_finished_on_recovery(data_dir):
    engine = await open_engine(data_dir)
    a, b = keys_on_two_shards(engine)
    parts = txn_parts(engine, "t-half", {a: "A", b: "B"})
    assert await prepare_all(engine, parts) == [VoteKind.YES, VoteKind.YES]
    primary = next(iter(parts.values())).primary
    assert (await engine.shards[primary].decide("t-half", True)).state is TxnState.COMMITTED
    await engine.close()  # the coordinator dies before telling the other participant

    engine = await open_engine(data_dir)
    try:
        assert await value_of(engine, a) == "A" and await value_of(engine, b) == "B"
        for shard in engine.shards.values():
            assert (await shard.status("t-half")).state is TxnState.COMMITTED
    finally:
        await engine.close()


async def test_reader_waits_for_outcome_and_never_sees_half(data_dir):
    engine = await open_engine(data_dir)
    try:
        a, b = keys_on_two_shards(engine)
        parts = txn_parts(engine, "t-wait", {a: 10, b: 20})
        assert await prepare_all(engine, parts) == [VoteKind.YES, VoteKind.YES]
        primary = next(iter(parts.values())).primary
        other = next(s for s in parts if s != primary)
        other_key = a if engine.slot_map.shard_for(a) == other else b
        reader = asyncio.create_task(value_of(engine, other_key))
        await asyncio.sleep(0.05)
        assert not reader.done()  # blocked by the write intent
        await engine.shards[primary].decide("t-wait", True)
        await asyncio.sleep(0.05)
        assert not reader.done()  # decided at the primary, not yet applied here
        await engine.shards[other].finish("t-wait", True)
        assert await asyncio.wait_for(reader, 2) in (10, 20)
    finally:
        await engine.close()


async def test_abandoned_transaction_is_resolved_while_running(data_dir):
    engine = await open_engine(data_dir, txn_expiry_seconds=0.2, maintenance_interval=0.05)
    try:
        a, b = keys_on_two_shards(engine)
        parts = txn_parts(engine, "t-abandoned", {a: 1, b: 1})
        assert await prepare_all(engine, parts) == [VoteKind.YES, VoteKind.YES]
        # readers block, then the expired transaction is aborted through its primary
        assert await asyncio.wait_for(value_of(engine, a), 5) is None
        for sid in parts:
            assert (await engine.shards[sid].status("t-abandoned")).state is TxnState.ABORTED
    finally:
        await engine.close()


async def test_abort_tombstone_makes_late_prepare_vote_no(data_dir):
    engine = await open_engine(data_dir)
    try:
        a, b = keys_on_two_shards(engine)
        parts = txn_parts(engine, "t-late", {a: 1, b: 1})
        primary = next(iter(parts.values())).primary
        out = await engine.shards[primary].decide("t-late", False)
        assert out.state is TxnState.ABORTED
        vote = await engine.shards[primary].prepare(parts[primary])
        assert vote.kind is VoteKind.NO
        assert not engine.shards[primary].core.write_locks
    finally:
        await engine.close()


async def test_prepare_locks_are_no_wait(data_dir):
    engine = await open_engine(data_dir)
    try:
        a, b = keys_on_two_shards(engine)
        p1 = txn_parts(engine, "t1", {a: 1, b: 1})
        p2 = txn_parts(engine, "t2", {a: 2, b: 2})
        assert await prepare_all(engine, p1) == [VoteKind.YES, VoteKind.YES]
        for sid, st in p2.items():
            vote = await engine.shards[sid].prepare(st)
            assert vote.kind is VoteKind.NO and vote.stale[0].reason == "locked"
    finally:
        await engine.close()


async def test_concurrent_transfers_keep_the_total(data_dir):
    """Money moves between accounts on different shards; every validated audit sees the same total."""
    async with oribus.open_local(data_dir, shards=4, agent="bank") as bus:
        accounts = [f"acct/{i}" for i in range(8)]
        await bus.commit({k: 100 for k in accounts})
        audits: list[int] = []

        async def transfer(n: int) -> None:
            me = bus.session(agent=f"teller-{n}")
            for i in range(15):
                src, dst = accounts[(n + i) % 8], accounts[(n * 3 + i + 1) % 8]
                if src == dst:
                    continue

                async def move(tx, src=src, dst=dst):
                    got = await tx.get_many([src, dst])
                    tx.put(src, got[src].value - 1)
                    tx.put(dst, got[dst].value + 1)

                await me.run(move, retries=500)

        async def audit() -> None:
            me = bus.session(agent="auditor")
            for _ in range(30):
                tx = me.transaction()
                got = await tx.get_many(accounts)
                try:
                    await tx.commit()  # validates every read at one commit point
                except oribus.Conflict:
                    continue
                audits.append(sum(i.value for i in got.values()))
                await asyncio.sleep(0)

        await asyncio.gather(*(transfer(n) for n in range(6)), audit())
        final = await bus.get_many(accounts)
        assert sum(i.value for i in final.values()) == 800
        assert audits and all(t == 800 for t in audits), audits
        stats = await bus.stats()
        assert stats["coordinator"]["commits_2pc"] > 0


async def test_session_scope_read_on_other_shard_is_validated(data_dir):
    """A read on shard X and a write on shard Y: the commit is two-phase and checks X."""
    async with oribus.open_local(data_dir, shards=2, agent="a") as bus:
        engine = bus._owner
        a, b = keys_on_two_shards(engine)
        other = bus.session(agent="o")
        await bus.get(a)
        await other.put(a, 1)
        with pytest.raises(oribus.Conflict) as e:
            await bus.put(b, 1)
        assert e.value.stale[0].key == a
        assert (await bus.session(agent="reader").get(b)).version == 0  # nothing was written


async def test_primary_keeps_commit_decision_until_participants_finish(data_dir):
    """Outcome eviction must never turn a committed 2PC into a presumed abort on a participant."""
    engine = await open_engine(data_dir, shard_overrides={"max_resolved_txns": 5})
    try:
        a, b = keys_on_two_shards(engine)
        parts = txn_parts(engine, "t-kept", {a: "A", b: "B"})
        assert await prepare_all(engine, parts) == [VoteKind.YES, VoteKind.YES]
        primary = next(iter(parts.values())).primary
        await engine.shards[primary].decide("t-kept", True)
        other = next(s for s in parts if s != primary)
        pk = a if engine.slot_map.shard_for(a) == primary else b
        for i in range(20):  # push many outcomes through the primary's bounded memory
            sess = SessionRef("filler", str(i))
            st = ShardTxn(txn_id=f"fill-{i}", session=sess, writes={f"{pk}-{i}": msgpack.packb(i)},
                          participants=(primary,), primary=primary)
            await engine.shards[primary].commit_one_phase(st)
        assert (await engine.shards[primary].status("t-kept")).state is TxnState.COMMITTED
        await engine.recover_prepared(0.0)
        assert await value_of(engine, a) == "A" and await value_of(engine, b) == "B"
        assert (await engine.shards[other].status("t-kept")).state is TxnState.COMMITTED
        # once every participant has applied it, the primary may forget it
        assert "t-kept" not in engine.shards[primary].core.decisions
    finally:
        await engine.close()


async def test_participant_with_nothing_to_hold_skips_phase_two(data_dir):
    async with oribus.open_local(data_dir, shards=2, agent="a") as bus:
        engine = bus._owner
        a, b = keys_on_two_shards(engine)
        await bus.put(a, 1)  # the session now holds a token on a's shard
        await bus.forget([a])
        before = {s: (await engine.shards[s].stats())["wal"]["records"] for s in engine.shards}
        await bus.put(b, 1)  # two participants: b's shard writes, a's shard only checks the token
        await bus.close()
        sa = engine.slot_map.shard_for(a)
        after = (await engine.shards[sa].stats())["wal"]["records"]
        assert after == before[sa]  # no PREPARE/COMMIT record on the shard with nothing to hold


async def test_participant_answers_finish_only_once_its_commit_record_is_durable(data_dir):
    """Otherwise the coordinator could let the primary forget the decision while the
    participant's COMMIT record is still only in memory: a crash then leaves it prepared
    with nobody knowing the outcome, and it would abort its half of a commit."""
    engine = await open_engine(data_dir)
    try:
        a, b = keys_on_two_shards(engine)
        parts = txn_parts(engine, "t-durable-finish", {a: 1, b: 2})
        assert await prepare_all(engine, parts) == [VoteKind.YES, VoteKind.YES]
        primary = next(iter(parts.values())).primary
        other = next(s for s in parts if s != primary)
        assert (await engine.shards[primary].decide("t-durable-finish", True)).state is TxnState.COMMITTED
        shard = engine.shards[other]
        gate = asyncio.Event()
        real_sync = shard.wal.sync

        async def held_sync(lsn=None):
            await gate.wait()
            await real_sync(lsn)

        shard.wal.sync = held_sync
        finishing = asyncio.create_task(shard.finish("t-durable-finish", True))
        await asyncio.sleep(0.2)
        assert not finishing.done(), "finish answered before its COMMIT record was durable"
        gate.set()
        assert (await asyncio.wait_for(finishing, 5)).state is TxnState.COMMITTED
        shard.wal.sync = real_sync
    finally:
        await engine.close()
