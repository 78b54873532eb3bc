"""kill -9 a read-only participant between its validation and the writer's commit (PROTOCOL.md §5.8).

Two ``oribus shard`` processes (``--read-lease`` of a few seconds, ``--clock-skew 0``) and
an ``oribus bus`` over them. The test plays the coordinator of one commit itself, over the shards' gRPC
service, so that it can stop between the two steps the bus runs back to back: it
validates the commit's read of ``r`` on shard 0 (a lease, in memory only), kills shard 0
with SIGKILL and restarts it on the same port and data. Then:

* a conflicting write of ``r`` through the bus is refused (``Unavailable``, naming the
  restart) while shard 0 is in its restart grace: the lease it lost might still be relied on;
* the commit's one-phase commit on shard 1, carrying the leases' deadline, commits — and
  ``r`` still has the version the commit read, so the commit point saw current reads;
* once the grace is over, the conflicting write goes through.

And through the bus, a commit that reads on both shards and writes on one leaves no record
on the read-only shard; a commit whose deadline has passed is refused by the writer's
commit point (``lease_expired``) and writes nothing.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import keys_on_shard
from grpc_health.v1 import health_pb2
from processes import bus, health_status, shard

import oribus
from oribus import Unavailable
from oribus.messages import LEASE_EXPIRED, ReadRequest, ShardTxn, TxnState, VoteKind
from oribus.rpc.shard_client import GrpcShardClient
from oribus.types import encode_value

LEASE = 2.0  # --read-lease; --clock-skew 0: every process here reads this machine's clock
# room for a shard process to be killed, started again and reconnected within one lease
CRASH_LEASE = 8.0
SESSION = ("agent-x", "coordinated-by-the-test")


def lease_shard(tmp_path, shard_id: int, lease: float = LEASE):  # noqa: ANN001, ANN201
    s = shard(tmp_path, shard_id, tmp_path / f"shard-{shard_id}")
    s.args += ["--read-lease", str(lease), "--clock-skew", "0"]
    return s


async def wait_serving(*servers) -> None:  # noqa: ANN002
    for s in servers:
        await asyncio.to_thread(s.wait_serving)


async def test_a_read_only_shard_killed_between_validation_and_commit(cluster, tmp_path):
    s0 = cluster.add(lease_shard(tmp_path, 0, CRASH_LEASE)).start()
    s1 = cluster.add(lease_shard(tmp_path, 1, CRASH_LEASE)).start()
    await wait_serving(s0, s1)
    b = cluster.add(bus(tmp_path, [s0.address, s1.address])).start()
    await wait_serving(b)
    c0, c1 = GrpcShardClient(0, s0.address), GrpcShardClient(1, s1.address)
    while max((await c0.stats())["restart_grace_left"], (await c1.stats())["restart_grace_left"]) > 0:
        await asyncio.sleep(0.1)  # the shards' own start grace

    r = keys_on_shard(0, "lease/r")[0]
    w = keys_on_shard(1, "lease/w")[0]
    admin = oribus.connect(b.address, agent="admin")
    assert await admin.commit({r: "r0", w: "w0"}) == {r: 1, w: 1}

    other = oribus.connect(b.address, agent="other")  # its few same-id retries end inside the grace
    try:
        # the commit's reads, as a session's, then its validation on the read-only shard 0
        read0 = await c0.read(ReadRequest(SESSION, [r]))
        read1 = await c1.read(ReadRequest(SESSION, [w]))
        assert [i.version for i in read0.items + read1.items] == [1, 1]
        sent = time.time()
        vote = await c0.validate(ShardTxn(txn_id="X", session=SESSION, token=read0.token))
        assert vote.kind is VoteKind.YES and vote.lease == CRASH_LEASE
        deadline = sent + vote.lease
        assert (await c0.stats())["leases"] == 1

        s0.kill9()  # the lease is gone with the process
        await c0.close()
        s0.start()  # it answers at once, but says SERVING only once its grace is over
        c0 = GrpcShardClient(0, s0.address)
        while True:
            try:
                grace = (await c0.stats())["restart_grace_left"]
                break
            except Unavailable:
                await asyncio.sleep(0.05)
        assert grace > 0
        assert health_status(s0.address) != health_pb2.HealthCheckResponse.SERVING

        # a conflicting write during the grace (once the bus has reconnected): refused, not applied
        while True:
            try:
                assert (await other.get(r)).version == 1  # reads are served in the grace
                break
            except Unavailable:  # the bus's connection to the new process is not up yet
                await asyncio.sleep(0.05)
        # sent once, as the bus receives it: the SDK's own resends would wait out the grace
        # (they honour the refusal's retry_after), which is not what is tested here
        with pytest.raises(Unavailable, match="restart") as refused:
            await other._bus.commit(other._request(None, writes=other._encode_writes({r: "overwritten"})))
        assert refused.value.details["retry_after"] > 0
        assert (await admin.get(r)).version == 1

        # the writer's commit point, before the deadline: commits on reads still current
        out = await c1.commit_one_phase(ShardTxn(
            txn_id="X", session=SESSION, token=read1.token, writes={w: encode_value("w1", 1 << 20)},
            participants=(1,), primary=1, deadline=deadline,
        ))
        assert out.state is TxnState.COMMITTED and out.versions == {w: 2}
        assert time.time() < deadline
        assert (await admin.get(r)).version == 1  # what X read is what there was at its commit point

        # once the grace is over the shard says it serves, and the write goes through
        await wait_serving(s0)
        assert (await c0.stats())["restart_grace_left"] == 0
        assert await other.commit({r: "overwritten"}) == {r: 2}
    finally:
        await c0.close()
        await c1.close()
        await other.close()
        await admin.close()


async def test_one_writer_leaves_no_record_on_the_read_only_shard_and_a_late_commit_is_refused(cluster, tmp_path):
    """Through the bus: a commit that reads on both shards and writes on one is one phase on the
    writer (one WAL record there) and a lease on the other (no record, no fsync). A commit whose
    deadline has passed is refused at the writer's commit point and writes nothing."""
    s0 = cluster.add(lease_shard(tmp_path, 0)).start()
    s1 = cluster.add(lease_shard(tmp_path, 1)).start()
    await wait_serving(s0, s1)
    b = cluster.add(bus(tmp_path, [s0.address, s1.address])).start()
    await wait_serving(b)
    await asyncio.sleep(LEASE)

    r = keys_on_shard(0, "lease/r")[0]
    w = keys_on_shard(1, "lease/w")[0]
    agent = oribus.connect(b.address, agent="agent")
    c0, c1 = GrpcShardClient(0, s0.address), GrpcShardClient(1, s1.address)
    try:
        await agent.commit({r: 0, w: 0})
        before = [await c.stats() for c in (c0, c1)]
        async with agent.transaction() as tx:
            got = await tx.get_many([r, w])
            tx.put(w, got[r].value + 1)
        after = [await c.stats() for c in (c0, c1)]
        assert after[0]["wal"]["records"] == before[0]["wal"]["records"]
        assert after[0]["wal"]["fsyncs"] == before[0]["wal"]["fsyncs"]
        assert after[0]["validations"] == before[0]["validations"] + 1
        assert after[1]["wal"]["records"] == before[1]["wal"]["records"] + 1
        assert after[1]["commits_1pc"] == before[1]["commits_1pc"] + 1
        assert after[1]["prepares"] == before[1]["prepares"]
        for _ in range(100):  # released once the outcome was known, not waited for
            if (await c0.stats())["leases"] == 0:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the read-only shard still holds the lease of a finished commit")

        # a commit whose deadline passed: refused at the writer's commit point, nothing written
        session = ("agent-y", "late")
        read0 = await c0.read(ReadRequest(session, [r]))
        read1 = await c1.read(ReadRequest(session, [w]))
        sent = time.time()
        vote = await c0.validate(ShardTxn(txn_id="Y", session=session, token=read0.token))
        assert vote.kind is VoteKind.YES
        await asyncio.sleep(vote.lease + 0.2)
        late = await c1.commit_one_phase(ShardTxn(
            txn_id="Y", session=session, token=read1.token, writes={w: encode_value("late", 1 << 20)},
            participants=(1,), primary=1, deadline=sent + vote.lease,
        ))
        assert late.state is TxnState.ABORTED and late.reason == LEASE_EXPIRED
        assert (await agent.get(w)).value == 1  # nothing written
        await agent.commit({r: "moved"})  # and the expired lease blocks no writer
    finally:
        await c0.close()
        await c1.close()
        await agent.close()
