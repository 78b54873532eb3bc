"""The HTTP gateway's connections over real sockets: slow clients are closed after the
header, body and idle timeouts, the connection cap refuses a flood with one log line
and still serves a normal client once the slow ones are gone, and a gRPC client dialling
the HTTP port gets one warning, not a traceback (specs/http.md, "Connections")."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import grpc
import pytest

from oribus.gateway import GatewayConfig, HttpGateway

SHORT = {"header_timeout": 0.6, "body_timeout": 0.6, "idle_timeout": 1.5}


async def connect(gw: HttpGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, float]:
    """Everything the server sent before it closed the connection, and when it closed it."""
    t0 = time.monotonic()
    got = await asyncio.wait_for(reader.read(), seconds)
    return got, time.monotonic() - t0


async def commit_ok(gw: HttpGateway, key: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"{gw.url}/v1/commit", json={"agent": "normal", "writes": {key: 1}}) as r:
        assert r.status == 200, await r.text()


def partial_header(host: str) -> bytes:
    return f"POST /v1/commit HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n".encode()


async def test_partial_headers_are_closed_after_the_header_timeout(start_gateway):
    gw = await start_gateway(**SHORT)
    conns = [await connect(gw) for _ in range(20)]
    for _, w in conns:
        w.write(partial_header(gw.address))
        await w.drain()
    # keep trickling a byte now and then: a slowloris client, not an idle one
    await asyncio.sleep(0.3)
    for _, w in conns:
        w.write(b"X")
    results = await asyncio.gather(*(closed_within(r, 5) for r, _ in conns))
    assert all(elapsed < 2.0 for _, elapsed in results), results
    for _, w in conns:
        w.close()
    await commit_ok(gw, "after/slowloris")


async def test_900_unfinished_requests_are_all_closed_and_the_server_serves_again(start_gateway, caplog):
    """The reported flood: 900 connections with unfinished headers or bodies, against the
    default connection cap (512): the excess is refused at once, the rest closed after the
    header or body timeout, with one log line for the cap; then a normal client is served."""
    caplog.set_level(logging.INFO, logger="oribus.http")
    # timeouts longer than the flood takes to open, even on a loaded machine (measured: 3.8 s
    # with the whole suite and other work on two cores): a connection admitted and timed out
    # before the flood ends would free a slot for a later one
    timeout = 5.0
    gw = await start_gateway(header_timeout=timeout, body_timeout=timeout, idle_timeout=5.0)
    cap = GatewayConfig.max_connections
    body = b'{"agent": "slow", "writes": {"slow/flood": 1}}'
    conns = []
    flood_started = time.monotonic()
    for i in range(900):
        r, w = await connect(gw)
        if i % 2:
            w.write(partial_header(gw.address))
        else:
            w.write(f"POST /v1/commit HTTP/1.1\r\nHost: {gw.address}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        conns.append((r, w))
    t0 = time.monotonic()
    assert t0 - flood_started < timeout, "the flood took longer to open than the timeouts: nothing to judge"
    results = await asyncio.gather(*(closed_within(r, 2 * timeout + 6) for r, _ in conns))
    elapsed = time.monotonic() - t0
    refused = [got for got, _ in results if got.startswith(b"HTTP/1.1 503 ")]
    timed_out_bodies = [got for got, _ in results if got.startswith(b"HTTP/1.1 408 ")]
    assert len(refused) == 900 - cap, len(refused)
    assert len(timed_out_bodies) == cap // 2, len(timed_out_bodies)  # every admitted unfinished body
    # closed by the timeouts: an unfinished body gets its 408 after body_timeout, then aiohttp's
    # lingering close drains it for at most as long again (specs/http.md), long before the wait ends
    assert elapsed < 2 * timeout + 3.0, elapsed
    assert [rec.getMessage() for rec in caplog.records if "cap reached" in rec.getMessage()] == [
        f"HTTP connection cap reached: {cap} connections open; new connections get 503 and are closed "
        "until some close (max_connections)"]
    assert gw.connections.open == 0
    for _, w in conns:
        w.close()
    await commit_ok(gw, "after/flood-900")
    assert (await gw.bus.read(("check", "check"), ["slow/flood"], record=False)).items[0].version == 0


async def test_idle_connection_is_closed_after_the_idle_timeout(start_gateway):
    gw = await start_gateway(**SHORT)
    r, w = await connect(gw)
    got, elapsed = await closed_within(r, 5)
    assert got == b"" and 1.0 < elapsed < 3.0, (got, elapsed)
    w.close()


async def test_unfinished_body_gets_408_and_is_closed(start_gateway):
    gw = await start_gateway(**SHORT)
    body = json.dumps({"agent": "slow", "writes": {"slow/body": "x" * 50}}).encode()
    r, w = await connect(gw)
    w.write(f"POST /v1/commit HTTP/1.1\r\nHost: {gw.address}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:20])
    await w.drain()
    got, elapsed = await closed_within(r, 5)
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert b'"RequestTimeout"' in got and elapsed < 3.0, (got, elapsed)
    w.close()
    assert (await gw.bus.read(("check", "check"), ["slow/body"], record=False)).items[0].version == 0


async def test_connection_cap_refuses_a_flood_with_one_log_line_then_serves_again(start_gateway, caplog):
    caplog.set_level(logging.INFO, logger="oribus.http")
    gw = await start_gateway(max_connections=10, header_timeout=1.5, body_timeout=1.0, idle_timeout=5.0)
    slow = [await connect(gw) for _ in range(10)]
    for _, w in slow:
        w.write(partial_header(gw.address))
        await w.drain()
    await asyncio.sleep(0.1)
    assert gw.connections.open == 10
    refused = [await connect(gw) for _ in range(30)]
    for r, _ in refused:
        got, _ = await closed_within(r, 2)
        assert got.startswith(b"HTTP/1.1 503 "), got
    cap_lines = [rec for rec in caplog.records if "cap reached" in rec.getMessage()]
    assert len(cap_lines) == 1 and cap_lines[0].levelno == logging.WARNING, cap_lines
    # the slow ones are dropped by the header timeout; then a normal client is served
    await asyncio.gather(*(closed_within(r, 5) for r, _ in slow))
    await commit_ok(gw, "after/flood")
    back = [rec.getMessage() for rec in caplog.records if "back under the cap" in rec.getMessage()]
    assert back == ["HTTP connections back under the cap: 9 open; 30 refused while it was reached"], back
    for _, w in slow + refused:
        w.close()


def _no_errors(caplog) -> None:
    bad = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == [], bad


async def test_http2_preface_logs_one_warning_and_no_traceback(start_gateway, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway()
    r, w = await connect(gw)
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame, as clients send
    w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings)
    got, _ = await closed_within(r, 5)
    w.close()
    _no_errors(caplog)
    assert got.startswith(b"HTTP/1.1 400 ") and b"gRPC port" in got, got
    warnings = [rec.getMessage() for rec in caplog.records if "HTTP/2" in rec.getMessage()]
    assert len(warnings) == 1 and "point gRPC clients at the gRPC port" in warnings[0], warnings
    assert "127.0.0.1:" in warnings[0]
    await commit_ok(gw, "after/preface")


async def test_grpc_client_on_the_http_port_gets_a_clear_error(start_gateway, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await start_gateway()
    async with grpc.aio.insecure_channel(gw.address) as channel:
        call = channel.unary_unary("/oribus.Bus/Stats")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(b"", timeout=3, wait_for_ready=False)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    _no_errors(caplog)
    warnings = [rec for rec in caplog.records if "HTTP/2 (gRPC?) connection preface" in rec.getMessage()]
    assert warnings and all(rec.levelno == logging.WARNING for rec in warnings)
