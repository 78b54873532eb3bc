"""The replica transport in one process, on port 0: ``StreamPeer`` calls a member's ops served on the
same stream listener as the bus's ``oribus.v1.Shard`` (one port per process), every message of
``oribus.shards.replica.messages`` round-trips unchanged, a malformed call is refused and
reaches nothing, the batches of one loop turn leave in one frame, and a member that is gone is
``Unavailable``."""

from __future__ import annotations

import asyncio

import pytest

from oribus.errors import InvalidRequest, Unavailable
from oribus.rpc import wire
from oribus.rpc.replica_client import StreamPeer
from oribus.rpc.replica_codec import REPLICA_OPS, REPLICA_SERVICE, MemberStatus
from oribus.rpc.stream_client import StreamClient
from oribus.rpc.stream_server import StreamListener
from oribus.shards.replica.messages import AppendBatch, AppendReply, PromiseReply, SnapshotChunk

pytestmark = pytest.mark.timeout(60)


class FakeMember:
    """Records what it is sent; answers with what the test says."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    async def append(self, batch: AppendBatch) -> AppendReply:
        self.seen.append(batch)
        return AppendReply(True, batch.term, batch.last_lsn, (batch.term, batch.last_lsn))

    async def promise(self, term: int, candidate: int) -> PromiseReply:
        self.seen.append(("promise", term, candidate))
        return PromiseReply(True, term, True, (3, 17))

    async def install_snapshot(self, chunk: SnapshotChunk) -> AppendReply:
        self.seen.append(chunk)
        return AppendReply(False, chunk.term + 1, 0, (0, 0), needs_snapshot=True, voter=False)

    async def status(self) -> MemberStatus:
        return MemberStatus(2, "follower", 7, True, (7, 40), primary=0, commit_lsn=39, applied_lsn=38)

    async def elect(self, term: int, candidate: int) -> bool:
        self.seen.append(("elect", term, candidate))
        return True


async def _echo(args: object) -> object:
    return args


@pytest.fixture
async def served():
    member = FakeMember()
    listener = StreamListener("127.0.0.1:0", wire.SHARD_SERVICE, {"echo": _echo},
                              more={REPLICA_SERVICE: wire.bind_ops(member, REPLICA_OPS)})
    await listener.start()
    try:
        yield member, listener
    finally:
        await listener.stop(0)


async def test_every_replica_message_round_trips_beside_the_shard_service(served):
    member, listener = served
    peer = StreamPeer(2, listener.address)
    bus = StreamClient(listener.address, wire.SHARD_SERVICE)
    try:
        batch = AppendBatch(term=5, primary=0, prev=(4, 10), frames=b"\x00\x01frames", last_lsn=12, commit_lsn=9)
        assert await peer.append(batch) == AppendReply(True, 5, 12, (5, 12))
        assert member.seen[-1] == batch
        heartbeat = AppendBatch(5, 0, (5, 12), b"", 12, 12)
        assert (await peer.append(heartbeat)).ok
        assert member.seen[-1] == heartbeat
        assert await peer.promise(6, 1) == PromiseReply(True, 6, True, (3, 17))
        chunk = SnapshotChunk(term=5, primary=0, lsn=100, last_term=4, offset=4096, data=b"snap", done=True)
        assert await peer.install_snapshot(chunk) == AppendReply(False, 6, 0, (0, 0), needs_snapshot=True,
                                                                 voter=False)
        assert member.seen[-1] == chunk
        assert await peer.status() == MemberStatus(2, "follower", 7, True, (7, 40), 0, 39, 38)
        assert await peer.elect(6, 1) is True
        # the bus's service on the same port, untouched by the replica one
        assert await bus.call("echo", {"x": 1}) == {"x": 1}
        # and the services do not leak into each other
        with pytest.raises(InvalidRequest):
            await bus.call("append", {})
        with pytest.raises(InvalidRequest):
            await peer.client.call("echo", {})
    finally:
        await peer.close()
        await bus.close()


@pytest.mark.parametrize("args", [
    {},
    {"t": 1, "p": 0, "pv": [0, 0], "f": b"", "l": 1, "c": 0},  # frames missing for LSN 1
    {"t": 1, "p": 0, "pv": [0, 3], "f": b"x", "l": 2, "c": 0},  # last before prev
    {"t": -1, "p": 0, "pv": [0, 0], "f": b"x", "l": 1, "c": 0},
    {"t": 1, "p": 0, "pv": [0], "f": b"x", "l": 1, "c": 0},
    {"t": 1, "p": 0, "pv": [0, 0], "f": "not bytes", "l": 1, "c": 0},
    {"t": True, "p": 0, "pv": [0, 0], "f": b"x", "l": 1, "c": 0},
])
async def test_a_malformed_append_is_refused_and_reaches_no_member(served, args):
    member, listener = served
    client = StreamClient(listener.address, REPLICA_SERVICE)
    try:
        with pytest.raises(InvalidRequest):
            await client.call("append", args)
        with pytest.raises(InvalidRequest):
            await client.call("promise", {"t": "1", "c": 0})
        assert member.seen == []
    finally:
        await client.close()


async def test_batches_of_one_loop_turn_leave_in_one_frame(served):
    member, listener = served
    peer = StreamPeer(1, listener.address)
    try:
        await peer.status()  # connected
        before = peer.client.counters["messages_out"]
        batches = [AppendBatch(2, 0, (2, i), b"f", i + 1, i) for i in range(8)]
        replies = await asyncio.gather(*(peer.append(b) for b in batches))
        assert [r.durable_lsn for r in replies] == list(range(1, 9))
        assert peer.client.counters["messages_out"] - before == 1
    finally:
        await peer.close()


async def test_a_member_that_is_gone_is_unavailable(served):
    _, listener = served
    peer = StreamPeer(1, listener.address, timeout=2.0)
    try:
        await peer.status()
        await listener.stop(0)
        with pytest.raises(Unavailable):
            await peer.promise(3, 0)
    finally:
        await peer.close()
