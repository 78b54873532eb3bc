"""The bus and its shard processes over the stream transport (the default), real processes.

* ``oribus up --processes``: commits, two-phase commits and a watch go through the shards'
  stream listeners, and nothing through their gRPC ones;
* a shard killed with SIGKILL while calls are in flight: they fail with Unavailable at once;
  restarted at the same addresses, the next calls succeed, from a shard client and through
  a bus;
* a shard under mutual TLS refuses a stream client without a certificate from its CA.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
from conftest import keys_on_shard
from processes import shard, two_shards_and_a_bus, up

import oribus
from oribus import Unavailable
from oribus.certs import init_certs
from oribus.messages import ReadRequest
from oribus.rpc import wire
from oribus.rpc.shard_client import StreamShardClient
from oribus.rpc.stream_client import StreamClient
from oribus.tls import TlsConfig
from oribus.types import SessionRef

TIMEOUT = 10.0


async def test_up_processes_goes_over_the_stream(cluster, tmp_path):
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=True)).start()
    await asyncio.to_thread(server.wait_serving)
    a, b = keys_on_shard(0, "st/a")[0], keys_on_shard(1, "st/b")[0]
    async with oribus.connect(server.address, agent="agent", timeout=TIMEOUT) as s:
        watch = await s.watch(prefix="st/").start()
        assert await s.put(a, 1) == 1
        async with s.transaction() as tx:
            got = await tx.get_many([a, b])
            tx.put(a, got[a].value + 1)
            tx.put(b, 5)
        assert {k: i.value for k, i in (await s.get_many([a, b])).items()} == {a: 2, b: 5}
        seen = [await asyncio.wait_for(watch.__anext__(), TIMEOUT) for _ in range(3)]
        assert sorted((c.key, c.version) for c in seen) == sorted([(a, 1), (a, 2), (b, 1)])
        await watch.aclose()
        stats = await s.stats()
    assert stats["coordinator"]["commits_2pc"] == 1
    for sh in stats["shards"]:
        assert sh["transport"]["stream"]["calls"] > 0, sh
        assert sh["transport"]["grpc"]["calls"] == 0, sh


async def test_a_killed_shard_fails_the_calls_in_flight_and_serves_again_once_restarted(cluster, tmp_path):
    s0, s1, b = await asyncio.to_thread(two_shards_and_a_bus, cluster, tmp_path)
    key = keys_on_shard(1, "kill/k")[0]
    async with oribus.connect(b.address, agent="agent", timeout=TIMEOUT) as sdk:
        assert await sdk.put(key, 1) == 1

    client = StreamShardClient(1, s1.stream_address, timeout=TIMEOUT)
    req = ReadRequest(SessionRef("probe", "p"), [key])
    try:
        assert (await client.read(req)).items[0].version == 1
        s1.pause()  # the calls below reach the shard's socket and wait there
        in_flight = [asyncio.ensure_future(client.read(req)) for _ in range(5)]
        await asyncio.sleep(0.3)
        assert not any(c.done() for c in in_flight)
        await asyncio.to_thread(s1.kill9)
        started = asyncio.get_running_loop().time()
        for call in in_flight:
            with pytest.raises(Unavailable):
                await call
        assert asyncio.get_running_loop().time() - started < 2.0  # at once, not after the timeout
        with pytest.raises(Unavailable, match="refused"):
            await client.read(req)  # down: nothing listens

        s1.start()
        await asyncio.to_thread(s1.wait_serving)
        assert (await client.read(req)).items[0].version == 1  # the next call connects again
    finally:
        await client.close()

    # and through the bus, whose connection to the old process broke too
    async with oribus.connect(b.address, agent="agent2", timeout=TIMEOUT) as sdk:
        assert await sdk.put(key, 2) == 2


async def test_a_tls_shard_refuses_a_stream_client_without_a_certificate(cluster, tmp_path):
    certs = tmp_path / "tls"
    init_certs(certs)
    s = cluster.add(shard(tmp_path, 0, tmp_path / "shard-0"))
    s.args += ["--tls-dir", str(certs)]
    s.tls_dir = certs
    await asyncio.to_thread(s.start().wait_serving)

    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(certs / "ca.crt")  # trusts the shard, presents nothing
    refused = StreamClient(s.stream_address, wire.SHARD_SERVICE, ssl=no_cert, timeout=TIMEOUT)
    plain = StreamClient(s.stream_address, wire.SHARD_SERVICE, timeout=TIMEOUT)
    good = StreamShardClient(0, s.stream_address, tls=TlsConfig.from_dir(certs), timeout=TIMEOUT)
    try:
        with pytest.raises(Unavailable, match="did not accept this client's certificate"):
            await refused.call("stats", {})
        with pytest.raises(Unavailable, match="requires TLS"):
            await plain.call("stats", {})
        assert (await good.stats())["transport"]["stream"]["calls"] == 1  # only this one got through
    finally:
        for c in (refused, plain, good):
            await c.close()
