"""kill -9 one shard server: readiness and stats say which shard is down.

Layout: two ``oribus shard`` processes and an ``oribus bus`` over them, one key
written on each shard. After shard 1 is killed with SIGKILL:

* ``GET /readyz`` is 503 and names shard 1 (200 before the kill, when every shard
  answers); ``?routable=1`` stays 200, since the bus still routes to shard 0;
* ``GET /v1/stats``, the S-Bus ``GET /stats``, and ``oribus stats`` (gRPC) still
  answer, with shard 0's figures and shard 1 marked down with its error.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from conftest import keys_on_shard
from processes import run_cli, two_shards_and_a_bus

pytestmark = pytest.mark.slow


async def call(http: aiohttp.ClientSession, method: str, path: str, **kw) -> tuple[int, dict]:  # noqa: ANN003
    async with http.request(method, path, **kw) as r:
        return r.status, json.loads(await r.read())


async def test_kill9_of_a_shard_is_named_by_readyz_and_stats(cluster, tmp_path):
    s0, s1, b = await asyncio.to_thread(two_shards_and_a_bus, cluster, tmp_path)
    a, z = keys_on_shard(0, "down/a")[0], keys_on_shard(1, "down/z")[0]

    async with aiohttp.ClientSession(base_url=f"http://{b.http_address}") as http:
        for k in (a, z):
            assert (await call(http, "POST", "/shard", json={"key": k, "content": "v0"}))[0] == 201
        st, out = await call(http, "GET", "/readyz")
        assert (st, out["down"]) == (200, []), out

        await asyncio.to_thread(s1.kill9)

        t0 = time.monotonic()
        st, out = await call(http, "GET", "/readyz")
        assert st == 503 and out["down"] == [1] and "1" in out["errors"], out
        assert time.monotonic() - t0 < 5  # a per-shard timeout, not a hang
        st, out = await call(http, "GET", "/readyz", params={"routable": "1"})
        assert st == 200 and out["down"] == [1], out

        st, out = await call(http, "GET", "/v1/stats")
        assert st == 200 and out["shards_down"] == [1], out
        live, dead = out["shards"]
        assert live["shard"] == 0 and live["up"] is True and live["keys"] >= 1, live
        assert dead["shard"] == 1 and dead["up"] is False and dead["error"], dead

        st, out = await call(http, "GET", "/stats")
        assert st == 200, out
        assert out["total_shards"] == 1  # a's metadata record is on shard 0; z's, on shard 1, is not counted
        assert out["servers"][0] == {"shard": 0, "up": True}
        assert out["servers"][1]["up"] is False and out["servers"][1]["error"], out

    got = await asyncio.to_thread(run_cli, "stats", "--addr", b.address)
    assert got.returncode == 0, got.stdout + got.stderr
    out = json.loads(got.stdout)
    assert out["shards_down"] == [1], out
    live, dead = out["shards"]
    assert live["up"] is True and live["keys"] >= 1
    assert dead == {"shard": 1, "up": False, "error": dead["error"]} and dead["error"]
