"""Several buses over the same shards: any replica commits any session correctly."""

from __future__ import annotations

import aiohttp
import msgpack
import pytest
from http_call import call

import oribus
from oribus.bus.bus import Bus
from oribus.bus.session_journal import SessionJournal
from oribus.contract import CommitRequest
from oribus.gateway import GatewayConfig, HttpGateway
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig
from oribus.types import SessionRef

S = SessionRef("http-agent", "s1")


async def test_replica_that_never_saw_the_session_still_validates(data_dir):
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=3))
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
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=3))
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


@pytest.mark.parametrize("route", ["reset", "forget", "session"])
async def test_a_reset_through_another_replica_never_lets_a_stale_commit_pass(data_dir, tmp_path, route):
    """HTTP agents stay on one bus replica (sessionAffinity: ClientIP), an attacker's requests
    reach another: a reset (or forget, or re-open) of the victim's session there, without its
    session_token, must make the victim's next commit on its own replica fail closed too."""
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=2))
    journal_b = await SessionJournal.open(tmp_path / "bus-b" / "sessions")
    replica_b = Bus(dict(engine.shards), engine.slot_map.shard_for, session_journal=journal_b)
    gateways = [HttpGateway(engine.bus, GatewayConfig(listen="127.0.0.1:0")),
                HttpGateway(replica_b, GatewayConfig(listen="127.0.0.1:0"))]
    for gw in gateways:
        await gw.start()
    try:
        async with aiohttp.ClientSession(gateways[0].url) as a, aiohttp.ClientSession(gateways[1].url) as b:
            assert (await call(a, "POST", "/v1/commit", json={"agent": "setup", "writes": {"r/k": "v1"}}))[0] == 200
            st, out = await call(a, "POST", "/v1/get", json={"agent": "victim", "keys": ["r/k"]})
            assert st == 200 and out["items"][0]["version"] == 1
            assert (await call(a, "POST", "/v1/commit", json={"agent": "other", "writes": {"r/k": "v2"}}))[0] == 200
            body = {"agent": "victim", **({"keys": ["r/k"]} if route == "forget" else {})}
            st, out = await call(b, "POST", f"/v1/{route}", json=body)  # through the other replica
            assert st == 200, out
            st, out = await call(a, "POST", "/v1/commit",
                                 json={"agent": "victim", "writes": {"r/out": "from v1"}})
            assert (st, out["error"]) == (410, "SessionExpired"), out
            st, out = await call(a, "GET", "/v1/keys/r/out", params={"agent": "x", "record": "false"})
            assert out["version"] == 0  # nothing was written
            # the victim starts over on its replica (as after a shard restart): its reset has no
            # token either, so one more commit is refused; then it re-reads and goes on
            await call(a, "POST", "/v1/reset", json={"agent": "victim"})
            refusals = 0
            for _ in range(3):
                await call(a, "POST", "/v1/get", json={"agent": "victim", "keys": ["r/k"]})
                st, out = await call(a, "POST", "/v1/commit", json={"agent": "victim", "writes": {"r/out": "v2"}})
                if st == 200:
                    break
                assert (st, out["error"]) == (410, "SessionExpired"), out
                refusals += 1
            assert st == 200 and refusals <= 1, (refusals, out)
    finally:
        for gw in gateways:
            await gw.stop()
        await journal_b.close()
        await engine.close()
