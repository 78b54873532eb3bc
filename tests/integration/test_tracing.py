"""Traces of reads and commits (``oribus.tracing``): spans in the SDK, the bus and the shards,
linked across the transports by the trace context each call carries."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import oribus
from oribus import tracing
from oribus.gateway import GatewayConfig
from oribus.hosts.up import UpHost


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict:
    out: dict = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


def parent_of(span) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_an_embedded_commit_is_one_trace_sdk_bus_shard(tmp_path, spans):
    bus = await oribus.open_local(tmp_path / "data", agent="planner")
    try:
        await bus.put("plan", {"steps": 1})
    finally:
        await bus.close()
    got = by_name(spans)
    [client], [server], [shard] = got["oribus.commit"], got["oribus.bus.commit"], got["oribus.shard.commit_one_phase"]
    assert client.context.trace_id == server.context.trace_id == shard.context.trace_id
    assert parent_of(server) == client.context.span_id and parent_of(shard) == server.context.span_id
    assert client.attributes["oribus.agent"] == "planner"
    assert server.attributes["oribus.commit.path"] == "1pc"
    assert server.attributes["oribus.commit_id"] == client.attributes["oribus.commit_id"]


async def test_a_conflict_marks_the_spans_with_the_refusal_and_its_keys(tmp_path, spans):
    bus = await oribus.open_local(tmp_path / "data", agent="a")
    try:
        await bus.put("k", 0)
        stale = bus.session(agent="stale")
        await stale.get("k")
        await bus.put("k", 1)
        spans.clear()
        with pytest.raises(oribus.Conflict):
            await stale.put("k", 2)
    finally:
        await bus.close()
    got = by_name(spans)
    for name in ("oribus.commit", "oribus.bus.commit"):
        [s] = got[name]
        assert s.attributes["oribus.refused"] == "Conflict"
        assert list(s.attributes["oribus.conflict.keys"]) == ["k"]
        assert not s.status.is_ok


@pytest.mark.parametrize("transport", ["stream", "grpc"])
async def test_the_bus_span_is_a_child_of_the_client_span_across_the_transport(tmp_path, spans, transport,
                                                                              monkeypatch):
    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=2)
    await host.start()
    try:
        async with oribus.connect(host.address, agent="a", transport="auto" if transport == "stream" else "grpc") as s:
            await s.put("k/1", 1)
            assert s._bus.using == transport  # noqa: SLF001
            spans.clear()
            tx = s.transaction()
            await tx.get_many(["k/1", "k/2", "k/3", "k/4"])
            tx.put("k/1", 2)
            await tx.commit()
            got = by_name(spans)
            [read], [bus_read] = got["oribus.read"], got["oribus.bus.read"]
            assert parent_of(bus_read) == read.context.span_id
            assert {parent_of(r) for r in got["oribus.shard.read"]} == {bus_read.context.span_id}
            [commit], [bus_commit] = got["oribus.commit"], got["oribus.bus.commit"]
            assert parent_of(bus_commit) == commit.context.span_id
            assert bus_commit.attributes["oribus.commit_id"] == tx.commit_id

            # the link is the context the call carries, not this process's own context
            monkeypatch.setattr(tracing, "inject", lambda args: args)
            spans.clear()
            await s.get("k/1")
            [bus_read] = by_name(spans)["oribus.bus.read"]
            assert bus_read.parent is None
    finally:
        await host.stop()


async def test_an_http_request_s_traceparent_is_the_parent_of_the_bus_span(tmp_path, spans):
    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1, http=GatewayConfig(listen="127.0.0.1:0"))
    await host.start()
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{host.gateway.url}/v1/get", json={"agent": "a", "keys": ["x"]},
                                 headers={"traceparent": f"00-{trace_id}-{span_id}-01"}) as r:
                assert r.status == 200, await r.text()
    finally:
        await host.stop()
    [bus_read] = by_name(spans)["oribus.bus.read"]
    assert f"{bus_read.context.trace_id:032x}" == trace_id
    assert f"{parent_of(bus_read):016x}" == span_id


async def test_off_records_nothing_and_costs_one_shared_object(tmp_path):
    assert not tracing.on()
    assert tracing.span("oribus.anything") is tracing.span("oribus.other")
    with tracing.span("x") as current:
        assert current is None
    assert tracing.inject({"a": 1}) == {"a": 1}
    bus = await oribus.open_local(tmp_path / "data", agent="a")
    try:
        await bus.put("k", 1)  # no provider anywhere: nothing to record, nothing fails
    finally:
        await bus.close()


def test_turning_tracing_on_without_opentelemetry_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'oribus\[otel\]'"):
        tracing.enable()
    assert not tracing.on()


async def test_concurrent_calls_keep_their_own_parents(tmp_path, spans):
    """Many sessions' calls share one connection and run interleaved on the bus: each bus
    span's parent is the client span of its own call."""
    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=2)
    await host.start()
    try:
        async with oribus.connect(host.address, agent="a") as conn:
            await asyncio.gather(*(conn.session(agent=f"agent-{i}").put(f"c/{i}", i) for i in range(20)))
    finally:
        await host.stop()
    got = by_name(spans)
    clients = {c.attributes["oribus.commit_id"]: c.context.span_id for c in got["oribus.commit"]}
    servers = {s.attributes["oribus.commit_id"]: parent_of(s) for s in got["oribus.bus.commit"]}
    assert len(clients) == 20 and servers == clients
