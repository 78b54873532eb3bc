"""Two-phase commits across two replica groups when a participant's primary dies mid-protocol.

Two shards, each a group of three ``oribus shard`` members, and a bus. A transaction writes
key ``a`` on shard A and key ``b`` on shard B, ``a < b``: A is its primary participant, which
keeps the decision (``specs/PROTOCOL.md`` §5), B the other writer. Only the primary of the
group hit carries the failpoint (its followers are restarted without it once it leads), so
it dies at an exact step of the protocol and its successor does not:

* ``txn.before_participant_commit`` on B's primary: A decided COMMIT, B's primary dies before
  logging its COMMIT. B's new primary holds the transaction PREPARED (its PREPARE was on a
  majority) with a write intent on ``b``; the bus's sweep must ask A and commit it there;
* ``txn.after_decide`` on A's primary: A's COMMIT is on a majority, then its primary dies before
  answering. A's new primary has the decision; B is PREPARED; the sweep must commit B, and a
  retry of the commit id must answer "committed";
* ``txn.after_prepare`` on B's primary: B's PREPARE is on a majority, its primary dies before
  voting. The coordinator aborts at A; B's new primary holds the transaction PREPARED; the sweep
  must abort it there and release ``b``.

In each case every write intent is released (both keys read, with the outcome's values) within
the sweep's expiry plus a failover, and the two keys agree on the outcome.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from conftest import keys_on_shard
from replica_group import ReplicaGroup

import oribus
from oribus import Unavailable

pytestmark = pytest.mark.timeout(240)

RESOLVE_TIMEOUT = 60.0  # seconds: the sweep's transaction expiry (10 s) and a failover, with room


async def arm_the_primary_only(group: ReplicaGroup, shard: int, failpoint: str) -> int:
    """Start-time failpoint on every member of ``shard``'s group; then the followers restarted
    without it, so only the primary carries it. Returns the primary's member id."""
    primary = await group.wait_primary(shard=shard)
    for member, proc in enumerate(group.groups[shard]):
        if member != primary.member:
            proc.env = {}
            await asyncio.to_thread(proc.kill9)
            proc.start()
            await asyncio.to_thread(proc.wait_serving)
    again = await group.wait_primary(shard=shard)
    assert again.member == primary.member, "the primary changed while its followers restarted"
    # every member a voter again before the fault, so the group can lose its primary
    await group.wait_voters(shard=shard)
    return primary.member


async def read_both(bus: str, keys: list[str], timeout: float = RESOLVE_TIMEOUT) -> dict:
    """The two keys' values once neither is locked by an unresolved transaction."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with oribus.connect(bus, agent="reader", timeout=5.0) as s:
                got = await s.get_many(keys)
            return {k: (got[k].value, got[k].version) for k in keys}
        except Unavailable as e:
            last = e
            await asyncio.sleep(0.5)
    raise AssertionError(f"the keys {keys} stayed unreadable for {timeout}s: {last!r}")


async def start(cluster, tmp_path, etcd, shard: int, failpoint: str) -> tuple[ReplicaGroup, list[str]]:
    group = ReplicaGroup(cluster, tmp_path, etcd.url, shards=2)
    for proc in group.groups[shard]:
        proc.env = {"ORIBUS_FAILPOINTS": f"{failpoint}=kill"}
    await group.start()
    assert group.bus is not None
    a, b = keys_on_shard(0, "a")[0], keys_on_shard(1, "b")[0]
    assert a < b  # shard 0 is the primary participant
    async with oribus.connect(group.bus.address, agent="setup") as s:
        # one shard per commit: one-phase commits pass none of the two-phase failpoints
        assert (await s.put(a, "a0"), await s.put(b, "b0")) == (1, 1)
    return group, [a, b]


async def test_a_participant_s_primary_lost_before_its_commit_record(cluster, tmp_path, etcd):
    group, keys = await start(cluster, tmp_path, etcd, 1, "txn.before_participant_commit")
    victim = await arm_the_primary_only(group, 1, "txn.before_participant_commit")
    assert group.bus is not None
    async with oribus.connect(group.bus.address, agent="writer") as w:
        try:
            result = await w.commit({keys[0]: "a1", keys[1]: "b1"})
        except Unavailable:
            result = None  # the outcome may be reported unknown; the keys say what it was
    assert await asyncio.to_thread(group.groups[1][victim].wait_exit) == -9
    got = await read_both(group.bus.address, keys)
    print(f"commit answered {result}; the keys after the sweep: {got}")
    assert got == {keys[0]: ("a1", 2), keys[1]: ("b1", 2)}


async def test_the_primary_participant_s_primary_lost_after_its_decision(cluster, tmp_path, etcd):
    group, keys = await start(cluster, tmp_path, etcd, 0, "txn.after_decide")
    victim = await arm_the_primary_only(group, 0, "txn.after_decide")
    assert group.bus is not None
    commit_id = uuid.uuid4().hex
    async with oribus.connect(group.bus.address, agent="writer") as w:
        with pytest.raises(Unavailable):  # the decision was made, the answer lost with A's primary
            await w.commit({keys[0]: "a1", keys[1]: "b1"}, commit_id=commit_id)
        assert await asyncio.to_thread(group.groups[0][victim].wait_exit) == -9
        got = await read_both(group.bus.address, keys)
        assert got == {keys[0]: ("a1", 2), keys[1]: ("b1", 2)}
        # the same commit id, resent, is told it committed (and commits nothing again)
        deadline = time.monotonic() + RESOLVE_TIMEOUT
        while True:
            try:
                again = await w.commit({keys[0]: "a1", keys[1]: "b1"}, commit_id=commit_id)
                break
            except Unavailable:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.5)
    assert again == {keys[0]: 2, keys[1]: 2}
    assert await read_both(group.bus.address, keys) == got


async def test_a_participant_s_primary_lost_after_its_prepare(cluster, tmp_path, etcd):
    group, keys = await start(cluster, tmp_path, etcd, 1, "txn.after_prepare")
    victim = await arm_the_primary_only(group, 1, "txn.after_prepare")
    assert group.bus is not None
    async with oribus.connect(group.bus.address, agent="writer") as w:
        with pytest.raises(Unavailable):  # B never voted: the coordinator aborts
            await w.commit({keys[0]: "a1", keys[1]: "b1"})
    assert await asyncio.to_thread(group.groups[1][victim].wait_exit) == -9
    got = await read_both(group.bus.address, keys)
    assert got == {keys[0]: ("a0", 1), keys[1]: ("b0", 1)}  # aborted on both, b's intent released
    async with oribus.connect(group.bus.address, agent="writer-2") as w:
        assert await w.commit({keys[0]: "a2", keys[1]: "b2"}) == {keys[0]: 2, keys[1]: 2}
