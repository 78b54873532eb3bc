"""Integration fixtures: an embedded engine with its HTTP gateway on port 0 and a client."""

from __future__ import annotations

import aiohttp
import pytest

from oribus.gateway import GatewayConfig, HttpGateway
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig


async def _serve(data_dir, admin: bool):
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=2))
    gw = HttpGateway(engine.bus, GatewayConfig(listen="127.0.0.1:0", admin=admin))
    await gw.start()
    async with aiohttp.ClientSession(base_url=gw.url) as http:
        yield engine, gw, http
    await gw.stop()
    await engine.close()


@pytest.fixture
async def served(data_dir):
    """(engine, gateway, client session) — two shards, no --admin."""
    async for served in _serve(data_dir, admin=False):
        yield served


@pytest.fixture
async def admin_served(data_dir):
    """(engine, gateway, client session) — two shards, --admin."""
    async for served in _serve(data_dir, admin=True):
        yield served


@pytest.fixture
async def start_gateway(data_dir):
    """``await start_gateway(**GatewayConfig fields)``: gateways over one embedded engine (one
    shard), listening on port 0 unless ``listen`` says otherwise; all stopped afterwards."""
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=1))
    gateways = []

    async def start(**config) -> HttpGateway:
        gw = HttpGateway(engine.bus, GatewayConfig(**{"listen": "127.0.0.1:0", **config}))
        await gw.start()
        gateways.append(gw)
        return gw

    yield start
    for gw in gateways:
        await gw.stop()
    await engine.close()
