"""A shard closed while calls wait for a lock answers them ``Unavailable`` at once.

A read (or a one-phase commit) that finds a key locked by a prepared transaction waits for
it to resolve. ``Shard.close`` — a stop, or a replica group's primary deposed by a newer
term — wakes every such waiter, but the lock stays held in memory and is never released by
this shard again. The waiter must see that the shard closed and give up; it used to loop
back, find the same lock, and wait again on the future that was already woken: a busy loop
until its deadline on a real clock, and a livelock on the simulation's virtual clock, which
only moves when the loop is idle (``python -m oribus.sim --replicas 3 --seed 1021``).
"""

from __future__ import annotations

import asyncio

import pytest

from oribus.errors import Unavailable
from oribus.messages import ReadRequest, ShardTxn, VoteKind
from oribus.shards.config import ShardConfig
from oribus.shards.shard import Shard
from oribus.types import SessionRef

WRITER = SessionRef("writer", "1")
READER = SessionRef("reader", "1")


async def _locked_shard(tmp_path) -> Shard:  # noqa: ANN001 - pytest's tmp_path
    # a long read wait: the waiter is still waiting when the shard closes
    shard = await Shard.open(ShardConfig(0, tmp_path / "shard-0", read_wait_seconds=60.0, lock_wait_seconds=60.0,
                                         restart_grace=False))
    vote = await shard.prepare(ShardTxn(txn_id="t-locks", session=WRITER, writes={"k": b"\x01"},
                                        participants=(0, 1), primary=1))
    assert vote.kind is VoteKind.YES
    return shard


def _count_calls(shard: Shard, name: str) -> list[int]:
    calls = [0]
    real = getattr(shard.core, name)

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(shard.core, name, counted)
    return calls


async def test_a_read_waiting_for_a_lock_gives_up_when_the_shard_closes(tmp_path):  # noqa: ANN001
    shard = await _locked_shard(tmp_path)
    reads = _count_calls(shard, "read")
    reader = asyncio.create_task(shard.read(ReadRequest(READER, ["k"])))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not reader.done() and reads[0] == 1  # blocked by t-locks, waiting
    await shard.close()
    with pytest.raises(Unavailable, match="closed"):
        await asyncio.wait_for(reader, 30)  # a bound on a hang, not a speed check
    assert reads[0] == 1  # it did not look again at a lock no one here will ever release


async def test_a_one_phase_commit_waiting_for_a_lock_gives_up_when_the_shard_closes(tmp_path):  # noqa: ANN001
    shard = await _locked_shard(tmp_path)
    attempts = _count_calls(shard, "begin_one_phase")
    writer = asyncio.create_task(shard.commit_one_phase(
        ShardTxn(txn_id="t-waits", session=SessionRef("other", "1"), writes={"k": b"\x02"})))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not writer.done() and attempts[0] == 1  # refused for the lock only, waiting
    await shard.close()
    with pytest.raises(Unavailable, match="closed"):
        await asyncio.wait_for(writer, 30)
    assert attempts[0] == 1
