"""A bus over two shard servers reached through their stream listeners, in one process on port 0:
one- and two-phase commits, a watch, the epoch on every call, the listeners' counters, TLS."""

from __future__ import annotations

import asyncio

import pytest

from oribus.bus.bus import Bus
from oribus.certs import init_certs
from oribus.client.session import AsyncSession
from oribus.errors import Unavailable
from oribus.messages import ReadRequest, WatchRequest
from oribus.meta.slots import StaticSlotMap
from oribus.rpc.shard_client import GrpcShardClient, StreamShardClient, shard_client
from oribus.rpc.shard_server import ShardServer
from oribus.shards.config import ShardConfig
from oribus.tls import TlsConfig
from oribus.types import SessionRef

pytestmark = pytest.mark.timeout(60)
SLOTS = StaticSlotMap(2)


def keys_on(shard_id: int, n: int, prefix: str = "k") -> list[str]:
    out = []
    i = 0
    while len(out) < n:
        k = f"{prefix}/{i}"
        if SLOTS.shard_for(k) == shard_id:
            out.append(k)
        i += 1
    return out


async def start_shards(tmp_path, tls: TlsConfig | None = None, epoch: int | None = None) -> list[ShardServer]:
    servers = []
    for i in range(2):
        # new shards that never granted a read lease: no restart grace to wait out
        config = ShardConfig(i, tmp_path / f"shard-{i}", restart_grace=False)
        s = ShardServer(config, "127.0.0.1:0", stream_listen="127.0.0.1:0", tls=tls, epoch=epoch)
        await s.start()
        servers.append(s)
    return servers


async def test_a_bus_over_stream_listeners(tmp_path):
    servers = await start_shards(tmp_path)
    clients = {i: shard_client(i, s.address, s.stream_address) for i, s in enumerate(servers)}
    assert all(isinstance(c, StreamShardClient) for c in clients.values())
    bus = Bus(dict(clients), SLOTS.shard_for)
    a, b = keys_on(0, 1)[0], keys_on(1, 1)[0]
    try:
        s = AsyncSession(bus, "agent")
        watch = bus.watch(WatchRequest("k/"))
        first = asyncio.ensure_future(watch.__anext__())
        await asyncio.sleep(0.1)  # the watch subscribes on both shards
        assert await s.put(a, 1) == 1  # one phase
        async with s.transaction() as tx:  # two phases
            got = await tx.get_many([a, b])
            tx.put(a, got[a].value + 1)
            tx.put(b, 10)
        assert {k: v.value for k, v in (await s.get_many([a, b])).items()} == {a: 2, b: 10}
        assert (await first).key == a
        stats = await bus.stats()
        assert bus.coordinator.counters["commits_2pc"] == 1
        for shard in stats["shards"]:
            stream = shard["transport"]["stream"]
            assert stream["calls"] >= 3 and stream["messages_in"] >= 1
            assert shard["transport"]["grpc"]["calls"] == 0  # nothing went over gRPC
        await watch.aclose()
    finally:
        for c in clients.values():
            await c.close()
        for s in servers:
            await s.stop(0)


async def test_the_transport_can_be_chosen(tmp_path):
    servers = await start_shards(tmp_path)
    s0 = servers[0]
    try:
        assert isinstance(shard_client(0, s0.address, s0.stream_address, transport="grpc"), GrpcShardClient)
        assert isinstance(shard_client(0, s0.address, ""), GrpcShardClient)  # a shard without a stream listener
        with pytest.raises(Exception, match="one of stream, grpc"):
            shard_client(0, s0.address, s0.stream_address, transport="carrier-pigeon")
        over_grpc = shard_client(0, s0.address, s0.stream_address, transport="grpc")
        try:
            await over_grpc.read(ReadRequest(SessionRef("a", "s"), ["k/0"]))
        finally:
            await over_grpc.close()
        assert (await s0._stats({}))["transport"]["grpc"]["calls"] == 1
    finally:
        for s in servers:
            await s.stop(0)


async def test_every_stream_call_carries_the_epoch(tmp_path):
    servers = await start_shards(tmp_path, epoch=7)
    s0 = servers[0]
    right = StreamShardClient(0, s0.stream_address, epoch=7)
    wrong = StreamShardClient(0, s0.stream_address, epoch=6)
    req = ReadRequest(SessionRef("a", "s"), ["k/0"])
    try:
        assert (await right.read(req)).token[0] == 7
        with pytest.raises(Unavailable, match="at epoch 7, the caller expects epoch 6"):
            await wrong.read(req)
        s0.fence("lost the claim")
        with pytest.raises(Unavailable, match="lost the claim"):
            await right.read(req)
    finally:
        await right.close()
        await wrong.close()
        for s in servers:
            await s.stop(0)


async def test_mutual_tls_on_the_stream_listener(tmp_path):
    init_certs(tmp_path / "tls")
    tls = TlsConfig.from_dir(tmp_path / "tls")
    servers = await start_shards(tmp_path, tls=tls)
    s0 = servers[0]
    good = StreamShardClient(0, s0.stream_address, tls=tls)
    plain = StreamShardClient(0, s0.stream_address, timeout=5)
    req = ReadRequest(SessionRef("a", "s"), ["k/0"])
    try:
        await good.read(req)
        with pytest.raises(Unavailable, match="requires TLS"):
            await plain.read(req)
    finally:
        await good.close()
        await plain.close()
        for s in servers:
            await s.stop(0)


async def test_a_read_only_participants_lease_ends_with_the_commit_over_the_stream(tmp_path):
    servers = await start_shards(tmp_path)
    clients = {i: shard_client(i, s.address, s.stream_address) for i, s in enumerate(servers)}
    bus = Bus(dict(clients), SLOTS.shard_for)
    a, b = keys_on(0, 1)[0], keys_on(1, 1)[0]
    try:
        s = AsyncSession(bus, "agent")
        async with s.transaction() as tx:  # one writer (shard 1), shard 0 only validates
            await tx.get_many([a, b])
            tx.put(b, 1)
        assert servers[1].shard.core.leases == {}
        for _ in range(100):  # released by the bus's release_leases, long before it runs out
            if not servers[0].shard.core.leases:
                break
            await asyncio.sleep(0.01)
        assert servers[0].shard.core.leases == {} and not servers[0].shard.core.read_locks
        assert servers[0].shard.counters["validations"] == 1
    finally:
        for c in clients.values():
            await c.close()
        for s in servers:
            await s.stop(0)
