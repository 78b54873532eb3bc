"""The client end of the mux: many concurrent calls over one gRPC bidi stream, in batches.

Python gRPC pays dearly per message (specs/wire.md, "Services and methods":
~4.4k unary RPC/s against ~13k stream messages/s, and far more when each
message carries several calls). So each connection opens ONE bidi stream; every call gets an id; the
writer sends whatever calls are pending as one message (holding it a few loop turns
when the stream is busy: ``wire.HOLD_TURNS``), and the other side answers in batches
the same way. Frames are documented in ``oribus.rpc.wire``.

``MuxClient``   client end: ``await call(op, args)``; reconnects lazily after a
                failure; every call in flight when the stream breaks fails with
                Unavailable (the caller decides whether a retry is safe).
``RemoteWatch`` one Watch stream of changes, subscribed before it is returned.

The server end is ``oribus.rpc.mux_server``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from grpc import aio

from oribus.errors import OribusError, Unavailable
from oribus.messages import Change, WatchRequest
from oribus.rpc import grpc_status, wire
from oribus.tls import explain_failure

log = logging.getLogger("oribus.rpc.mux_client")




class MuxClient:
    """Calls to one service at ``target`` multiplexed over one stream."""

    def __init__(
        self,
        target: str,
        service: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = wire.DEFAULT_CALL_TIMEOUT,
        options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.target = target
        self.service = service
        self.timeout = timeout
        self._credentials = credentials  # None: plaintext; else TLS (oribus.tls.channel_credentials)
        self._options = [*wire.CHANNEL_OPTIONS, *options]  # e.g. grpc.ssl_target_name_override
        self.metadata = tuple(metadata)  # sent with every RPC: the caller's credential (specs/auth.md §2)
        self._channel: aio.Channel | None = None
        self._call: aio.StreamStreamCall[bytes, bytes] | None = None
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
            stream: aio.StreamStreamMultiCallable[bytes, bytes] = self.channel.stream_stream(wire.method_path(self.service, wire.STREAM))
            self._call = stream(metadata=self.metadata or None)
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
        grpc_status.raise_error(payload)

    async def _writer(self, call: aio.StreamStreamCall[bytes, bytes]) -> None:
        try:
            while True:
                await self._wake.wait()
                if len(self._pending) > wire.BUSY_CALLS:  # busy: let more calls join (wire.HOLD_TURNS)
                    for _ in range(wire.HOLD_TURNS):
                        await asyncio.sleep(0)
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

    async def _reader(self, call: aio.StreamStreamCall[bytes, bytes]) -> None:
        try:
            while True:
                raw = await call.read()
                if raw is aio.EOF:
                    raise Unavailable(f"{self.target} closed the stream")
                assert isinstance(raw, bytes)  # no deserializer: bytes (grpc's stubs type EOF as object)
                self.counters["messages_in"] += 1
                for call_id, status, payload in wire.unpack(raw):
                    fut = self._pending.get(call_id)
                    if fut is not None and not fut.done():
                        fut.set_result((status, payload))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._broken(call, e)

    def _broken(self, call: aio.StreamStreamCall[bytes, bytes], e: BaseException) -> None:
        if self._call is not call:
            return
        self._call = None
        err = grpc_status.error_from_grpc(e) if isinstance(e, grpc.RpcError) else (
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

    async def call_op(self, table: Mapping[str, wire.Op], op: str, *params: Any) -> Any:
        """Call ``op`` of an operation table (bus_codec.BUS_OPS / SHARD_OPS) with Python params."""
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
        self._call: aio.UnaryStreamCall[bytes, bytes] | None = None
        self._buffer: collections.deque = collections.deque()

    async def subscribed(self) -> None:
        if self._call is not None:
            return
        method: aio.UnaryStreamMultiCallable[bytes, bytes] = self._client.channel.unary_stream(wire.method_path(self._client.service, wire.WATCH))
        self._call = method(wire.pack(self._request.to_wire()), metadata=self._client.metadata or None)
        try:
            self._buffer.extend(await self._read())  # the acknowledgement (normally empty)
        except StopAsyncIteration:
            raise Unavailable(f"the watch on {self._client.target} ended before it was subscribed") from None

    async def _read(self) -> list:
        assert self._call is not None, "subscribed() starts the call"
        try:
            raw = await self._call.read()
        except grpc.RpcError as e:
            err = grpc_status.error_from_grpc(e)
            if type(err) is Unavailable:
                err = self._client._unavailable(err)
            raise err from None
        if raw is aio.EOF:
            raise StopAsyncIteration
        assert isinstance(raw, bytes)  # as in MuxClient._reader
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
