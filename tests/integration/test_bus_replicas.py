"""Several buses over the same shards: any replica commits any session correctly."""

from __future__ import annotations

import msgpack
import pytest

import oribus
from oribus.bus.bus import Bus
from oribus.bus.coordinator import CommitRequest
from oribus.bus.embedded import EngineConfig, LocalEngine
from oribus.types import SessionRef

S = SessionRef("http-agent", "s1")


async def test_replica_that_never_saw_the_session_still_validates(data_dir):
    engine = await LocalEngine.open(EngineConfig(data_dir=data_dir, shards=3))
    try:
        replica_a = engine.bus
        replica_b = Bus(dict(engine.shards), engine.slot_map.shard_for)
        writer = oribus.AsyncSession(replica_a, "writer")
        keys = [f"doc/{i}" for i in range(6)]
        await writer.commit({k: 0 for k in keys})
        await replica_a.read(S, keys)  # the agent's reads go through replica A
        await writer.commit({"doc/3": 1})  # one of them changes
        # the agent's commit reaches replica B, without tokens (a plain client)
        req = CommitRequest(session=S, commit_id="c1", writes={"out/x": msgpack.packb(1)})
        with pytest.raises(oribus.Conflict) as e:
            await replica_b.commit(req)
        assert [s.key for s in e.value.stale] == ["doc/3"]
        # after re-reading, the same commit through replica B goes through
        await replica_a.read(S, ["doc/3"])
        req = CommitRequest(session=S, commit_id="c2", writes={"out/x": msgpack.packb(1)})
        assert (await replica_b.commit(req)).versions == {"out/x": 1}
    finally:
        await engine.close()


async def test_sdk_sessions_carry_their_tokens_to_any_replica(data_dir):
    engine = await LocalEngine.open(EngineConfig(data_dir=data_dir, shards=3))
    try:
        replica_b = Bus(dict(engine.shards), engine.slot_map.shard_for)
        agent_a = oribus.AsyncSession(engine.bus, "agent", "run-1")
        agent_b = oribus.AsyncSession(replica_b, "agent", "run-1")  # same session, other replica
        other = oribus.AsyncSession(engine.bus, "other")
        await agent_a.get("k")
        agent_b._tokens.update(agent_a._tokens)  # what a client reconnecting elsewhere keeps
        await other.put("k", 1)
        with pytest.raises(oribus.Conflict):
            await agent_b.put("z", 1)
    finally:
        await engine.close()
