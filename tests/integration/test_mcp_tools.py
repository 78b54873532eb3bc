"""``oribus mcp``'s tools and resource, called by the ``mcp`` SDK's own client in process.

Each client is connected to its own server on one embedded bus, as two MCP hosts would
each start ``oribus mcp`` for one agent: every client is one MCP session, so one oribus
session. The transports (stdio, streamable HTTP) with real processes are in
tests/e2e/test_mcp.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import Implementation

import oribus
from oribus.integrations.mcp import results, sessions
from oribus.integrations.mcp.server import build_server
from oribus.integrations.mcp.sessions import SessionPool

TOOLS = {"read", "read_many", "commit", "rollback", "history", "list", "changes", "unwatch"}


@pytest.fixture
async def bus(data_dir):
    async with oribus.open_local(data_dir, agent="oribus-mcp") as b:
        yield b


@contextlib.asynccontextmanager
async def client(bus: oribus.AsyncSession, name: str, agent: str | None = None) -> AsyncIterator[Client]:
    """An MCP client named ``name`` on a server of its own over ``bus``."""
    pool = SessionPool(bus.session(), agent)
    try:
        async with Client(build_server(pool), client_info=Implementation(name=name, version="1")) as c:
            yield c
    finally:
        await pool.close()


async def call(c: Client, tool: str, **arguments):
    r = await c.call_tool(tool, arguments)
    assert not r.is_error, r.content[0].text
    assert json.loads(r.content[0].text.split("\n", 1)[1]) == r.structured_content  # the same in the text
    return r.structured_content


async def refused(c: Client, tool: str, **arguments):
    r = await c.call_tool(tool, arguments)
    assert r.is_error, r.structured_content
    return r


async def test_the_tools_are_listed_with_descriptions_and_argument_schemas(bus):
    async with client(bus, "alice") as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
    assert set(tools) == TOOLS
    assert all(t.description for t in tools.values())
    assert tools["commit"].input_schema["required"] == ["writes"]
    assert set(tools["commit"].input_schema["properties"]) == {"writes", "expect", "delete"}
    assert tools["read"].annotations.read_only_hint and not tools["commit"].annotations.read_only_hint


async def test_read_commit_read_many_and_the_agent_is_the_client_name(bus):
    async with client(bus, "alice") as c:
        assert await call(c, "read", key="plan") == {"key": "plan", "value": None, "version": 0, "exists": False}
        assert await call(c, "commit", writes={"plan": {"steps": [1, 2]}, "owner": "alice"}) == {
            "committed": True, "versions": {"plan": 1, "owner": 1}}
        got = await call(c, "read_many", keys=["plan", "owner", "nothing"])
        assert got["items"] == [
            {"key": "plan", "value": {"steps": [1, 2]}, "version": 1, "exists": True},
            {"key": "owner", "value": "alice", "version": 1, "exists": True},
            {"key": "nothing", "value": None, "version": 0, "exists": False},
        ]
    assert (await bus.history("plan"))[0].agent == "alice"


async def test_the_configured_agent_name_wins_over_the_client_name(bus):
    async with client(bus, "some-host", agent="planner") as c:
        await call(c, "commit", writes={"k": 1})
    assert (await bus.history("k"))[0].agent == "planner"


async def test_a_commit_on_a_changed_key_is_refused_with_the_current_value_and_its_writer(bus):
    async with client(bus, "alice") as alice, client(bus, "bob") as bob:
        await call(alice, "commit", writes={"plan": "v1"})
        await call(alice, "read", key="plan")
        await call(bob, "read", key="plan")
        await call(bob, "commit", writes={"plan": "bob's"})

        r = await refused(alice, "commit", writes={"plan": "alice's", "other": 1})
        data = r.structured_content
        assert data["committed"] is False and data["error"] == "Conflict"
        [row] = data["conflicts"]
        assert row["key"] == "plan" and row["reason"] == "stale_read"
        assert (row["your_version"], row["current_version"], row["current_value"]) == (1, 2, "bob's")
        assert row["written_by"]["agent"] == "bob" and row["written_by"]["commit_id"]
        text = r.content[0].text
        assert text.startswith("Commit refused") and "'bob'" in text and "bob's" in text
        assert (await bus.get("other")).version == 0  # nothing of it was written

        # the refusal showed alice the current value: it is now her read, so she can commit again
        assert await call(alice, "commit", writes={"plan": "alice's, after bob's"}) == {
            "committed": True, "versions": {"plan": 3}}


async def test_expect_refuses_a_key_at_another_version(bus):
    async with client(bus, "alice") as c:
        await call(c, "commit", writes={"k": 1})
        r = await refused(c, "commit", writes={"k": 2}, expect={"k": 7})
        [row] = r.structured_content["conflicts"]
        assert (row["reason"], row["your_version"], row["current_version"]) == ("expected_version", 7, 1)
        assert await call(c, "commit", writes={"k": 2}, expect={"k": 1}) == {"committed": True, "versions": {"k": 2}}


async def test_delete_and_what_a_commit_refuses_to_guess(bus):
    async with client(bus, "alice") as c:
        await call(c, "commit", writes={"a": 1, "b": 2})
        assert await call(c, "commit", writes={}, delete=["a"]) == {"committed": True, "versions": {"a": 2}}
        assert (await call(c, "read", key="a"))["exists"] is False
        for arguments, words in [
            ({"writes": {"b": None}}, "null is not a value"),
            ({"writes": {"b": 3}, "delete": ["b"]}, "both written and deleted"),
            ({"writes": {}}, "nothing to commit"),
            ({"writes": {"": 1}}, "key must be"),
            ({"writes": {"b": 1}, "expect": {"b": "two"}}, "expect"),
            ({"writes": "b=1"}, "writes"),
            ({}, "writes"),
        ]:
            r = await refused(c, "commit", **arguments)
            assert words in r.content[0].text, (arguments, r.content[0].text)
        assert (await bus.get("b")).value == 2


async def test_rollback_restores_an_earlier_value_as_a_new_version(bus):
    async with client(bus, "alice") as c:
        await call(c, "commit", writes={"k": "first"})
        await call(c, "commit", writes={"k": "second"})
        assert await call(c, "rollback", targets={"k": 1}) == {"committed": True, "versions": {"k": 3}}
        assert (await call(c, "read", key="k"))["value"] == "first"
        assert "InvalidRequest" in (await refused(c, "rollback", targets={"k": 9})).content[0].text
        for bad in ({}, {"k": "one"}, []):
            await refused(c, "rollback", targets=bad)


async def test_history_newest_first_with_writers_and_bounded(bus):
    async with client(bus, "alice") as alice, client(bus, "bob") as bob:
        await call(alice, "commit", writes={"k": 1})
        await call(bob, "read", key="k")
        await call(bob, "commit", writes={"k": 2})
        got = await call(alice, "history", key="k")
        assert [(v["version"], v["value"], v["agent"]) for v in got["versions"]] == [(2, 2, "bob"), (1, 1, "alice")]
        assert len((await call(alice, "history", key="k", limit=1))["versions"]) == 1
        for bad in ({"key": "k", "limit": 0}, {"key": "k", "limit": 10**6}, {"key": ""}, {"limit": 1}):
            await refused(alice, "history", **bad)


async def test_list_pages_through_keys_under_a_prefix(bus):
    async with client(bus, "alice") as c:
        await call(c, "commit", writes={f"team/{i}": i for i in range(5)} | {"other": 0})
        first = await call(c, "list", prefix="team/", limit=3)
        assert first == {"keys": [{"key": f"team/{i}", "version": 1} for i in range(3)], "next_after": "team/2"}
        rest = await call(c, "list", prefix="team/", after=first["next_after"], limit=3)
        assert rest == {"keys": [{"key": "team/3", "version": 1}, {"key": "team/4", "version": 1}], "next_after": None}
        assert [k["key"] for k in (await call(c, "list"))["keys"]][-1] == "team/4"
        for bad in ({"limit": 0}, {"limit": "ten"}, {"prefix": 3}):
            await refused(c, "list", **bad)


async def test_list_is_not_a_read(bus):
    async with client(bus, "alice") as alice, client(bus, "bob") as bob:
        await call(bob, "commit", writes={"k": 1})
        await call(alice, "list")
        await call(bob, "commit", writes={"k": 2})
        assert (await call(alice, "commit", writes={"k": 3}))["committed"]


async def test_changes_polls_a_watch_of_a_prefix(bus):
    async with client(bus, "alice") as alice, client(bus, "bob") as bob:
        await call(bob, "commit", writes={"team/a": 1})
        first = await call(alice, "changes", prefix="team/")
        assert first == {"prefix": "team/", "started_watching": True, "changes": [], "more": False}
        await call(bob, "commit", writes={"team/a": 2, "team/b": 1, "elsewhere": 1})
        got = await call(alice, "changes", prefix="team/", wait_seconds=10)
        seen = list(got["changes"])
        while len(seen) < 2:
            seen += (await call(alice, "changes", prefix="team/", wait_seconds=10))["changes"]
        assert got["started_watching"] is False
        assert sorted((e["key"], e["version"], e["value"], e["agent"]) for e in seen) == [
            ("team/a", 2, 2, "bob"), ("team/b", 1, 1, "bob")]
        assert (await call(alice, "changes", prefix="team/"))["changes"] == []

        # a first call with from_version replays what is kept
        replay = await call(alice, "changes", prefix="team/a", from_version=0, wait_seconds=10)
        seen = replay["changes"]
        while len(seen) < 2:
            seen += (await call(alice, "changes", prefix="team/a", wait_seconds=10))["changes"]
        assert [e["version"] for e in seen] == [1, 2]

        assert (await call(alice, "unwatch", prefix="team/")) == {"prefix": "team/", "stopped": True}
        assert (await call(alice, "unwatch", prefix="team/")) == {"prefix": "team/", "stopped": False}
        for bad in ({"from_version": -1}, {"wait_seconds": 3600}, {"max_events": 0}, {"prefix": 7}):
            await refused(alice, "changes", **bad)


async def test_a_session_watches_a_bounded_number_of_prefixes(bus, monkeypatch):
    monkeypatch.setattr(sessions, "MAX_WATCHES", 2)
    async with client(bus, "alice") as c:
        await call(c, "changes", prefix="a/")
        await call(c, "changes", prefix="b/")
        r = await refused(c, "changes", prefix="c/")
        assert r.structured_content["error"] == "LimitExceeded"
        await call(c, "unwatch", prefix="a/")
        assert (await call(c, "changes", prefix="c/"))["started_watching"]


async def test_the_key_resource_is_a_recorded_read(bus):
    async with client(bus, "alice") as alice, client(bus, "bob") as bob:
        await call(bob, "commit", writes={"team/plan": {"step": 1}})
        r = await alice.read_resource("oribus://key/team/plan")
        assert json.loads(r.contents[0].text) == {"key": "team/plan", "value": {"step": 1}, "version": 1, "exists": True}
        await call(bob, "commit", writes={"team/plan": {"step": 2}})
        r = await refused(alice, "commit", writes={"team/plan": {"step": 3}})
        assert r.structured_content["conflicts"][0]["your_version"] == 1
        with pytest.raises(MCPError, match="InvalidRequest"):
            await alice.read_resource("oribus://key/" + "x" * 2000)


async def test_bad_calls_are_tool_errors_and_the_server_goes_on(bus):
    async with client(bus, "alice") as c:
        for tool, arguments in [
            ("read", {}), ("read", {"key": 5}), ("read", {"key": ""}), ("read", {"key": "k" * 5000}),
            ("read_many", {"keys": []}), ("read_many", {"keys": "k"}), ("read_many", {"keys": ["ok", ""]}),
            ("no_such_tool", {}),
        ]:
            r = await c.call_tool(tool, arguments)
            assert r.is_error and r.content[0].text, (tool, arguments)
        assert (await call(c, "read", key="k"))["version"] == 0


def test_values_the_bus_holds_but_json_has_not_are_shown_as_json():
    assert results.jsonable({"b": b"\x00\xff", 1: (1, 2), "n": None}) == {
        "b": {"$bytes": "AP8="}, "1": [1, 2], "n": None}


async def test_an_expired_session_is_a_tool_error_that_resets_it(data_dir):
    async with oribus.open_local(data_dir, agent="oribus-mcp", session_ttl_seconds=0.2) as bus:
        async with client(bus, "alice") as c:
            await call(c, "read", key="k")
            await asyncio.sleep(0.3)
            r = await refused(c, "commit", writes={"k": 1})
            assert r.structured_content["error"] == "SessionExpired"
            assert "read again every key" in r.structured_content["advice"]
            assert (await bus.get("k")).version == 0
            # reset: once the model has read what it depends on again, its commit is checked and goes through
            await call(c, "read", key="k")
            assert await call(c, "commit", writes={"k": 1}) == {"committed": True, "versions": {"k": 1}}
