"""Traces across processes: ``oribus up --processes`` with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set
exports its bus's and its shard processes' spans over OTLP/HTTP to a collector (here one the
test runs), each a child of the span of the call that caused it, down from the SDK's."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from aiohttp import web
from conftest import keys_on_shard
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from processes import up

import oribus
from oribus import tracing


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes
                           if a.key == "service.name")
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, s) for s in scope.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.receive)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def collector():
    c = Collector()
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_bus_and_shard_processes_export_spans_linked_to_the_client(cluster, tmp_path, collector):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = up(tmp_path, tmp_path / "data", processes=True)
    server.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.url
    cluster.add(server).start()
    await asyncio.to_thread(server.wait_serving)
    a, b = keys_on_shard(0, "tr/a")[0], keys_on_shard(1, "tr/b")[0]
    tracing.enable(provider)
    try:
        async with oribus.connect(server.address, agent="tracer") as s:
            await s.commit({a: 1, b: 1})  # two writers: two phases
    finally:
        tracing.disable()
    [client] = [c for c in exporter.get_finished_spans() if c.name == "oribus.commit"]
    await asyncio.to_thread(server.stop)  # SIGTERM: each process exports what it buffered, then ends

    def found() -> dict:
        return {(service, s.name): s for service, s in collector.spans}

    for _ in range(100):
        spans = found()
        if {("oribus-up", "oribus.bus.commit"), ("oribus-shard-0", "oribus.shard.prepare"),
                ("oribus-shard-1", "oribus.shard.prepare")} <= spans.keys():
            break
        await asyncio.sleep(0.1)
    spans = found()
    bus_commit = spans[("oribus-up", "oribus.bus.commit")]
    assert bus_commit.trace_id == client.context.trace_id.to_bytes(16, "big")
    assert bus_commit.parent_span_id == client.context.span_id.to_bytes(8, "big")
    attributes = {a.key: a.value for a in bus_commit.attributes}
    assert attributes["oribus.commit.path"].string_value == "2pc"
    for shard in ("oribus-shard-0", "oribus-shard-1"):
        prepare = spans[(shard, "oribus.shard.prepare")]
        assert prepare.trace_id == bus_commit.trace_id and prepare.parent_span_id == bus_commit.span_id
