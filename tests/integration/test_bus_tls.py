"""The bus's gRPC listener over mutual TLS, in-process (``oribus up --tls-dir`` without --processes)."""

from __future__ import annotations

import asyncio

import pytest

import oribus
from oribus.certs import init_certs
from oribus.hosts.up import UpHost
from oribus.messages import WatchRequest
from oribus.rpc.bus_client import RemoteBus
from oribus.tls import TlsConfig


@pytest.fixture
async def tls_cluster(tmp_path):
    init_certs(tmp_path / "tls")
    cluster = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=2,
                           tls=TlsConfig.from_dir(tmp_path / "tls"))
    await cluster.start()
    try:
        yield cluster, tmp_path / "tls"
    finally:
        await cluster.stop()


async def test_calls_and_watches_over_mtls(tls_cluster):
    cluster, tls = tls_cluster
    async with oribus.connect(cluster.address, agent="a", tls=tls, timeout=5) as bus:
        async with bus.watch("tls/", from_version=0) as changes:
            await bus.put("tls/k", {"v": 1})
            change = await asyncio.wait_for(changes.__anext__(), 5)
            assert (change.key, change.version, change.value) == ("tls/k", 1, {"v": 1})
        assert (await bus.get("tls/k")).value == {"v": 1}


async def test_a_plain_client_is_refused(tls_cluster):
    cluster, _ = tls_cluster
    async with oribus.connect(cluster.address, agent="a", timeout=5) as bus:
        with pytest.raises(oribus.Unavailable, match="requires TLS"):
            await bus.get("tls/k")
    remote = RemoteBus(cluster.address, timeout=5)  # a raw watch: the SDK's would retry
    try:
        with pytest.raises(oribus.Unavailable, match="requires TLS"):
            await remote.watch(WatchRequest("tls/")).subscribed()
    finally:
        await remote.close()
