"""The S-Bus routes' own state over a real aiohttp server on port 0: the reserved metadata
namespace, S-Bus's reset and listing, and the caps on HTTP sessions.

Each test reproduces a finding of the hardening issue as it was reported.
"""

from __future__ import annotations

import aiohttp
import pytest
from http_call import call

from oribus.bus.sessions import SessionLimits
from oribus.contract import CommitRequest
from oribus.errors import InvalidRequest
from oribus.gateway import GatewayConfig, HttpGateway
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig
from oribus.types import encode_value


async def every_key(http) -> list:
    st, out = await call(http, "GET", "/v1/keys", params={"limit": "10000"})
    assert st == 200
    return out["items"]


# ---- 6: the reserved .sbus/ namespace --------------------------------------------------------


async def test_reserved_prefix_is_refused_on_every_write_path(admin_served):
    engine, _, http = admin_served
    assert (await call(http, "POST", "/shard", json={"key": "zz", "content": "c"}))[0] == 201
    before = await every_key(http)

    # the request: forging zz's metadata through /v1
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "m", "writes": {".sbus/zz": {"created_at": "x"}}})
    assert st == 400 and out["error"] == "InvalidRequest", out
    assert out["details"] == {"key": ".sbus/zz", "prefix": ".sbus/"} and "reserved" in out["message"]
    for bad in ({"agent": "m", "deletes": [".sbus/zz"]},
                {"agent": "m", "writes": {".sbus/new": 1}},
                {"agent": "m", "writes": {"ok": 1, ".sbus/zz": 2}}):  # nothing of it is written
        st, out = await call(http, "POST", "/v1/commit", json=bad)
        assert (st, out["error"]) == (400, "InvalidRequest"), out
    st, out = await call(http, "POST", "/v1/rollback", json={"agent": "m", "versions": {".sbus/zz": 1}})
    assert (st, out["details"]["prefix"]) == (400, ".sbus/"), out
    # S-Bus routes: creating a key there would write .sbus/.sbus/...; committing to one is a write
    st, out = await call(http, "POST", "/shard", json={"key": ".sbus/zz", "content": "forged"})
    assert (st, out["error"]) == (400, "InvalidRequest") and ".sbus/" in out["detail"], out
    st, out = await call(http, "POST", "/commit/v2", json={"key": ".sbus/zz", "expected_version": 0,
                                                            "delta": "forged", "agent_id": "m"})
    assert (st, out["error"]) == (400, "InvalidRequest"), out
    # the bus itself (what the gRPC service calls, answering INVALID_ARGUMENT)
    with pytest.raises(InvalidRequest, match="reserved"):
        await engine.bus.commit(CommitRequest(session=("m", "grpc"), commit_id="c1",
                                              writes={".sbus/zz": encode_value({"created_at": "x"})}))

    assert await every_key(http) == before  # nothing changed
    assert (await call(http, "GET", "/shard/zz"))[0] == 200
    assert (await call(http, "GET", "/shards"))[1] == {"shards": ["zz"], "count": 1}
    # reading the reserved namespace is harmless, and allowed
    st, out = await call(http, "GET", "/v1/keys/.sbus/zz", params={"agent": "m"})
    assert st == 200 and out["value"]["goal_tag"] == ""


@pytest.mark.parametrize("record", [
    {"created_at": "x"},  # the forged record
    {"created_at": 1e300, "base": "y", "goal_tag": 5, "id": None},
    {"created_at": True, "base": -3},
    ["not", "a", "map"],
    {"$bytes": "AAEC"},
])
async def test_a_malformed_metadata_record_never_fails_a_read(admin_served, record):
    """Written through the internal path (as an older version or damage could leave it)."""
    _, gw, http = admin_served
    assert (await call(http, "POST", "/shard", json={"key": "zz", "content": "c", "goal_tag": "g"}))[0] == 201
    raw = encode_value(record) if record != {"$bytes": "AAEC"} else encode_value(b"\x00\x01\x02")
    await gw.commit_unread(CommitRequest(session=("system", "test"), commit_id="m1", writes={".sbus/zz": raw}),
                           may_write_reserved=True)
    st, out = await call(http, "GET", "/shard/zz", params={"agent_id": "reader"})
    assert st == 200, out
    assert (out["version"], out["content"]) == (0, "c")
    assert isinstance(out["created_at"], str) and isinstance(out["goal_tag"], str)
    assert (await call(http, "GET", "/shards")) == (200, {"shards": ["zz"], "count": 1})
    st, out = await call(http, "POST", "/commit/v2", json={"key": "zz", "expected_version": 0,
                                                            "delta": "c1", "agent_id": "reader"})
    assert (st, out["new_version"]) == (200, 1), out
    assert (await call(http, "GET", "/admin/delivery-log"))[0] == 200


# ---- 20: S-Bus's reset and listing ---------------------------------------------------------------


async def test_sbus_smoke_cross_shard_stale_then_reset_then_again(admin_served):
    """S-Bus's own smoke test (test_proxy_cross_shard_stale.sh), its cases in a row with
    ``POST /admin/reset`` before each: a reset leaves every key absent (created again at
    version 0) and every agent's read log empty, as in S-Bus."""
    _, _, http = admin_served

    async def commit(key, expected, agent):
        return await call(http, "POST", "/commit/v2", json={
            "key": key, "expected_version": expected, "delta": "test-write", "agent_id": agent, "read_set": []})

    async def reset_and_create():
        st, out = await call(http, "POST", "/admin/reset")
        assert st == 200 and set(out) == {"cleared"}
        assert (await call(http, "GET", "/shards")) == (200, {"shards": [], "count": 0})
        for key in ("models_state", "orm_query"):
            st, out = await call(http, "POST", "/shard", json={"key": key, "content": "v0", "goal_tag": "test"})
            assert (st, out["version"]) == (201, 0), out
        assert (await call(http, "GET", "/shards"))[1] == {"shards": ["models_state", "orm_query"], "count": 2}

    async def case_a():  # a proxy-recorded read, made stale: the commit is refused
        await reset_and_create()
        st, out = await call(http, "POST", "/delivery_log/register", json={
            "agent_id": "worker-demo", "session_id": "test", "shards_used": ["models_state"],
            "source": "proxy", "timestamp_ms": 0})
        assert (st, out["ok"], out["registered"]) == (200, True, 1), out
        st, out = await commit("models_state", 0, "other-agent")
        assert (st, out.get("new_version")) == (200, 1), out
        st, out = await commit("orm_query", 0, "worker-demo")
        assert (st, out["error"]) == (409, "CrossShardStale"), out
        assert (out["key"], out["version_at_read"], out["current_version"]) == ("models_state", 0, 1)

    async def case_b():  # the control: no recorded read, the commit is accepted
        await reset_and_create()
        st, out = await commit("models_state", 0, "other-agent")
        assert (st, out.get("new_version")) == (200, 1), out
        st, out = await commit("orm_query", 0, "worker-demo")
        assert (st, out.get("new_version"), out.get("error")) == (200, 1, None), out

    await case_a()
    await case_b()
    await case_a()
    await case_b()


async def test_reads_made_before_a_reset_never_pass_as_current(admin_served):
    """oribus versions never go back: only the S-Bus numbering restarts, from each key's base.
    An old read stays stale, and S-Bus rollback reaches only the key created again."""
    engine, _, http = admin_served
    await call(http, "POST", "/shard", json={"key": "doc", "content": "old"})
    await call(http, "POST", "/commit/v2", json={"key": "doc", "expected_version": 0, "delta": "old 1",
                                                  "agent_id": "w"})
    old = (await engine.bus.read(("x", "peek"), ["doc"], record=False)).items[0].version
    await call(http, "POST", "/admin/reset")
    await call(http, "POST", "/shard", json={"key": "doc", "content": "new"})
    await call(http, "POST", "/shard", json={"key": "out", "content": "o"})
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "late", "writes": {"o2": 1}, "read_set": {"doc": old}})
    assert st == 409 and out["stale"][0][:2] == ["doc", old]
    st, out = await call(http, "POST", "/commit/v2", json={
        "key": "out", "expected_version": 0, "delta": "x", "agent_id": "late",
        "read_set": [{"key": "doc", "version_at_read": 0}]})
    assert st == 200, out  # S-Bus numbering: doc@0 names the doc that exists now
    st, out = await call(http, "POST", "/rollback", json={"key": "doc", "target_version": 1, "agent_id": "a"})
    assert (st, out["error"]) == (404, "VersionNotFound"), out  # "old 1" belongs to the earlier doc
    assert (await call(http, "GET", "/shard/doc"))[1]["content"] == "new"


# ---- 10: caps on HTTP sessions ------------------------------------------------------------------


@pytest.fixture
async def small_caps(data_dir):
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=2, max_sessions_per_shard=20))
    limits = SessionLimits(max_sessions=40, max_per_agent=5, max_per_client=15)
    gw = HttpGateway(engine.bus, GatewayConfig(listen="127.0.0.1:0", session_limits=limits))  # --http-sessions...
    assert engine.bus.sessions.limits == limits
    await gw.start()
    flooder = aiohttp.ClientSession(base_url=gw.url, connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    async with aiohttp.ClientSession(base_url=gw.url) as http, flooder:
        yield engine, http, flooder
    await gw.stop()
    await engine.close()


async def test_one_client_opening_many_sessions_cannot_lock_new_agents_out(small_caps):
    """The issue's lockout, scaled down (20 sessions per shard's delivery log, 15 per client
    address, 5 per agent): one client opens 60 sessions; a new agent from another address
    still reads and commits, and every evicted session's next commit fails closed."""
    engine, http, flooder = small_caps
    await call(http, "POST", "/v1/commit", json={"agent": "setup", "writes": {"c/k": 1, "c/j": 1}})
    st, _ = await call(http, "POST", "/v1/get", json={"agent": "idle", "keys": ["c/k", "c/j"]})
    assert st == 200
    for i in range(60):
        agent = f"flood-{i // 10}"  # six agents, ten sessions each
        st, out = await call(flooder, "POST", "/v1/get", json={"agent": agent, "session": f"s{i}", "keys": ["c/k"]})
        assert st == 200, out  # the flooder itself is never refused either: its own oldest go

    st, out = await call(http, "POST", "/v1/get", json={"agent": "newcomer", "keys": ["c/k"]})
    assert st == 200, out
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "newcomer", "writes": {"c/k": 2}})
    assert st == 200, out

    # evicted: the flooder's first session (by the per-agent and per-client caps, and the
    # shard's delivery log) and the idle agent (by the shards' delivery logs): both refused
    for agent, session, writes in (("flood-0", "s0", {"c/x": 1}), ("idle", "http", {"c/y": 1})):
        st, out = await call(http, "POST", "/v1/commit", json={"agent": agent, "session": session, "writes": writes})
        assert (st, out["error"]) == (410, "SessionExpired"), (agent, out)
    assert (await every_key(http))[-1]["key"] == "c/k"  # neither wrote anything

    table = engine.bus.sessions
    assert table.durable_sessions <= 40 and table.largest_groups()["client"] <= 15
    assert table.evicted["client"] > 0 and table.evicted["agent"] > 0
    async with http.get("/metrics") as r:
        text = await r.text()
    assert 'oribus_http_session_limit{cap="client"} 15' in text
    assert f'oribus_http_sessions_evicted{{cap="client"}} {table.evicted["client"]}' in text
    assert 'oribus_http_sessions_largest{cap="agent"} 5' in text
    assert 'oribus_delivery_log_evicted{shard=' in text
