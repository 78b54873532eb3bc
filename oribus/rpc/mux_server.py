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
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from grpc import aio

from oribus.auth.credential import CERTIFICATE, CREDENTIAL, METADATA_KEY, agent_of_pem, bearer
from oribus.errors import InvalidRequest, OribusError
from oribus.messages import WatchRequest
from oribus.rpc import grpc_status, wire

Handler = wire.Handler
WatchHandler = wire.WatchHandler


def _take_credential(context: aio.ServicerContext) -> None:
    """The call's bearer token (metadata ``authorization``) for the bus's guard, in this
    RPC's context; the tasks it starts inherit it (specs/auth.md §2)."""
    for key, value in context.invocation_metadata() or ():
        if key == METADATA_KEY and isinstance(value, str):
            CREDENTIAL.set(bearer(value))
            return
    # no token: a client certificate of an agent (CN=agent:NAME) may stand for one
    for pem in (context.auth_context() or {}).get("x509_pem_cert", ()):
        CERTIFICATE.set(agent_of_pem(pem))
        return


def mux_handlers(
    service: str, ops: Mapping[str, Handler], watch: WatchHandler | None = None,
    counters: dict[str, int] | None = None,
) -> grpc.GenericRpcHandler:
    """gRPC handlers of ``service``: Stream (batched calls), Call (unary) and Watch.

    ``counters``, if given, counts the Stream's ``calls``, ``messages_in`` and ``messages_out``
    (how well the callers' calls are batched)."""
    counted = counters if counters is not None else {}
    for name in ("calls", "messages_in", "messages_out"):
        counted.setdefault(name, 0)

    async def stream(request_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        # Calls run concurrently as tasks; their replies are yielded in batches: whatever
        # finished while the previous batch was being sent goes out as one message.
        _take_credential(context)
        replies: list[list] = []
        wake = asyncio.Event()
        running: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()

        async def run(frame: list) -> None:
            replies.append(await wire.dispatch(ops, *frame))
            wake.set()

        async def read_all() -> None:
            try:
                async for raw in request_iterator:
                    batch = wire.request_batch(wire.unpack(raw))
                    counted["messages_in"] += 1
                    counted["calls"] += len(batch)
                    for frame in batch:
                        t = loop.create_task(run(frame))
                        running.add(t)
                        t.add_done_callback(running.discard)
            finally:
                wake.set()

        reader = loop.create_task(read_all())
        try:
            while True:
                await wake.wait()
                if len(running) > wire.BUSY_CALLS:  # busy: let more replies join (wire.HOLD_TURNS)
                    for _ in range(wire.HOLD_TURNS):
                        await asyncio.sleep(0)
                wake.clear()
                if replies:
                    batch = replies[:]
                    replies.clear()
                    counted["messages_out"] += 1
                    yield wire.pack(batch)
                if reader.done():
                    error = reader.exception()
                    if error is not None:
                        raise error
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
        _take_credential(context)
        try:
            frame = wire.unpack(raw)
            if not (isinstance(frame, list) and len(frame) == 3):
                raise InvalidRequest("a call is [call_id, op, args]")
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        return wire.pack(await wire.dispatch(ops, *frame))

    async def watch_stream(raw: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        if watch is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "watch is not served here")
        _take_credential(context)
        try:
            req = WatchRequest.from_wire(wire.unpack(raw))
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        stream: Any = None
        try:
            stream = await watch(req)
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
        server = aio.server(options=[*wire.SERVER_OPTIONS, ("grpc.so_reuseport", 0)])
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
