"""``oribus mcp`` as real processes, driven by the ``mcp`` SDK's own client.

Over stdio (the client starts ``oribus mcp`` as its subprocess, as an MCP host does)
and over streamable HTTP (``oribus mcp --http`` started here on a free port, stopped
by pid), against ``oribus up`` (``--addr``) and against a data directory
(``--data-dir``, the engine in the ``oribus mcp`` process). The race every transport
must win: two MCP clients both read one key, then both commit it at once: exactly
one commit lands, the other gets the structured conflict naming the winner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters
from mcp.types import Implementation
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS
from processes import REPO, free_port, oribus_command, run_cli

import oribus


def stdio(*args: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "oribus.cli", "mcp", *args], cwd=REPO)


@contextlib.contextmanager
def mcp_http(log_dir: Path, *args: str) -> Iterator[str]:
    """``oribus mcp --http`` on a free port; yields its URL; stopped by pid (SIGTERM, then SIGKILL)."""
    port = free_port()
    log_path = log_dir / f"mcp-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(oribus_command("mcp", *args, "--http", f"127.0.0.1:{port}"),
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"oribus mcp exited with {proc.returncode}:\n{log_path.read_text()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            assert time.monotonic() < deadline, f"oribus mcp not serving:\n{log_path.read_text()}"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
        proc.terminate()
        assert proc.wait(15) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def named(target: object, name: str) -> Client:
    return Client(target, client_info=Implementation(name=name, version="1"))  # type: ignore[arg-type]


async def call(c: Client, tool: str, **arguments):
    r = await c.call_tool(tool, arguments)
    assert not r.is_error, r.content[0].text
    return r.structured_content


async def race(a: Client, b: Client, key: str) -> tuple[str, dict]:
    """Both read ``key``, then both commit it at once. Returns the winner's value and the loser's refusal."""
    assert (await call(a, "read", key=key))["version"] == 0
    assert (await call(b, "read", key=key))["version"] == 0
    ra, rb = await asyncio.gather(a.call_tool("commit", {"writes": {key: "from a"}}),
                                  b.call_tool("commit", {"writes": {key: "from b"}}))
    assert sorted([ra.is_error, rb.is_error]) == [False, True], (ra.content, rb.content)
    won, lost = (ra, rb) if rb.is_error else (rb, ra)
    assert won.structured_content == {"committed": True, "versions": {key: 1}}
    winner_value = "from a" if won is ra else "from b"
    refusal = lost.structured_content
    assert refusal["committed"] is False and refusal["error"] == "Conflict"
    [row] = refusal["conflicts"]
    assert (row["key"], row["reason"], row["your_version"]) == (key, "stale_read", 0)
    assert (row["current_version"], row["current_value"]) == (1, winner_value)
    assert "Commit refused" in lost.content[0].text
    return winner_value, refusal


async def bad_input_is_a_tool_error(c: Client) -> None:
    for tool, arguments in [("read", {"key": ""}), ("commit", {"writes": "x"}), ("history", {"key": "k", "limit": 0})]:
        r = await c.call_tool(tool, arguments)
        assert r.is_error, (tool, arguments)
    assert (await call(c, "read", key="still/serving"))["version"] == 0


async def test_two_stdio_clients_race_on_one_key_of_a_bus(up_embedded):
    async with named(stdio("--addr", up_embedded.address), "alice") as a, \
               named(stdio("--addr", up_embedded.address), "bob") as b:
        winner, refusal = await race(a, b, "stdio/plan")
        assert refusal["conflicts"][0]["written_by"]["agent"] == ("alice" if winner == "from a" else "bob")
        await bad_input_is_a_tool_error(a)
        loser = b if winner == "from a" else a
        assert (await call(loser, "commit", writes={"stdio/plan": "after the refusal"}))["committed"]
    async with oribus.connect(up_embedded.address) as bus:
        assert [(v.version, v.value) for v in await bus.history("stdio/plan")] == [
            (2, "after the refusal"), (1, winner)]
        assert [(i.key, i.version) for i in await bus.scan("stdio/")] == [("stdio/plan", 2)]  # the SDK's scan, remote


async def test_two_http_sessions_race_on_one_key_of_a_bus(up_embedded, tmp_path):
    with mcp_http(tmp_path, "--addr", up_embedded.address) as url:
        # the same client name twice: still two MCP sessions, so two oribus sessions
        async with named(url, "worker") as a, named(url, "worker") as b:
            assert a.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
            winner, refusal = await race(a, b, "http/plan")
            assert refusal["conflicts"][0]["written_by"]["agent"] == "worker"
            await bad_input_is_a_tool_error(b)
            assert [k["key"] for k in (await call(a, "list", prefix="http/"))["keys"]] == ["http/plan"]


async def test_http_on_a_data_directory(tmp_path):
    data = tmp_path / "data"
    with mcp_http(tmp_path, "--data-dir", str(data)) as url:
        async with named(url, "alice") as a, named(url, "bob") as b:
            winner, _ = await race(a, b, "local/plan")
            watched = await call(a, "changes", prefix="local/")
            assert watched["started_watching"]
            await call(b, "commit", writes={"local/plan": "seen", "local/other": 1})
            seen = (await call(a, "changes", prefix="local/", wait_seconds=10))["changes"]
            while len(seen) < 2:
                seen += (await call(a, "changes", prefix="local/", wait_seconds=10))["changes"]
            assert {(e["key"], e["agent"]) for e in seen} == {("local/plan", "bob"), ("local/other", "bob")}
    # stopped by SIGTERM, the server closed the engine: the directory opens again, with the commits
    async with oribus.open_local(data) as bus:
        assert [v.value for v in await bus.history("local/plan")] == ["seen", winner]


async def test_stdio_on_a_data_directory_with_an_agent_name(tmp_path):
    data = tmp_path / "data"
    async with named(stdio("--data-dir", str(data), "--agent", "planner"), "some-host") as c:
        await call(c, "commit", writes={"plan": {"step": 1}})
        await call(c, "commit", writes={"plan": {"step": 2}})
        assert [v["agent"] for v in (await call(c, "history", key="plan"))["versions"]] == ["planner", "planner"]
        resource = await c.read_resource("oribus://key/plan")
        assert json.loads(resource.contents[0].text)["value"] == {"step": 2}
        await bad_input_is_a_tool_error(c)
    # the end of its input ended the server, which closed the engine
    async with oribus.open_local(data) as bus:
        assert (await bus.get("plan")).value == {"step": 2}


def test_a_request_of_a_sessionless_protocol_revision_is_refused_with_the_supported_ones(up_embedded, tmp_path):
    with mcp_http(tmp_path, "--addr", up_embedded.address) as url:
        request = urllib.request.Request(
            url, method="POST",
            data=json.dumps({"jsonrpc": "2.0", "id": 7, "method": "server/discover", "params": {}}).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                     "MCP-Protocol-Version": "2026-07-28"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 400
        reply = json.loads(refused.value.read())
        assert reply["id"] == 7 and reply["error"]["code"] == -32022
        assert reply["error"]["data"]["supported"] == list(HANDSHAKE_PROTOCOL_VERSIONS)


def test_bad_command_lines_are_refused(tmp_path):
    for args in (["--http", "no-port"], ["--http", "127.0.0.1:99999"], ["--addr", "a:1", "--data-dir", "d"],
                 ["--agent", ""]):
        r = run_cli("mcp", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip(), args


async def test_a_data_directory_open_elsewhere_is_refused(tmp_path):
    data = tmp_path / "data"
    async with oribus.open_local(data):
        r = run_cli("mcp", "--data-dir", str(data))
    assert r.returncode == 3 and "refused" in r.stderr, r.stderr
