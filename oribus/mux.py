"""Many concurrent calls over one gRPC bidi stream, in batches (both ends).

Python gRPC pays dearly per message (specs/wire.md, "Services and methods":
~4.4k unary RPC/s against ~13k stream messages/s, and far more when each
message carries several calls). So each connection opens ONE bidi stream; every call gets an id; the
writer sends whatever calls are pending as one message, and the other side
answers in batches the same way. Frames are documented in ``oribus.wire``.

``MuxClient``   client end: ``await call(op, args)``; reconnects lazily after a
                failure; every call in flight when the stream breaks fails with
                Unavailable (the caller decides whether a retry is safe).
``mux_handlers`` server end: gRPC generic handlers for Stream, Call and Watch
                of one service, dispatching ops to async functions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc import aio

from oribus import wire
from oribus.errors import InvalidRequest, OribusError, Unavailable
from oribus.protocol import Change, WatchRequest
from oribus.tls import explain_failure

log = logging.getLogger("oribus.mux")

Handler = Callable[[Any], Awaitable[Any]]
# returns the (already subscribed) stream of changes of one watch
WatchHandler = Callable[[WatchRequest], Awaitable[AsyncIterator[Change]]]

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


# ---- client end -------------------------------------------------------------------------


class MuxClient:
    """Calls to one service at ``target`` multiplexed over one stream."""

    def __init__(
        self,
        target: str,
        service: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 30.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.service = service
        self.timeout = timeout
        self._credentials = credentials  # None: plaintext; else TLS (oribus.tls.channel_credentials)
        self._options = [*CHANNEL_OPTIONS, *options]  # e.g. grpc.ssl_target_name_override
        self._channel: aio.Channel | None = None
        self._call: Any = None
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: list[list] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._ids = itertools.count(1)
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self.counters = {"calls": 0, "messages_out": 0, "messages_in": 0, "reconnects": 0}

    def _open_channel(self) -> aio.Channel:
        if self._credentials is not None:
            return aio.secure_channel(self.target, self._credentials, options=self._options)
        return aio.insecure_channel(self.target, options=self._options)

    def _unavailable(self, err: Unavailable) -> Unavailable:
        """A connection failure, naming TLS when it looks like a failed handshake."""
        server_name = dict(self._options).get("grpc.ssl_target_name_override")
        return explain_failure(err, self.target, secure=self._credentials is not None, server_name=server_name)

    @property
    def channel(self) -> aio.Channel:
        if self._channel is None:
            self._channel = self._open_channel()
        return self._channel

    async def _ensure_stream(self) -> None:
        if self._call is not None:
            return
        async with self._connect_lock:
            if self._call is not None:
                return
            if self._closed:
                raise Unavailable(f"connection to {self.target} is closed")
            stream = self.channel.stream_stream(wire.method_path(self.service, wire.STREAM))
            self._call = stream()
            self.counters["reconnects"] += 1
            call = self._call
            self._tasks = [
                asyncio.get_running_loop().create_task(self._writer(call)),
                asyncio.get_running_loop().create_task(self._reader(call)),
            ]

    async def call(self, op: str, args: Any, timeout: float | None = None) -> Any:
        """Send one call and wait for its reply; errors come back as OribusError."""
        await self._ensure_stream()
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        self._outbox.append([call_id, op, args])
        self._wake.set()
        self.counters["calls"] += 1
        try:
            status, payload = await asyncio.wait_for(fut, timeout or self.timeout)
        except TimeoutError:
            raise Unavailable(f"{op} on {self.target} timed out; its outcome is unknown") from None
        finally:
            self._pending.pop(call_id, None)
        if status == wire.OK:
            return payload
        wire.raise_error(payload)

    async def _writer(self, call: Any) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._outbox:
                    continue
                batch, self._outbox = self._outbox, []
                await call.write(wire.pack(batch))
                self.counters["messages_out"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._broken(call, e)

    async def _reader(self, call: Any) -> None:
        try:
            while True:
                raw = await call.read()
                if raw is aio.EOF:
                    raise Unavailable(f"{self.target} closed the stream")
                self.counters["messages_in"] += 1
                for call_id, status, payload in wire.unpack(raw):
                    fut = self._pending.get(call_id)
                    if fut is not None and not fut.done():
                        fut.set_result((status, payload))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._broken(call, e)

    def _broken(self, call: Any, e: BaseException) -> None:
        if self._call is not call:
            return
        self._call = None
        err = wire.error_from_grpc(e) if isinstance(e, grpc.RpcError) else (
            e if isinstance(e, OribusError) else Unavailable(f"connection to {self.target} failed: {e}")
        )
        if not isinstance(err, Unavailable):
            err = Unavailable(f"connection to {self.target} failed: {err.message}")
        err = self._unavailable(err)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._outbox.clear()
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        with contextlib.suppress(Exception):
            call.cancel()

    async def call_op(self, table: dict[str, wire.Op], op: str, *params: Any) -> Any:
        """Call ``op`` of an operation table (wire.BUS_OPS / SHARD_OPS) with Python params."""
        o = table[op]
        return o.dec_result(await self.call(op, o.enc_args(*params)))

    def watch(self, request: WatchRequest) -> RemoteWatch:
        """A watch over the network: an async iterator of Change (see RemoteWatch)."""
        return RemoteWatch(self, request)

    async def close(self) -> None:
        """Fail calls in flight, close the stream and the channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._call is not None:
            self._broken(self._call, Unavailable(f"connection to {self.target} is closed"))
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class RemoteWatch:
    """The client end of a Watch RPC: an async iterator of Change.

    ``subscribed()`` sends the request and waits for the server's first,
    empty, batch: the server sends it only once its watch is registered, so
    every change made visible after ``subscribed()`` returns is delivered.
    """

    def __init__(self, client: MuxClient, request: WatchRequest) -> None:
        self._client = client
        self._request = request
        self._call: Any = None
        self._buffer: collections.deque = collections.deque()

    async def subscribed(self) -> None:
        if self._call is not None:
            return
        method = self._client.channel.unary_stream(wire.method_path(self._client.service, wire.WATCH))
        self._call = method(wire.pack(self._request.to_wire()))
        try:
            self._buffer.extend(await self._read())  # the acknowledgement (normally empty)
        except StopAsyncIteration:
            raise Unavailable(f"the watch on {self._client.target} ended before it was subscribed") from None

    async def _read(self) -> list:
        try:
            raw = await self._call.read()
        except grpc.RpcError as e:
            err = wire.error_from_grpc(e)
            if type(err) is Unavailable:
                err = self._client._unavailable(err)
            raise err from None
        if raw is aio.EOF:
            raise StopAsyncIteration
        return wire.unpack(raw)

    def __aiter__(self) -> RemoteWatch:
        return self

    async def __anext__(self) -> Change:
        await self.subscribed()
        while not self._buffer:
            self._buffer.extend(await self._read())
        return Change.from_wire(self._buffer.popleft())

    async def aclose(self) -> None:
        if self._call is not None:
            self._call.cancel()


# ---- server end -------------------------------------------------------------------------


async def _dispatch(ops: dict[str, Handler], call_id: Any, op: Any, args: Any) -> list:
    try:
        fn = ops.get(op) if isinstance(op, str) else None
        if fn is None:
            raise InvalidRequest(f"unknown operation {op!r}")
        return [call_id, wire.OK, await fn(args)]
    except OribusError as e:
        return [call_id, wire.ERROR, e.to_dict()]
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a bug must not take the server down: answer it
        log.exception("operation %s failed", op)
        return [call_id, wire.ERROR, wire.error_payload(e)]


def _frames(raw: bytes) -> list:
    batch = wire.unpack(raw)
    if not isinstance(batch, list) or not all(isinstance(f, list) and len(f) == 3 for f in batch):
        raise InvalidRequest("a request batch is a list of [call_id, op, args]")
    return batch


def mux_handlers(
    service: str, ops: dict[str, Handler], watch: WatchHandler | None = None
) -> grpc.GenericRpcHandler:
    """gRPC handlers of ``service``: Stream (batched calls), Call (unary) and Watch."""

    async def stream(request_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        # Calls run concurrently as tasks; their replies are yielded in batches: whatever
        # finished while the previous batch was being sent goes out as one message.
        replies: list[list] = []
        wake = asyncio.Event()
        running: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()

        async def run(frame: list) -> None:
            replies.append(await _dispatch(ops, *frame))
            wake.set()

        async def read_all() -> None:
            try:
                async for raw in request_iterator:
                    for frame in _frames(raw):
                        t = loop.create_task(run(frame))
                        running.add(t)
                        t.add_done_callback(running.discard)
            finally:
                wake.set()

        reader = loop.create_task(read_all())
        try:
            while True:
                await wake.wait()
                wake.clear()
                if replies:
                    batch = replies[:]
                    replies.clear()
                    yield wire.pack(batch)
                if reader.done():
                    if reader.exception() is not None:
                        raise reader.exception()  # type: ignore[misc]
                    if not running and not replies:
                        return
                    if running:
                        await asyncio.wait(set(running))
                        wake.set()
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        finally:
            reader.cancel()
            for t in list(running):
                t.cancel()

    async def unary(raw: bytes, context: aio.ServicerContext) -> bytes:
        try:
            frame = wire.unpack(raw)
            if not (isinstance(frame, list) and len(frame) == 3):
                raise InvalidRequest("a call is [call_id, op, args]")
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        return wire.pack(await _dispatch(ops, *frame))

    async def watch_stream(raw: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        if watch is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "watch is not served here")
        try:
            req = WatchRequest.from_wire(wire.unpack(raw))
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        stream: Any = None
        try:
            stream = await watch(req)  # type: ignore[misc]
            yield wire.pack([])  # subscribed: the client may now rely on seeing every later change
            async for change in stream:
                yield wire.pack([change.to_wire()])
        except OribusError as e:
            # the error's code travels in the trailing metadata so the client rebuilds it exactly
            await context.abort(wire.grpc_status_of(e), e.message,
                                trailing_metadata=(("oribus-error", e.code),))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    return grpc.method_handlers_generic_handler(
        service,
        {
            wire.STREAM: grpc.stream_stream_rpc_method_handler(stream),
            wire.CALL: grpc.unary_unary_rpc_method_handler(unary),
            wire.WATCH: grpc.unary_stream_rpc_method_handler(watch_stream),
        },
    )


class GrpcListener:
    """A gRPC server for one oribus service plus standard health checking.

    ``await start()`` binds ``listen`` (port 0 picks a free port) and reports
    SERVING for "" and the service; ``await stop(grace)`` reports NOT_SERVING,
    lets calls in flight finish for ``grace`` seconds, and closes. With
    ``credentials`` (``oribus.tls.server_credentials``) it serves TLS only.
    """

    def __init__(self, listen: str, service: str, handler: grpc.GenericRpcHandler, *,
                 credentials: grpc.ServerCredentials | None = None) -> None:
        from grpc_health.v1 import health

        self.listen = listen
        self.service = service
        self.port = 0
        self._handler = handler
        self._credentials = credentials
        self._server: aio.Server | None = None
        self._health = health.aio.HealthServicer()

    @property
    def address(self) -> str:
        return f"{self.listen.rsplit(':', 1)[0]}:{self.port}"

    async def start(self) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        # no SO_REUSEPORT: a second server on a taken address must fail, not share it
        server = aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers([self._handler])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self._credentials is not None:
            self.port = server.add_secure_port(self.listen, self._credentials)
        else:
            self.port = server.add_insecure_port(self.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.listen}")
        await server.start()
        for name in ("", self.service):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server

    async def stop(self, grace: float = 2.0) -> None:
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None


def stop_signal_event() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM. Install it before starting anything, so a
    signal that arrives during start-up still leads to a graceful stop."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
