"""HTTP agents send no tokens: their sessions must stay fail-closed across kill -9.

An HTTP agent reads, the servers crash and come back, and the agent commits.
Its deliveries may be gone with the shards' memory; the bus's session journal
still knows where it read, so the commit is refused (410 SessionExpired), never
let through with less validation. And when only the bus restarts (the shards
kept the deliveries), a stale read made before the crash is still caught.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from conftest import keys_on_shard
from processes import bus, shard, up


async def call(http, method, path, **kw):
    async with http.request(method, path, **kw) as r:
        return r.status, json.loads(await r.read())


async def restart(server) -> None:
    await asyncio.to_thread(server.kill9)
    server.start()
    await asyncio.to_thread(server.wait_serving)


async def test_sbus_agent_after_kill9_of_up_gets_session_expired(cluster, tmp_path):
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False)).start()
    await asyncio.to_thread(server.wait_serving)
    a, b = keys_on_shard(0, "fc/a")[0], keys_on_shard(1, "fc/b")[0]
    async with aiohttp.ClientSession(base_url=f"http://{server.http_address}") as http:
        for k in (a, b):
            assert (await call(http, "POST", "/shard", json={"key": k, "content": "v0"}))[0] == 201
            assert (await call(http, "GET", f"/shard/{k}", params={"agent_id": "agent-1"}))[0] == 200
        await restart(server)  # bus and shards die together: every delivery is gone
        st, out = await call(http, "POST", "/commit/v2",
                             json={"key": a, "expected_version": 0, "delta": "v1", "agent_id": "agent-1"})
        assert (st, out["error"]) == (410, "SessionExpired"), out
        assert (await call(http, "GET", f"/shard/{a}"))[1]["version"] == 0  # nothing was written
        # as with S-Bus, a 410 starts the read set afresh: re-read, then commit
        assert (await call(http, "GET", f"/shard/{a}", params={"agent_id": "agent-1"}))[0] == 200
        st, out = await call(http, "POST", "/commit/v2",
                             json={"key": a, "expected_version": 0, "delta": "v1", "agent_id": "agent-1"})
        assert (st, out["new_version"]) == (200, 1), out


async def test_native_agent_after_kill9_of_up_gets_session_expired_until_reset(cluster, tmp_path):
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False)).start()
    await asyncio.to_thread(server.wait_serving)
    key = keys_on_shard(1, "fc/n")[0]
    async with aiohttp.ClientSession(base_url=f"http://{server.http_address}") as http:
        st, opened = await call(http, "POST", "/v1/session", json={"agent": "n-1"})
        assert st == 200 and opened["session_token"]
        assert (await call(http, "POST", "/v1/commit", json={"agent": "w", "writes": {key: 1}}))[0] == 200
        assert (await call(http, "GET", f"/v1/keys/{key}", params={"agent": "n-1"}))[0] == 200
        await restart(server)
        for _ in range(2):  # refused every time: the native API does not reset by itself
            st, out = await call(http, "POST", "/v1/commit", json={"agent": "n-1", "writes": {"fc/other": 1}})
            assert (st, out["error"]) == (410, "SessionExpired"), out
        # the token outlived the crash (journaled): the owner's reset clears the session
        st, out = await call(http, "POST", "/v1/reset",
                             json={"agent": "n-1", "session_token": opened["session_token"]})
        assert (st, out["next_commit_refused"]) == (200, False), out
        assert (await call(http, "POST", "/v1/commit", json={"agent": "n-1", "writes": {"fc/other": 1}}))[0] == 200


async def test_bus_restart_alone_still_catches_a_stale_read(cluster, tmp_path):
    """Shards keep their deliveries; only the bus's memory is gone — the journal is not."""
    shards = [cluster.add(shard(tmp_path, i, tmp_path / f"shard-{i}")).start() for i in range(2)]
    for s in shards:
        await asyncio.to_thread(s.wait_serving)
    front = cluster.add(bus(tmp_path, [s.shard_address for s in shards])).start()
    await asyncio.to_thread(front.wait_serving)
    read_key, write_key = keys_on_shard(0, "fc/r")[0], keys_on_shard(1, "fc/w")[0]
    async with aiohttp.ClientSession(base_url=f"http://{front.http_address}") as http:
        for k in (read_key, write_key):
            assert (await call(http, "POST", "/shard", json={"key": k, "content": "v0"}))[0] == 201
        for agent in ("stale-agent", "fresh-agent"):
            for k in (read_key, write_key):
                assert (await call(http, "GET", f"/shard/{k}", params={"agent_id": agent}))[0] == 200
        await restart(front)
        # another agent changes the key both agents read on shard 0
        st, _ = await call(http, "POST", "/commit",
                           json={"key": read_key, "expected_version": 0, "delta": "v1", "agent_id": "other"})
        assert st == 200
        # the stale agent writes only on shard 1: shard 0 must still validate its read there
        st, out = await call(http, "POST", "/commit/v2",
                             json={"key": write_key, "expected_version": 0, "delta": "x", "agent_id": "stale-agent"})
        assert (st, out["error"], out["key"]) == (409, "CrossShardStale", read_key), out
        assert (out["version_at_read"], out["current_version"]) == (0, 1)
        # the fresh agent re-reads first: accepted
        await call(http, "GET", f"/shard/{read_key}", params={"agent_id": "fresh-agent"})
        st, out = await call(http, "POST", "/commit/v2",
                             json={"key": write_key, "expected_version": 0, "delta": "y", "agent_id": "fresh-agent"})
        assert st == 200, out
