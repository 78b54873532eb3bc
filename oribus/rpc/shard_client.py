"""ShardService over the network: how a bus process reaches a shard server.

Two transports carry the same calls (``shard_codec.SHARD_OPS``, each with the
epoch the bus expects, ``FENCE``): the stream transport (``StreamShardClient``:
length-prefixed msgpack frames over TCP or TLS, ``oribus.rpc.stream_client``)
and gRPC (``GrpcShardClient``: ``oribus.rpc.mux_client``). ``shard_client``
picks one for a shard whose server may offer both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc

from oribus import tracing
from oribus.errors import InvalidRequest
from oribus.messages import Change, WatchRequest
from oribus.rpc import shard_codec, wire
from oribus.rpc.mux_client import MuxClient
from oribus.rpc.stream_client import StreamClient
from oribus.shards.service import ShardServiceByCalls
from oribus.tls import TlsConfig, channel_credentials, client_ssl_context

TRANSPORTS = ("stream", "grpc")  # what ``--shard-transport`` chooses from
DEFAULT_TRANSPORT = "stream"


class CallConnection(Protocol):
    """What a remote shard client sends its calls over: ``MuxClient`` or ``StreamClient``."""

    target: str
    counters: dict[str, int]

    async def call(self, op: str, args: Any, timeout: float | None = None) -> Any: ...

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]: ...

    async def close(self) -> None: ...


class RemoteShardClient(ShardServiceByCalls):
    """One shard server reached over ``connection``; every call carries ``epoch`` (when known)."""

    transport = ""

    def __init__(self, shard_id: int, connection: CallConnection, epoch: int = 0) -> None:
        self.shard_id = shard_id
        self.connection = connection
        self.target = connection.target
        self.epoch = epoch  # cluster mode: the epoch of the shard's claim, sent with every call

    async def _call(self, op: str, *params: Any) -> Any:
        o = shard_codec.SHARD_OPS[op]
        args = o.enc_args(*params)
        if self.epoch:
            args[shard_codec.FENCE] = self.epoch
        return o.dec_result(await self.connection.call(op, tracing.inject(args)))

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        return self.connection.watch(request)

    async def close(self) -> None:
        await self.connection.close()


class GrpcShardClient(RemoteShardClient):
    """One shard server at ``target`` over gRPC, all calls multiplexed over one stream."""

    transport = "grpc"

    def __init__(self, shard_id: int, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float = wire.DEFAULT_CALL_TIMEOUT, epoch: int = 0, tls: TlsConfig | None = None) -> None:
        if tls is not None and credentials is None:  # mutual TLS: present the client certificate
            credentials = channel_credentials(tls)
        self.mux = MuxClient(target, wire.SHARD_SERVICE, credentials=credentials, timeout=timeout,
                             options=tls.channel_options() if tls is not None else ())
        super().__init__(shard_id, self.mux, epoch)


class StreamShardClient(RemoteShardClient):
    """One shard server's stream listener at ``target``: all calls over one TCP (or TLS) connection."""

    transport = "stream"

    def __init__(self, shard_id: int, target: str, *, timeout: float = wire.DEFAULT_CALL_TIMEOUT, epoch: int = 0,
                 tls: TlsConfig | None = None) -> None:
        context = client_ssl_context(tls) if tls is not None else None
        server_name = tls.ssl_target_name_override if tls is not None else None
        self.stream = StreamClient(target, wire.SHARD_SERVICE, ssl=context, server_hostname=server_name,
                                   timeout=timeout)
        super().__init__(shard_id, self.stream, epoch)


def shard_client(shard_id: int, address: str, stream_address: str = "", *, transport: str = DEFAULT_TRANSPORT,
                 epoch: int = 0, tls: TlsConfig | None = None, timeout: float = wire.DEFAULT_CALL_TIMEOUT) -> RemoteShardClient:
    """A client of the shard server whose gRPC listener is ``address`` and stream listener
    ``stream_address`` ("" if it has none): over the stream when ``transport`` is "stream"
    and the server has one, else over gRPC."""
    if transport not in TRANSPORTS:
        raise InvalidRequest(f"the shard transport is one of {', '.join(TRANSPORTS)}, not {transport!r}")
    if transport == "stream" and stream_address:
        return StreamShardClient(shard_id, stream_address, epoch=epoch, tls=tls, timeout=timeout)
    return GrpcShardClient(shard_id, address, epoch=epoch, tls=tls, timeout=timeout)
