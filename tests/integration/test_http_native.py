"""The native /v1 JSON API, health, metrics and OpenAPI over a real aiohttp server on port 0."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import pytest
from http_call import call

from oribus.bus.bus import Bus
from oribus.bus.session_journal import SessionJournal
from oribus.errors import (
    Aborted,
    Conflict,
    HistoryTruncated,
    InvalidRequest,
    LimitExceeded,
    SessionExpired,
    Unavailable,
    ValueTooLarge,
    WatchLagged,
)
from oribus.gateway import GatewayConfig, HttpGateway
from oribus.gateway.errors import http_status
from oribus.gateway.openapi import document
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig
from oribus.rpc.shard_client import GrpcShardClient

REPO = Path(__file__).resolve().parents[2]


async def test_reads_are_deliveries_and_stale_commits_are_refused(served):
    _, _, http = served
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "setup", "writes": {"a": 1, "b": 2}})
    assert st == 200 and out["versions"] == {"a": 1, "b": 1}
    st, out = await call(http, "POST", "/v1/get", json={"agent": "alice", "keys": ["a", "b"]})
    assert st == 200 and [(i["key"], i["value"], i["version"]) for i in out["items"]] == [("a", 1, 1), ("b", 2, 1)]
    # bob changes b; alice commits a, having read b: refused, listing b
    assert (await call(http, "POST", "/v1/commit", json={"agent": "bob", "writes": {"b": 3}}))[0] == 200
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "alice", "writes": {"a": 10}})
    assert st == 409 and out["error"] == "Conflict"
    assert out["stale"] == [["b", 1, 2, "stale_read"]]
    # an explicit read_set entry cannot mask the logged stale read
    st, out = await call(http, "POST", "/v1/commit",
                         json={"agent": "alice", "writes": {"a": 10}, "read_set": {"b": 2}})
    assert st == 409 and out["stale"] == [["b", 1, 2, "stale_read"]]
    # nothing changed
    st, out = await call(http, "GET", "/v1/keys/a", params={"agent": "x", "record": "false"})
    assert (out["value"], out["version"]) == (1, 1)
    # re-read b: the commit goes through, and alice's own write is not stale to her
    await call(http, "GET", "/v1/keys/b", params={"agent": "alice"})
    assert (await call(http, "POST", "/v1/commit", json={"agent": "alice", "writes": {"a": 10}}))[0] == 200
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "alice", "writes": {"b": 11}})
    assert st == 200 and out["versions"] == {"b": 3}


async def test_transaction_scope_checks_only_reads_since(served):
    _, _, http = served
    await call(http, "POST", "/v1/commit", json={"agent": "setup", "writes": {"t/x": 0, "t/y": 0}})
    await call(http, "GET", "/v1/keys/t/x", params={"agent": "carol"})  # an old read, outside the txn
    await call(http, "POST", "/v1/commit", json={"agent": "dave", "writes": {"t/x": 1}})
    st, out = await call(http, "POST", "/v1/get", json={"agent": "carol", "keys": ["t/y"]})
    since = out["seqs"]
    st, out = await call(http, "POST", "/v1/commit",
                         json={"agent": "carol", "writes": {"t/y": 5}, "scope": "transaction", "since": since})
    assert st == 200, out
    # the same in session scope is refused: the session read t/x before dave changed it
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "carol", "writes": {"t/y": 6}})
    assert st == 409 and out["stale"][0][:2] == ["t/x", 1]


async def test_values_round_trip_with_bytes(served):
    _, _, http = served
    value = {"blob": {"$bytes": "AAEC/w=="}, "list": [1, "two", None, True, 2.5]}
    assert (await call(http, "POST", "/v1/commit", json={"agent": "v", "writes": {"val": value}}))[0] == 200
    st, out = await call(http, "GET", "/v1/keys/val", params={"agent": "v"})
    assert out["value"] == value
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "v", "writes": {"bad": {"$bytes": "!!"}}})
    assert st == 400 and out["error"] == "InvalidRequest"


async def test_idempotent_commit_id_applies_once(served):
    _, _, http = served
    body = {"agent": "i", "writes": {"idem": 1}, "commit_id": "c-42"}
    first = await call(http, "POST", "/v1/commit", json=body)
    again = await call(http, "POST", "/v1/commit", json=body)
    assert first == again and first[1]["versions"] == {"idem": 1}
    st, out = await call(http, "GET", "/v1/history/idem")
    assert [v["version"] for v in out["versions"]] == [1]


async def test_rollback_history_and_listing(served):
    _, _, http = served
    for v in ("one", "two", "three"):
        await call(http, "POST", "/v1/commit", json={"agent": "w", "writes": {"doc/1": v}})
    await call(http, "POST", "/v1/commit", json={"agent": "w", "writes": {"doc/2": "x"}, "deletes": []})
    st, out = await call(http, "POST", "/v1/rollback", json={"agent": "w", "versions": {"doc/1": 1}})
    assert st == 200 and out["versions"] == {"doc/1": 4}
    st, out = await call(http, "GET", "/v1/history/doc/1", params={"limit": "2"})
    assert [(v["version"], v["value"], v["agent"]) for v in out["versions"]] == [(4, "one", "w"), (3, "three", "w")]
    st, out = await call(http, "POST", "/v1/rollback", json={"agent": "w", "versions": {"doc/1": 9}})
    assert st == 400
    await call(http, "POST", "/v1/commit", json={"agent": "w", "deletes": ["doc/2"]})
    st, out = await call(http, "GET", "/v1/keys", params={"prefix": "doc/"})
    assert [i["key"] for i in out["items"]] == ["doc/1"]  # deleted keys are not listed


async def test_watch_streams_server_sent_events(served):
    _, _, http = served
    async with http.get("/v1/watch", params={"prefix": "w/"}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        assert (await r.content.readuntil(b"\n\n")) == b": subscribed\n\n"  # the watch is registered
        await call(http, "POST", "/v1/commit", json={"agent": "w", "writes": {"w/a": 1, "other": 2}})
        await call(http, "POST", "/v1/commit", json={"agent": "w", "deletes": ["w/a"]})
        events = []
        while len(events) < 2:
            chunk = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            lines = dict(line.split(": ", 1) for line in chunk.decode().strip().split("\n"))
            assert lines["event"] == "change"
            events.append(json.loads(lines["data"]))
    assert [(e["key"], e["version"], e["value"], e["deleted"]) for e in events] == [
        ("w/a", 1, 1, False), ("w/a", 2, None, True)]


async def test_forget_and_reset(served):
    """The session's owner (the token POST /v1/session gave) forgets and resets as asked."""
    _, _, http = served
    st, opened = await call(http, "POST", "/v1/session", json={"agent": "eve"})
    assert st == 200 and opened["session_token"] and opened["next_commit_refused"] is False
    mine = {"agent": "eve", "session_token": opened["session_token"]}
    await call(http, "POST", "/v1/commit", json={"agent": "s", "writes": {"f/a": 1, "f/b": 1}})
    await call(http, "POST", "/v1/get", json={"agent": "eve", "keys": ["f/a", "f/b"]})
    await call(http, "POST", "/v1/commit", json={"agent": "s", "writes": {"f/a": 2, "f/b": 2}})
    assert (await call(http, "POST", "/v1/commit", json={"agent": "eve", "writes": {"f/c": 1}}))[0] == 409
    st, out = await call(http, "POST", "/v1/forget", json={**mine, "keys": ["f/a"]})
    assert (st, out) == (200, {"ok": True, "next_commit_refused": False})
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "eve", "writes": {"f/c": 1}})
    assert st == 409 and [s[0] for s in out["stale"]] == ["f/b"]
    st, out = await call(http, "POST", "/v1/reset", json=mine)
    assert (st, out) == (200, {"ok": True, "next_commit_refused": False})
    assert (await call(http, "POST", "/v1/commit", json={"agent": "eve", "writes": {"f/c": 1}}))[0] == 200
    # nobody can claim a session in use: a second open gets no token (and marks it, as any
    # reset without the token does)
    st, again = await call(http, "POST", "/v1/session", json={"agent": "eve"})
    assert st == 200 and again["session_token"] is None


@pytest.mark.parametrize("route", ["reset", "forget", "session"])
async def test_a_reset_by_another_caller_never_lets_a_stale_commit_pass(served, route):
    """The hardening issue's scenario: the victim reads k (v1), another agent writes k (v2),
    an attacker resets (or forgets, or re-opens) the victim's session by name, and the
    victim commits on its stale read: refused (410, saying why), never accepted."""
    _, _, http = served
    await call(http, "POST", "/v1/commit", json={"agent": "setup", "writes": {"r/k": "v1"}})
    st, out = await call(http, "POST", "/v1/get", json={"agent": "victim", "keys": ["r/k"]})
    assert st == 200 and out["items"][0]["version"] == 1
    assert (await call(http, "POST", "/v1/commit", json={"agent": "other", "writes": {"r/k": "v2"}}))[0] == 200
    body = {"agent": "victim", **({"keys": ["r/k"]} if route == "forget" else {})}
    st, out = await call(http, "POST", f"/v1/{route}", json=body)
    assert st == 200 and out["next_commit_refused"] is True
    if route == "session":
        assert out["session_token"] is None  # the attacker did not get to own the session either
    st, out = await call(http, "POST", "/v1/commit",
                         json={"agent": "victim", "writes": {"r/out": "from v1"}, "expect": {"r/out": 0}})
    assert st == 410 and out["error"] == "SessionExpired", out
    assert "did not present its session_token" in out["message"]
    st, out = await call(http, "GET", "/v1/keys/r/out", params={"agent": "x", "record": "false"})
    assert out["version"] == 0  # nothing was written
    # the victim was told; it re-reads what its work depends on, and goes on
    await call(http, "POST", "/v1/get", json={"agent": "victim", "keys": ["r/k"]})
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "victim", "writes": {"r/out": "from v2"}})
    assert st == 200, out
    # a wrong token proves nothing either
    await call(http, "POST", "/v1/commit", json={"agent": "other", "writes": {"r/k": "v3"}})
    st, out = await call(http, "POST", "/v1/reset", json={"agent": "victim", "session_token": "guess"})
    assert out["next_commit_refused"] is True
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "victim", "writes": {"r/out": "stale"}})
    assert st == 410


async def test_a_refusal_names_the_session_as_agent_slash_session(served):
    """An HTTP session is named in errors as every other session is (agent/session)."""
    _, _, http = served
    await call(http, "POST", "/v1/get", json={"agent": "named", "session": "s1", "keys": ["n/k"]})
    st, out = await call(http, "POST", "/v1/reset", json={"agent": "named", "session": "s1"})
    assert out["next_commit_refused"] is True  # not the owner: marked
    st, out = await call(http, "POST", "/v1/commit", json={"agent": "named", "session": "s1", "writes": {"n/k": 1}})
    assert st == 410 and out["details"]["session"] == "named/s1", out
    assert out["message"].startswith("session named/s1 may have lost reads"), out


async def test_a_reset_before_any_read_costs_nothing(served):
    """Resetting a session that tracks no reads has nothing to protect: no refusal follows."""
    _, _, http = served
    st, out = await call(http, "POST", "/v1/reset", json={"agent": "fresh"})
    assert out == {"ok": True, "next_commit_refused": False}
    assert (await call(http, "POST", "/v1/commit", json={"agent": "fresh", "writes": {"fr/a": 1}}))[0] == 200


async def test_sessions_view_is_admin_only(served):
    _, _, http = served
    await call(http, "POST", "/v1/get", json={"agent": "frank", "keys": ["sv/a"]})
    st, out = await call(http, "GET", "/v1/sessions")
    assert st == 403 and out["error"] == "Forbidden" and "frank" not in json.dumps(out)
    st, out = await call(http, "GET", "/dashboard/state")  # nor through the dashboard's feed
    assert st == 200 and out["sessions"] == [] and "--admin" in out["sessions_error"]
    assert "frank" not in json.dumps(out)


async def test_sessions_view_marks_stale_reads(admin_served):
    _, _, http = admin_served
    st, out = await call(http, "GET", "/v1/sessions", params={"limit": "0"})
    assert (st, out["error"]) == (400, "InvalidRequest")
    await call(http, "POST", "/v1/commit", json={"agent": "s", "writes": {"sv/a": 1, "sv/b": 1}})
    await call(http, "POST", "/v1/get", json={"agent": "frank", "keys": ["sv/a", "sv/b"]})
    await call(http, "POST", "/v1/commit", json={"agent": "s", "writes": {"sv/b": 2}})
    st, out = await call(http, "GET", "/v1/sessions")
    frank = next(s for s in out["sessions"] if s["agent"] == "frank")
    assert frank["reads"] == [
        {"key": "sv/a", "version": 1, "current": 1, "stale": False},
        {"key": "sv/b", "version": 1, "current": 2, "stale": True},
    ]


async def test_metrics_exposition(served):
    _, _, http = served
    await call(http, "POST", "/v1/commit", json={"agent": "m", "writes": {"m/a": 1}})
    async with http.get("/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    for name in ("oribus_commits_total", "oribus_op_seconds_bucket", "oribus_wal_fsync_seconds_count",
                 "oribus_delivery_log_entries", "oribus_shard_up"):
        assert name in text, name
    assert 'oribus_shard_up{shard="0"} 1' in text and 'oribus_shard_up{shard="1"} 1' in text


async def test_health_and_readiness(served):
    _, _, http = served
    assert (await call(http, "GET", "/healthz"))[0] == 200
    st, out = await call(http, "GET", "/readyz")
    assert st == 200 and out["down"] == []


async def test_readyz_reports_an_unreachable_shard(data_dir, tmp_path):
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nobody listens here once the socket is closed
    ghost = GrpcShardClient(1, dead, timeout=0.5)
    journal = await SessionJournal.open(tmp_path / "journal")
    bus = Bus({0: engine.shards[0], 1: ghost}, lambda k: 0, session_journal=journal)
    gw = HttpGateway(bus, GatewayConfig(listen="127.0.0.1:0", ready_timeout=1.0))
    await gw.start()
    try:
        async with aiohttp.ClientSession(base_url=gw.url) as http:
            st, out = await call(http, "GET", "/readyz")
            assert st == 503 and out["down"] == [1] and out["errors"]["1"]  # not every shard answers
            st, out = await call(http, "GET", "/readyz", params={"routable": "1"})
            assert st == 200 and out["down"] == [1]  # known, not answering: reported, bus still routes
            st, out = await call(http, "GET", "/v1/stats")
            assert st == 200 and out["shards_down"] == [1]
            assert out["shards"][0]["up"] is True and out["shards"][0]["shard"] == 0
            assert out["shards"][1]["up"] is False and out["shards"][1]["error"]
            assert (await call(http, "GET", "/healthz"))[0] == 200  # alive, just not ready
            text = await (await http.get("/metrics")).text()
            assert 'oribus_shard_up{shard="1"} 0' in text
    finally:
        await gw.stop()
        await ghost.close()
        await journal.close()
        await engine.close()


async def test_gateway_refuses_to_run_without_a_session_journal(data_dir):
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=1))
    try:
        bare = Bus(dict(engine.shards), engine.slot_map.shard_for)
        with pytest.raises(InvalidRequest, match="journal"):
            HttpGateway(bare)
    finally:
        await engine.close()


async def test_openapi_is_served_kept_in_specs_and_covers_every_route(served):
    _, gw, http = served
    st, served_doc = await call(http, "GET", "/v1/openapi.json")
    assert st == 200 and served_doc == document()
    kept = json.loads((REPO / "specs" / "openapi.json").read_text())
    assert kept == document(), "specs/openapi.json is out of date: python -m oribus.gateway.openapi"
    routes = {r.resource.canonical.replace("{key:.+}", "{key}") for r in gw.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/v1/")}
    assert routes == set(served_doc["paths"])


def test_one_http_status_table():
    assert [http_status(e) for e in (
        Conflict(), Aborted(), SessionExpired(), InvalidRequest(), ValueTooLarge(), HistoryTruncated(),
        LimitExceeded(), Unavailable(), WatchLagged(),
    )] == [409, 409, 410, 400, 413, 410, 429, 503, 503]


async def test_readyz_waits_for_every_shard_to_be_registered(data_dir, tmp_path):
    from oribus.meta.directory import UnregisteredShard

    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=1))
    journal = await SessionJournal.open(tmp_path / "journal")
    bus = Bus({0: engine.shards[0], 1: UnregisteredShard(1)}, lambda k: 0, session_journal=journal)
    gw = HttpGateway(bus, GatewayConfig(listen="127.0.0.1:0"))
    await gw.start()
    try:
        async with aiohttp.ClientSession(base_url=gw.url) as http:
            st, out = await call(http, "GET", "/readyz")
            assert st == 503 and out["unregistered"] == [1]
            bus.shards[1] = engine.shards[0]  # what the shard directory does once it is claimed
            assert (await call(http, "GET", "/readyz"))[0] == 200
    finally:
        await gw.stop()
        await journal.close()
        await engine.close()
