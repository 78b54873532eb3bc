"""The server end of the mux: many concurrent calls over one gRPC bidi stream, in batches.

``mux_handlers`` builds the gRPC generic handlers of one service (Stream, Call and
Watch), dispatching each call's op to an async function; calls run concurrently and
whatever replies are ready go out as one message. ``GrpcListener`` serves them with
standard health checking. Frames are documented in ``oribus.rpc.wire``; the client end
is ``oribus.rpc.mux_client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from oribus.errors import InvalidRequest, OribusError
from oribus.messages import Change, WatchRequest
from oribus.rpc import grpc_status, wire

log = logging.getLogger("oribus.rpc.mux_server")

Handler = Callable[[Any], Awaitable[Any]]
# returns the (already subscribed) stream of changes of one watch
WatchHandler = Callable[[WatchRequest], Awaitable[AsyncIterator[Change]]]


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
        return [call_id, wire.ERROR, grpc_status.error_payload(e)]


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
            await context.abort(grpc_status.grpc_status_of(e), e.message,
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
    SERVING for "" and the service (``start(serving=False)``: NOT_SERVING until
    ``await serving()``); ``await stop(grace)`` reports NOT_SERVING,
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

    async def start(self, *, serving: bool = True) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        # no SO_REUSEPORT: a second server on a taken address must fail, not share it
        server = aio.server(options=[*wire.CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers([self._handler])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if self._credentials is not None:
            self.port = server.add_secure_port(self.listen, self._credentials)
        else:
            self.port = server.add_insecure_port(self.listen)
        if not self.port:
            raise OSError(f"cannot listen on {self.listen}")
        await server.start()
        self._server = server
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.service):
            await self._health.set(name, status)

    async def serving(self) -> None:
        """Report SERVING from now on (after ``start(serving=False)``)."""
        from grpc_health.v1 import health_pb2

        if self._server is not None:
            for name in ("", self.service):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 2.0) -> None:
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
