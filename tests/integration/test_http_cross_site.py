"""The gateway's Host check (DNS rebinding) and allowed origins over a real aiohttp server,
and the CLI flags that configure them (specs/http.md, "Browsers")."""

from __future__ import annotations

import aiohttp
import pytest

from oribus.bus.sessions import SessionLimits
from oribus.cli import _gateway_config, build_parser


async def post(url: str, body: dict, headers: dict[str, str]) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_rebound_host_is_refused_on_a_non_loopback_address(start_gateway):
    gw = await start_gateway(listen="0.0.0.0:0", hosts=("oribus.internal", ".svc.cluster.local"))
    port = gw.address.rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}/v1/commit"
    # a page at evil.example whose DNS name now points at the gateway: same origin to the browser
    status, body, _ = await post(url, {"agent": "m", "writes": {"rebind/k": 1}},
                                 {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
    assert (status, body["error"]) == (421, "UnknownHost"), body
    assert "--http-host" in body["message"]
    for host in (f"svc.cluster.local.evil.example:{port}", f"evilsvc.cluster.local:{port}", "oribus.internal.evil"):
        status, body, _ = await post(url, {"agent": "m", "writes": {"rebind/k": 1}}, {"Host": host})
        assert (status, body["error"]) == (421, "UnknownHost"), (host, body)
    read = await gw.bus.read(("check", "check"), ["rebind/k"], record=False)
    assert read.items[0].version == 0
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"oribus.internal:{port}", f"[::1]:{port}",
                 f"10.1.2.3:{port}", f"oribus-bus.dev.svc.cluster.local:{port}", "svc.cluster.local", f"oribus-bus:{port}"):
        status, body, _ = await post(url, {"agent": "m", "writes": {"rebind/ok": host}}, {"Host": host})
        assert status == 200, (host, body)


async def test_any_host_is_served_on_loopback(start_gateway):
    gw = await start_gateway(listen="127.0.0.1:0")
    status, body, _ = await post(f"{gw.url}/v1/commit", {"agent": "m", "writes": {"loop/k": 1}},
                                 {"Host": "whatever.example"})
    assert status == 200, body


async def test_allowed_origin_gets_cors_and_others_are_refused(start_gateway):
    tool = "http://tool.example:8080"
    gw = await start_gateway(listen="127.0.0.1:0", allow_origins=(tool,))
    status, body, headers = await post(f"{gw.url}/v1/commit", {"agent": "m", "writes": {"cors/k": 1}},
                                       {"Origin": tool})
    assert status == 200, body
    assert headers["Access-Control-Allow-Origin"] == tool
    async with aiohttp.ClientSession() as http, http.options(
            f"{gw.url}/v1/commit", headers={"Origin": tool, "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "content-type"}) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == tool
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "Content-Type" in r.headers["Access-Control-Allow-Headers"]
    status, body, headers = await post(f"{gw.url}/v1/commit", {"agent": "m", "writes": {"cors/k": 2}},
                                       {"Origin": "http://tool.example:8081"})
    assert (status, body["error"]) == (403, "CrossOriginRefused"), body
    assert "Access-Control-Allow-Origin" not in headers


def test_cli_flags_reach_the_gateway_config():
    args = build_parser().parse_args([
        "up", "--http", "0.0.0.0:7780", "--http-allow-origin", "http://a.example", "--http-allow-origin", "*",
        "--http-host", "bus.example", "--http-max-connections", "64", "--http-sessions", "900",
        "--http-sessions-per-agent", "7", "--http-sessions-per-client", "30"])
    config = _gateway_config(args)
    assert config.allow_origins == ("http://a.example", "*")
    assert config.hosts == ("bus.example",)
    assert config.max_connections == 64
    assert config.session_limits == SessionLimits(max_sessions=900, max_per_agent=7, max_per_client=30)
    defaults = _gateway_config(build_parser().parse_args(["up"]))
    assert (defaults.allow_origins, defaults.hosts, defaults.max_connections) == ((), (), 512)
    assert defaults.session_limits == SessionLimits()
    with pytest.raises(SystemExit):  # argparse: "must be at least 1, not 0"
        build_parser().parse_args(["up", "--http-sessions-per-agent", "0"])


async def test_an_empty_post_is_served_whatever_type_its_client_labels_it(start_gateway):
    # aiohttp labels an empty POST body application/octet-stream; a body to misread needs one
    gw = await start_gateway(listen="127.0.0.1:0")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/session", headers={"Content-Type": "application/octet-stream"}) as r:
            out = await r.json()  # it reaches the route, which says what the body lacks
            assert (r.status, out["error"]) == (400, "InvalidRequest"), out
        async with http.post(f"{gw.url}/session", data=b'{"agent_id": "x"}',
                             headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415, await r.text()
