"""Deliveries registered for a session by someone else (``AsyncSession.register``: what
``oribus proxy`` records from an agent's LLM traffic) are validated at the agent's commit even
after the bus restarted, though the agent's own client never learned their tokens: the bus
journals them, as it does for HTTP agents. Shards stay up; only the bus restarts."""

from __future__ import annotations

import asyncio

import pytest
from conftest import keys_on_shard
from processes import two_shards_and_a_bus

import oribus


async def test_a_registered_read_refuses_a_stale_commit_after_the_bus_restarted(cluster, tmp_path):
    _, _, bus = two_shards_and_a_bus(cluster, tmp_path)
    own, seen = keys_on_shard(0, "reg/own")[0], keys_on_shard(1, "reg/seen")[0]
    async with oribus.connect(bus.address, agent="setup") as setup:
        await setup.commit({own: 0, seen: "v1"})
    agent = oribus.connect(bus.address, agent="writer", session_id="writer-1")
    proxy = oribus.connect(bus.address, agent="writer", session_id="writer-1")  # the same session
    try:
        await agent.get(own)  # the agent's own read: its client holds shard 0's token
        got = await proxy.register([seen])  # what the agent's LLM saw: shard 1, unknown to its client
        assert list(got.recorded) == [seen]
        async with oribus.connect(bus.address, agent="other") as other:
            await other.put(seen, "v2")  # the agent's context is stale now

        await asyncio.to_thread(bus.stop)
        bus.start()
        await asyncio.to_thread(bus.wait_serving)

        with pytest.raises(oribus.Conflict) as refused:
            await agent.commit({own: 1})
        assert [s.key for s in refused.value.stale] == [seen]
    finally:
        await agent.close()
        await proxy.close()
