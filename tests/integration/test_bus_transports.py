"""How the SDK reaches a bus: gRPC, the bus's stream listener, or ``auto`` (gRPC to ask, then
the stream). Every test runs a real bus (``UpHost``) on free loopback ports."""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
import pytest

import oribus
from oribus.errors import InvalidRequest, Unavailable
from oribus.hosts.up import UpHost
from oribus.rpc import bus_codec, wire
from oribus.rpc.bus_client import RemoteBus
from oribus.rpc.mux_server import GrpcListener, mux_handlers


@pytest.fixture
async def host(tmp_path):
    h = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=2)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_auto_asks_over_grpc_then_calls_over_the_stream(host):
    server = host.server
    async with oribus.connect(host.address, agent="a") as bus:
        await bus.put("t/a", 1)
        assert (await bus.get("t/a")).value == 1
        assert bus._bus.using == "stream"  # noqa: SLF001
    assert server.grpc_counters["calls"] == 1  # the endpoints question, nothing else
    assert server.stream_counters["calls"] >= 2


async def test_grpc_stays_on_grpc(host):
    async with oribus.connect(host.address, agent="a", transport="grpc") as bus:
        await bus.put("t/g", 1)
        async with bus.watch("t/g", from_version=0) as changes:
            assert (await asyncio.wait_for(changes.__anext__(), 5)).value == 1
        assert bus._bus.using == "grpc"  # noqa: SLF001
    assert host.server.stream_counters["connections"] == 0
    assert host.server.grpc_counters["calls"] >= 1


async def test_stream_dials_the_stream_address_without_grpc(host):
    async with oribus.connect(host.server.stream_address, agent="a", transport="stream") as bus:
        await bus.put("t/s", 1)
        async with bus.watch("t/s", from_version=0) as changes:
            assert (await asyncio.wait_for(changes.__anext__(), 5)).value == 1
    assert host.server.grpc_counters["calls"] == 0


async def test_a_watch_opened_before_any_call_waits_for_the_transport(host):
    async with oribus.connect(host.address, agent="w") as watcher, oribus.connect(host.address, agent="p") as p:
        async with watcher.watch("t/w/") as changes:  # the first thing this client does
            await p.put("t/w/1", "x")
            change = await asyncio.wait_for(changes.__anext__(), 5)
        assert (change.key, change.value) == ("t/w/1", "x")
        assert watcher._bus.using == "stream"  # noqa: SLF001


async def test_a_bus_without_a_stream_listener_keeps_calls_on_grpc(tmp_path):
    h = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1, stream_listen="off")
    await h.start()
    try:
        assert h.server.stream_address == ""
        async with oribus.connect(h.address, agent="a") as bus:
            await bus.put("t/off", 1)
            assert bus._bus.using == "grpc"  # noqa: SLF001
    finally:
        await h.stop()


async def test_an_unreachable_stream_listener_leaves_calls_on_grpc_and_says_why(host, caplog):
    host.server.advertise_stream = f"127.0.0.1:{closed_port()}"  # a NAT that lets only gRPC through
    with caplog.at_level(logging.WARNING, logger="oribus.rpc.bus_client"):
        async with oribus.connect(host.address, agent="a") as bus:
            await bus.put("t/nat", 1)
            assert (await bus.get("t/nat")).value == 1
            assert bus._bus.using == "grpc"  # noqa: SLF001
    [warning] = [r.getMessage() for r in caplog.records]
    assert host.server.advertise_stream in warning and "refused" in warning and "stay on gRPC" in warning


async def test_a_bus_that_does_not_answer_endpoints_keeps_calls_on_grpc(host):
    """A bus from before the stream transport: its gRPC service has no ``endpoints``."""
    ops = wire.bind_ops(host.server.bus, bus_codec.BUS_OPS)
    old = GrpcListener("127.0.0.1:0", wire.BUS_SERVICE, mux_handlers(wire.BUS_SERVICE, ops))
    await old.start()
    try:
        async with oribus.connect(old.address, agent="a") as bus:
            await bus.put("t/old", 1)
            assert bus._bus.using == "grpc"  # noqa: SLF001
    finally:
        await old.stop(0)


async def test_a_restarted_bus_is_found_on_its_new_stream_port(tmp_path):
    first = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1)
    await first.start()
    address, old_stream = first.address, first.server.stream_address
    bus = oribus.connect(address, agent="a")
    second = None
    try:
        await bus.put("t/r", 1)
        assert bus._bus.stream.target == old_stream  # noqa: SLF001
        await first.stop()
        second = UpHost(tmp_path / "data", listen=address, shards=1)
        await second.start()
        assert second.server.stream_address != old_stream
        with pytest.raises(Unavailable):  # the old stream is gone: this call cannot know the outcome
            await bus.get("t/r")
        assert (await bus.get("t/r")).value == 1  # asked the bus again: its new stream port
        assert bus._bus.using == "stream"  # noqa: SLF001
        assert bus._bus.stream.target == second.server.stream_address  # noqa: SLF001
    finally:
        await bus.close()
        if second is not None:
            await second.stop()


async def test_bad_transport_choices_are_refused():
    with pytest.raises(InvalidRequest, match="one of auto, grpc, stream"):
        RemoteBus("127.0.0.1:1", transport="udp")
    import grpc

    with pytest.raises(InvalidRequest, match="tls= instead"):
        RemoteBus("127.0.0.1:1", transport="stream", credentials=grpc.local_channel_credentials())


@pytest.mark.parametrize("transport", ["grpc", "stream"])
async def test_register_and_scan_over_each_transport(host, transport):
    """``register`` (a read recording only keys not delivered yet) and ``scan`` cross the
    wire: an earlier, older delivery stands, and the commit is checked against it."""
    target = host.address if transport == "grpc" else host.server.stream_address
    async with oribus.connect(target, agent="a", transport=transport) as bus:
        await bus.commit({"r/x": 1, "r/y": 2, "other": 3})
        assert [(i.key, i.value, i.version) for i in await bus.scan("r/")] == [("r/x", 1, 1), ("r/y", 2, 1)]
        assert [i.key for i in await bus.scan("r/", after="r/x", limit=1)] == ["r/y"]
        agent = bus.session("agent", "s")
        await agent.get("r/x")
        await bus.put("r/x", 10)
        got = await agent.register(["r/x", "r/y", "r/missing"])
        assert got.skipped == ["r/x"] and list(got.recorded) == ["r/y"] and got.missing == ["r/missing"]
        with pytest.raises(oribus.Conflict) as e:
            await agent.commit({"other": 4})
        assert [(s.key, s.version) for s in e.value.stale] == [("r/x", 1)]


async def test_an_idle_grpc_connection_outlives_the_client_s_keepalive_pings(tmp_path, monkeypatch):
    # The client pings a connection that carries nothing every second here (every KEEPALIVE_MS
    # in production): the server must take those pings. gRPC's default takes the third as
    # abuse and ends the connection (GOAWAY "too many pings", logged at ERROR in the client):
    # the channel the SDK keeps after switching to the stream fell to IDLE after about 3 s.
    monkeypatch.setattr(wire, "CHANNEL_OPTIONS", wire.channel_options(1000))
    monkeypatch.setattr(wire, "SERVER_OPTIONS", wire.server_options(1000))
    h = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1)
    await h.start()
    try:
        async with oribus.connect(h.address, agent="a") as bus:
            await bus.put("t/idle", 1)  # asks the endpoints over gRPC, then calls over the stream
            assert bus._bus.using == "stream"  # noqa: SLF001
            channel = bus._bus.mux.channel  # noqa: SLF001 - the gRPC connection, idle from here on
            states = []
            for _ in range(12):
                await asyncio.sleep(0.5)
                states.append(channel.get_state(try_to_connect=False))
            assert set(states) == {grpc.ChannelConnectivity.READY}, states
    finally:
        await h.stop()
