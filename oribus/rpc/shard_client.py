"""ShardService over gRPC: how a bus process reaches a shard server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from oribus.messages import Change, WatchRequest
from oribus.rpc import shard_codec, wire
from oribus.rpc.mux_client import MuxClient
from oribus.shards.service import ShardServiceByCalls
from oribus.tls import TlsConfig, channel_credentials


class GrpcShardClient(ShardServiceByCalls):
    """One shard server at ``target``, all calls multiplexed over one stream."""

    def __init__(self, shard_id: int, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float = wire.DEFAULT_CALL_TIMEOUT, epoch: int = 0, tls: TlsConfig | None = None) -> None:
        self.shard_id = shard_id
        self.target = target
        self.epoch = epoch  # cluster mode: the epoch of the shard's claim, sent with every call
        if tls is not None and credentials is None:  # mutual TLS: present the client certificate
            credentials = channel_credentials(tls)
        self.mux = MuxClient(target, wire.SHARD_SERVICE, credentials=credentials, timeout=timeout,
                             options=tls.channel_options() if tls is not None else ())

    async def _call(self, op: str, *params: Any) -> Any:
        if self.epoch:
            o = shard_codec.SHARD_OPS[op]
            args = o.enc_args(*params)
            args[shard_codec.FENCE] = self.epoch
            return o.dec_result(await self.mux.call(op, args))
        return await self.mux.call_op(shard_codec.SHARD_OPS, op, *params)

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        return self.mux.watch(request)

    async def close(self) -> None:
        await self.mux.close()
