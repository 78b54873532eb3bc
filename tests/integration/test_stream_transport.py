"""The stream transport (``oribus.rpc.stream_client`` / ``stream_server``) in one process, on port 0:
calls and errors, batching, timeouts, limits, what a bad or vanishing peer does, reconnects,
watches, and mutual TLS."""

from __future__ import annotations

import asyncio
import gc
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oribus.certs import init_certs
from oribus.errors import (
    Conflict,
    HistoryTruncated,
    InvalidRequest,
    OribusError,
    Unavailable,
    WatchLagged,
)
from oribus.messages import Change, WatchRequest
from oribus.rpc import frames, wire
from oribus.rpc.stream_client import StreamClient, split_address
from oribus.rpc.stream_server import StreamListener
from oribus.tls import TlsConfig, client_ssl_context, server_ssl_context

SERVICE = "oribus.v1.Test"
pytestmark = pytest.mark.timeout(60)


class Ops:
    """The operations the test server offers, and what it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.finished = 0

    def table(self) -> dict:
        async def echo(args):
            return args

        async def conflict(args):
            raise Conflict("refused", stale=[])

        async def bug(args):
            raise ZeroDivisionError("a bug")

        async def wait(args):
            self.started += 1
            await self.release.wait()
            self.finished += 1
            return "released"

        async def sleep(args):
            await asyncio.sleep(args)
            return "slept"

        async def turns(args):  # answers after ``args`` turns of the event loop
            for _ in range(args):
                await asyncio.sleep(0)
            return args

        async def big(args):
            return b"x" * args

        async def unencodable(args):
            return object()

        return {"echo": echo, "conflict": conflict, "bug": bug, "wait": wait, "sleep": sleep, "big": big,
                "unencodable": unencodable, "turns": turns}


def change(key: str, version: int) -> Change:
    return Change(key, version, b"\x01", False, "agent", "session", f"c{version}", 1.0)


async def watch_handler(req: WatchRequest) -> AsyncIterator[Change]:
    """A watch of ``from_version`` changes of ``prefix`` then, by the prefix: an end, an error, or
    nothing more (live)."""
    if req.prefix == "lost/":
        raise HistoryTruncated("versions no longer kept", keys=["lost/a"])

    async def changes() -> AsyncIterator[Change]:
        for v in range(1, (req.from_version or 0) + 1):
            yield change(req.prefix + "k", v)
        if req.prefix == "lag/":
            raise WatchLagged("behind")
        if req.prefix == "live/":
            await asyncio.Event().wait()

    return changes()


@pytest.fixture
async def server():
    ops = Ops()
    listener = StreamListener("127.0.0.1:0", SERVICE, ops.table(), watch=watch_handler)
    await listener.start()
    listener.test_ops = ops  # type: ignore[attr-defined]
    yield listener
    await listener.stop(0)


@pytest.fixture
async def client(server):
    c = StreamClient(server.address, SERVICE, timeout=5.0)
    yield c
    await c.close()


async def raw_connection(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = split_address(address)
    return await asyncio.open_connection(host, port)


async def read_frames(reader: asyncio.StreamReader) -> list:
    """Every frame until the server closes the connection."""
    data = await asyncio.wait_for(reader.read(), 5)
    fr = frames.FrameReader()
    return [frames.unpack_body(b) for b in fr.feed(data)]


# ---- calls ---------------------------------------------------------------------------------


async def test_calls_and_their_errors(client):
    assert await client.call("echo", {"a": [1, b"\x00"]}) == {"a": [1, b"\x00"]}
    with pytest.raises(Conflict, match="refused"):
        await client.call("conflict", {})
    with pytest.raises(InvalidRequest, match="unknown operation 'nope'"):
        await client.call("nope", {})
    with pytest.raises(OribusError, match="internal error: ZeroDivisionError"):
        await client.call("bug", {})
    assert await client.call("echo", 7) == 7  # the connection is still fine


async def test_calls_of_one_loop_turn_share_frames_of_frame_items_each_way(client, server):
    """Calls made in one turn leave in frames of ``wire.FRAME_ITEMS`` as they are made, and the
    server's replies to them too (so the other process starts on the first ones while this
    one makes the rest): 200 calls in one turn are 25 frames each way, the last ones
    partial only when 200 is not a multiple."""
    await client.call("echo", 0)  # connected
    before_out, before_in = client.counters["messages_out"], server.counters["messages_out"]
    got = await asyncio.gather(*(client.call("echo", i) for i in range(200)))
    assert got == list(range(200))
    frames_each_way = -(-200 // wire.FRAME_ITEMS)
    assert wire.FRAME_ITEMS == 8 and frames_each_way == 25
    assert client.counters["messages_out"] - before_out == frames_each_way
    assert server.counters["messages_out"] - before_in == frames_each_way  # the echoes finish in one turn too
    assert server.counters["calls"] == 201


async def test_large_replies_leave_once_a_frame_holds_frame_bytes(client, server):
    """Replies of 100 KB: the server's frame leaves once it holds ``wire.FRAME_BYTES`` (the third
    reply), not when it holds ``FRAME_ITEMS`` of them or at the end of the turn; the rest leave
    at the end of the turn."""
    await client.call("echo", 0)  # connected
    replied = server.counters["messages_out"]
    big = [bytes([i]) * 100_000 for i in range(5)]
    assert wire.FRAME_BYTES == 256 << 10 and 5 < wire.FRAME_ITEMS
    assert await asyncio.gather(*(client.call("echo", b) for b in big)) == big
    assert server.counters["messages_out"] - replied == 2


async def test_calls_below_frame_items_of_one_loop_turn_share_one_frame_each_way(client, server):
    await client.call("echo", 0)  # connected
    before_out, before_in = client.counters["messages_out"], server.counters["messages_out"]
    n = wire.FRAME_ITEMS - 1
    assert await asyncio.gather(*(client.call("echo", i) for i in range(n))) == list(range(n))
    assert client.counters["messages_out"] - before_out == 1
    assert server.counters["messages_out"] - before_in == 1


async def calls_one_turn_apart(client, n: int) -> list:
    """``n`` echo calls, each started one loop turn after the previous one."""
    calls = []
    for i in range(n):
        calls.append(asyncio.ensure_future(client.call("echo", i)))
        await asyncio.sleep(0)
    return await asyncio.gather(*calls)


async def test_an_idle_connection_sends_on_the_next_loop_turn(client):
    await client.call("echo", 0)
    sent = client.counters["messages_out"]
    assert await calls_one_turn_apart(client, 3) == [0, 1, 2]
    assert client.counters["messages_out"] - sent == 3  # one sequential caller never waits


async def test_a_busy_connection_holds_its_frame_so_later_calls_join_it(client, server):
    """Batching that survives two-phase traffic: with many calls in flight, calls made over the
    next few loop turns leave in one frame."""
    ops = server.test_ops
    waiting = [asyncio.ensure_future(client.call("wait", None)) for _ in range(wire.BUSY_CALLS + 1)]
    while ops.started < len(waiting):
        await asyncio.sleep(0.01)
    assert wire.HOLD_TURNS >= 2
    sent = client.counters["messages_out"]
    assert await calls_one_turn_apart(client, 3) == [0, 1, 2]
    assert client.counters["messages_out"] - sent == 1
    # ... and the server, with those calls still running, holds replies ready a turn apart
    # (calls that each wait: one that never waits is answered in the turn its frame arrived)
    replied = server.counters["messages_out"]
    assert await asyncio.gather(*(client.call("turns", n) for n in range(1, 4))) == [1, 2, 3]
    assert server.counters["messages_out"] - replied == 1
    ops.release.set()
    assert await asyncio.gather(*waiting) == ["released"] * len(waiting)


async def test_a_call_times_out_alone_and_the_connection_stays(server):
    c = StreamClient(server.address, SERVICE, timeout=0.2)
    try:
        slow = asyncio.ensure_future(c.call("sleep", 1.0))
        assert await c.call("echo", 1) == 1
        with pytest.raises(Unavailable, match="sleep on .* timed out; its outcome is unknown"):
            await slow
        assert await c.call("sleep", 0.01, timeout=2.0) == "slept"
        assert c.counters["reconnects"] == 1
    finally:
        await c.close()


async def test_an_oversized_call_fails_alone(server):
    server.max_frame_bytes = 1000  # both ends at the same limit
    c = StreamClient(server.address, SERVICE, max_frame_bytes=1000)
    try:
        small = [asyncio.ensure_future(c.call("echo", i)) for i in range(3)]
        with pytest.raises(InvalidRequest, match="over the frame limit of 1000 bytes"):
            await c.call("echo", b"x" * 2000)
        assert await asyncio.gather(*small) == [0, 1, 2]
        # many calls (and replies) together over the limit go in several frames
        sent, replied = c.counters["messages_out"], server.counters["messages_out"]
        assert await asyncio.gather(*(c.call("echo", b"y" * 300) for i in range(10))) == [b"y" * 300] * 10
        assert c.counters["messages_out"] - sent >= 4 and server.counters["messages_out"] - replied >= 4
    finally:
        await c.close()


async def test_arguments_that_cannot_be_encoded_fail_alone(client):
    others = asyncio.ensure_future(client.call("echo", "fine"))
    with pytest.raises(InvalidRequest, match="cannot be encoded"):
        await client.call("echo", object())
    assert await others == "fine"


async def test_an_oversized_or_unencodable_reply_becomes_an_error(client, server):
    server.max_frame_bytes = 10_000
    with pytest.raises(InvalidRequest, match="reply of .* bytes is over the frame limit"):
        await client.call("big", 20_000)
    with pytest.raises(OribusError, match="cannot be encoded"):
        await client.call("unencodable", None)
    assert await client.call("big", 100) == b"x" * 100


# ---- a bad peer: the server closes that connection only --------------------------------------


@pytest.mark.parametrize("garbage", [
    frames.frame(b"\xc1\xc1"),  # not msgpack
    frames.LENGTH.pack(frames.MAX_FRAME_BYTES + 1),  # oversized
    frames.pack_frame([[1, "echo", {}]]),  # calls before any hello
    frames.pack_frame(["oribus-stream", 1, "oribus.v1.Other", "calls"]),  # another service
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # another protocol
])
async def test_a_bad_first_frame_closes_that_connection_only(server, client, garbage):
    assert await client.call("echo", 1) == 1
    reader, writer = await raw_connection(server.address)
    writer.write(garbage)
    (error,) = await read_frames(reader)  # the error, then the close
    assert error["code"] == "InvalidRequest"
    writer.close()
    assert await client.call("echo", 2) == 2  # the server and every other connection go on
    assert server.counters["refused"] == 1


@pytest.mark.parametrize("garbage", [
    frames.frame(b"\xc1"),
    frames.pack_frame({"not": "a batch"}),
    frames.pack_frame([[1, "echo"]]),  # a call is [call_id, op, args]
    frames.LENGTH.pack(1 << 30),
])
async def test_a_bad_frame_after_the_hello_closes_that_connection_only(server, client, garbage):
    reader, writer = await raw_connection(server.address)
    writer.write(frames.pack_frame(frames.hello(SERVICE, frames.CALLS)) + frames.pack_frame([[1, "echo", "ok"]]))
    await writer.drain()
    writer.write(garbage)
    got = await read_frames(reader)
    assert got[0] == [] and got[-1]["code"] == "InvalidRequest", got
    assert await client.call("echo", 3) == 3


async def test_a_peer_that_closes_mid_frame(server, client):
    reader, writer = await raw_connection(server.address)
    writer.write(frames.pack_frame(frames.hello(SERVICE, frames.CALLS)))
    half = frames.pack_frame([[1, "wait", None]])
    writer.write(half[: len(half) // 2])
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.05)
    assert server.test_ops.started == 0  # half a call is no call
    assert await client.call("echo", 4) == 4
    assert not [c for c in server.connections if c.kind is None]  # the half-open one is gone


async def test_a_client_that_half_closes_still_gets_its_replies(server):
    reader, writer = await raw_connection(server.address)
    writer.write(frames.pack_frame(frames.hello(SERVICE, frames.CALLS))
                 + frames.pack_frame([[1, "sleep", 0.05], [2, "echo", "x"]]))
    writer.write_eof()  # nothing more to send
    got = await read_frames(reader)  # the replies, then the server closes
    assert got[0] == [] and sorted(r for batch in got[1:] for r in batch) == [[1, 0, "slept"], [2, 0, "x"]]
    writer.close()


async def test_calls_whose_connection_is_lost_run_to_their_end(server, client):
    """A lost reply, not a handler cut short: the call completes on the server."""
    ops = server.test_ops
    call = asyncio.ensure_future(client.call("wait", None))
    while ops.started == 0:
        await asyncio.sleep(0.01)
    client._conn.transport.abort()  # the connection breaks under the call
    with pytest.raises(Unavailable):
        await call
    ops.release.set()
    for _ in range(100):
        if ops.finished:
            break
        await asyncio.sleep(0.01)
    assert ops.finished == 1


# ---- a server that goes away ------------------------------------------------------------------


async def fake_server(behaviour) -> tuple[asyncio.AbstractServer, str]:
    """A server that answers the hello, then does ``behaviour(reader, writer)``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4 + frames.LENGTH.unpack(await reader.readexactly(4))[0] - 4)
        writer.write(frames.pack_frame([]))
        await behaviour(reader, writer)

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"


async def test_a_server_that_closes_mid_frame_fails_the_calls_in_flight():
    async def half_a_reply(reader, writer):
        await reader.read(4)  # the first call has arrived
        reply = frames.pack_frame([[1, 0, "never whole"]])
        writer.write(reply[:-3])
        await writer.drain()
        writer.close()

    srv, address = await fake_server(half_a_reply)
    c = StreamClient(address, SERVICE, timeout=5)
    try:
        with pytest.raises(Unavailable, match="closed the connection"):
            await asyncio.gather(c.call("a", 1), c.call("b", 2))
    finally:
        await c.close()
        srv.close()


async def test_a_server_that_sends_garbage_fails_the_calls_in_flight():
    async def garbage(reader, writer):
        await reader.read(4)
        writer.write(frames.frame(b"\xc1"))
        await writer.drain()
        await asyncio.sleep(5)

    srv, address = await fake_server(garbage)
    c = StreamClient(address, SERVICE, timeout=5)
    try:
        with pytest.raises(Unavailable, match="cannot read"):
            await c.call("a", 1)
    finally:
        await c.close()
        srv.close()


async def test_restart_fails_calls_in_flight_then_the_next_call_reconnects(server):
    ops = server.test_ops
    c = StreamClient(server.address, SERVICE, timeout=5)
    try:
        in_flight = [asyncio.ensure_future(c.call("wait", None)) for _ in range(3)]
        while ops.started < 3:
            await asyncio.sleep(0.01)
        address = server.address
        await server.stop(grace=0.05)  # calls still running after the grace are cut off
        for call in in_flight:
            with pytest.raises(Unavailable):
                await call
        with pytest.raises(Unavailable, match="refused"):
            await c.call("echo", 1)  # nobody listens
        again = StreamListener(address, SERVICE, Ops().table())
        await again.start()
        try:
            assert await c.call("echo", 5) == 5
            assert c.counters["reconnects"] == 2
        finally:
            await again.stop(0)
    finally:
        await c.close()


async def test_a_stopping_server_refuses_new_calls_and_finishes_those_in_flight(server, client):
    ops = server.test_ops
    call = asyncio.ensure_future(client.call("wait", None))
    while ops.started == 0:
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(server.stop(grace=5))
    await asyncio.sleep(0.05)
    with pytest.raises(Unavailable, match="stopping"):
        await client.call("echo", 1)
    ops.release.set()
    assert await call == "released"
    await stopping


async def test_concurrent_callers_share_one_connection_attempt(server):
    c = StreamClient(server.address, SERVICE)
    try:
        await asyncio.gather(*(c.call("echo", i) for i in range(50)))
        assert c.counters["reconnects"] == 1 and server.counters["connections"] == 1
    finally:
        await c.close()
    with pytest.raises(Unavailable, match="closed"):
        await c.call("echo", 1)


async def test_an_attempt_whose_callers_gave_up_fails_quietly():
    """Every caller waiting for a connection gives up before the attempt fails: the attempt's
    error is still taken, so asyncio never logs "Task exception was never retrieved"."""
    async def silent(reader, writer):  # accepts, never answers the hello
        await asyncio.sleep(5)

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    c = StreamClient(address, SERVICE, timeout=5, connect_timeout=0.2)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.call("echo", 1), 0.05)
        await asyncio.sleep(0.4)  # the attempt times out with nobody waiting
        gc.collect()  # the report comes when the finished task is collected
        await asyncio.sleep(0)
        assert not unretrieved, [str(u.get("exception")) for u in unretrieved]
        with pytest.raises(Unavailable, match="timed out"):
            await c.call("echo", 1)  # the next call makes a fresh attempt
    finally:
        loop.set_exception_handler(previous)
        await c.close()
        srv.close()


# ---- watches ---------------------------------------------------------------------------------


async def test_a_watch_delivers_its_changes_then_ends(client):
    got = [(ch.key, ch.version) async for ch in client.watch(WatchRequest("end/", 3))]
    assert got == [("end/k", 1), ("end/k", 2), ("end/k", 3)]


async def test_a_watch_failure_keeps_its_class(client):
    with pytest.raises(HistoryTruncated):  # refused before it is subscribed
        await client.watch(WatchRequest("lost/", 1)).subscribed()
    lagging = client.watch(WatchRequest("lag/", 2))
    assert [ch.version async for ch in _take(lagging, 2)] == [1, 2]
    with pytest.raises(WatchLagged):  # after the changes sent before it
        await lagging.__anext__()


async def test_a_watch_whose_server_stops_raises_unavailable(server, client):
    w = client.watch(WatchRequest("live/", 1))
    await w.subscribed()
    assert (await w.__anext__()).version == 1
    await server.stop(0)
    with pytest.raises(Unavailable):
        await w.__anext__()


async def test_a_watch_on_a_server_without_watches_is_refused():
    listener = StreamListener("127.0.0.1:0", SERVICE, {})
    await listener.start()
    c = StreamClient(listener.address, SERVICE)
    try:
        with pytest.raises(InvalidRequest, match="watch is not served here"):
            await c.watch(WatchRequest("a/")).subscribed()
    finally:
        await c.close()
        await listener.stop(0)


async def _take(stream, n):
    for _ in range(n):
        yield await stream.__anext__()


# ---- mutual TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    init_certs(d)
    return d


@pytest.fixture
async def tls_server(certs):
    listener = StreamListener("127.0.0.1:0", SERVICE, Ops().table(), ssl=server_ssl_context(TlsConfig.from_dir(certs)))
    await listener.start()
    yield listener
    await listener.stop(0)


async def test_mutual_tls(tls_server, certs):
    c = StreamClient(tls_server.address, SERVICE, ssl=client_ssl_context(TlsConfig.from_dir(certs)))
    try:
        assert await c.call("echo", "secret") == "secret"
    finally:
        await c.close()


async def test_a_client_without_a_certificate_is_refused(tls_server, certs):
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(certs / "ca.crt")  # trusts the server, presents nothing
    c = StreamClient(tls_server.address, SERVICE, ssl=no_cert)
    try:
        with pytest.raises(Unavailable, match="did not accept this client's certificate"):
            await c.call("echo", 1)
    finally:
        await c.close()
    assert tls_server.counters["calls"] == 0


async def test_a_certificate_from_another_ca_is_refused_both_ways(tls_server, tmp_path):
    init_certs(tmp_path / "other")
    c = StreamClient(tls_server.address, SERVICE, ssl=client_ssl_context(TlsConfig.from_dir(tmp_path / "other")))
    try:
        with pytest.raises(Unavailable, match="not signed by our CA"):
            await c.call("echo", 1)
    finally:
        await c.close()


async def test_plaintext_and_tls_mismatches_are_named(tls_server, server, certs):
    plain = StreamClient(tls_server.address, SERVICE, timeout=5)
    secure = StreamClient(server.address, SERVICE, ssl=client_ssl_context(TlsConfig.from_dir(certs)), timeout=5)
    try:
        with pytest.raises(Unavailable, match="requires TLS"):
            await plain.call("echo", 1)
        with pytest.raises(Unavailable, match="TLS"):
            await secure.call("echo", 1)
    finally:
        await plain.close()
        await secure.close()


async def test_the_server_name_is_checked(tls_server, certs):
    cfg = TlsConfig.from_dir(certs, ssl_target_name_override="someone-else.example")
    c = StreamClient(tls_server.address, SERVICE, ssl=client_ssl_context(cfg),
                     server_hostname=cfg.ssl_target_name_override)
    try:
        with pytest.raises(Unavailable, match="does not name someone-else.example"):
            await c.call("echo", 1)
    finally:
        await c.close()


# ---- Unix-domain sockets -----------------------------------------------------------------------


@pytest.fixture
def socket_path(tmp_path_factory):
    # short: a Unix socket's path is limited to ~107 bytes, pytest's temporary paths are long
    d = Path(tempfile.mkdtemp(prefix="oribus-test-"))
    yield d / "s.sock"
    shutil.rmtree(d, ignore_errors=True)


async def test_calls_and_a_watch_over_a_unix_socket(socket_path):
    listener = StreamListener(f"unix:{socket_path}", SERVICE, Ops().table(), watch=watch_handler)
    await listener.start()
    try:
        assert listener.address == f"unix:{socket_path}"
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600  # this user's processes only
        c = StreamClient(listener.address, SERVICE, timeout=5.0)
        try:
            assert await asyncio.gather(*(c.call("echo", i) for i in range(50))) == list(range(50))
            watch = c.watch(WatchRequest("w/", from_version=2))
            await watch.subscribed()
            assert [(ch.key, ch.version) async for ch in watch] == [("w/k", 1), ("w/k", 2)]
        finally:
            await c.close()
    finally:
        await listener.stop(0)
    assert not socket_path.exists()  # removed when the listener stops


async def test_a_stale_socket_file_is_replaced_and_a_live_one_refused(socket_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path))  # a listener that crashed leaves its file behind
    stale.close()
    first = StreamListener(f"unix:{socket_path}", SERVICE, Ops().table())
    await first.start()
    try:
        second = StreamListener(f"unix:{socket_path}", SERVICE, Ops().table())
        with pytest.raises(OSError, match="another process listens on"):
            await second.start()
        c = StreamClient(first.address, SERVICE, timeout=5.0)
        try:
            assert await c.call("echo", "still the first") == "still the first"
        finally:
            await c.close()
    finally:
        await first.stop(0)
    socket_path.write_text("not a socket")
    with pytest.raises(OSError, match="exists and is not a socket"):
        await StreamListener(f"unix:{socket_path}", SERVICE, Ops().table()).start()


async def test_mutual_tls_over_a_unix_socket(socket_path, certs):
    cfg = TlsConfig.from_dir(certs)
    listener = StreamListener(f"unix:{socket_path}", SERVICE, Ops().table(), ssl=server_ssl_context(cfg))
    await listener.start()
    try:
        c = StreamClient(listener.address, SERVICE, ssl=client_ssl_context(cfg), timeout=5.0)
        try:
            assert await c.call("echo", "over TLS") == "over TLS"
        finally:
            await c.close()
        plain = StreamClient(listener.address, SERVICE, timeout=5.0)
        try:
            with pytest.raises(Unavailable):
                await plain.call("echo", "no TLS")
        finally:
            await plain.close()
    finally:
        await listener.stop(0)


async def test_nothing_listening_on_a_unix_socket_is_unavailable(socket_path):
    c = StreamClient(f"unix:{socket_path}", SERVICE, timeout=2.0)
    try:
        with pytest.raises(Unavailable):
            await c.call("echo", 1)
    finally:
        await c.close()
    with pytest.raises(InvalidRequest, match="unix:PATH"):
        StreamClient("unix:", SERVICE)
