"""ShardService over gRPC: how a bus process reaches a shard server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from oribus import wire
from oribus.mux import MuxClient
from oribus.protocol import (
    Change,
    ReadItem,
    ReadReply,
    ReadRequest,
    ShardTxn,
    Token,
    TxnOutcome,
    TxnRef,
    TxnStatus,
    Vote,
    WatchRequest,
)
from oribus.shards.service import ShardService
from oribus.shards.store import Entry
from oribus.tls import TlsConfig, channel_credentials
from oribus.types import SessionRef


class GrpcShardClient(ShardService):
    """One shard server at ``target``, all calls multiplexed over one stream."""

    def __init__(self, shard_id: int, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float = 30.0, epoch: int = 0, tls: TlsConfig | None = None) -> None:
        self.shard_id = shard_id
        self.target = target
        self.epoch = epoch  # cluster mode: the epoch of the shard's claim, sent with every call
        if tls is not None and credentials is None:  # mutual TLS: present the client certificate
            credentials = channel_credentials(tls)
        self.mux = MuxClient(target, wire.SHARD_SERVICE, credentials=credentials, timeout=timeout,
                             options=tls.channel_options() if tls is not None else ())

    async def _call(self, op: str, *params: Any) -> Any:
        if self.epoch:
            o = wire.SHARD_OPS[op]
            args = o.enc_args(*params)
            args[wire.FENCE] = self.epoch
            return o.dec_result(await self.mux.call(op, args))
        return await self.mux.call_op(wire.SHARD_OPS, op, *params)

    async def read(self, req: ReadRequest) -> ReadReply:
        return await self._call("read", req)

    async def scan(self, prefix: str = "", after: str = "", limit: int = 1000) -> list[ReadItem]:
        return await self._call("scan", prefix, after, limit)

    async def sessions(self, limit: int = 100) -> list[tuple[SessionRef, dict[str, int], float]]:
        return await self._call("sessions", limit)

    async def prepare(self, txn: ShardTxn) -> Vote:
        return await self._call("prepare", txn)

    async def commit_one_phase(self, txn: ShardTxn) -> TxnOutcome:
        return await self._call("commit_one_phase", txn)

    async def decide(self, txn_id: str, commit: bool) -> TxnOutcome:
        return await self._call("decide", txn_id, commit)

    async def finish(self, txn_id: str, commit: bool) -> TxnOutcome:
        return await self._call("finish", txn_id, commit)

    async def release(self, txn_id: str) -> None:
        await self._call("release", txn_id)

    async def status(self, txn_id: str) -> TxnStatus:
        return await self._call("status", txn_id)

    async def history(self, key: str, limit: int | None = None) -> list[Entry]:
        return await self._call("history", key, limit)

    async def forget(self, session: SessionRef, keys: list[str]) -> None:
        await self._call("forget", session, keys)

    async def reset(self, session: SessionRef) -> Token | None:
        return await self._call("reset", session)

    async def stats(self) -> dict:
        return await self._call("stats")

    async def expired(self, older_than: float) -> list[TxnRef]:
        return await self._call("expired", older_than)

    async def unreleased(self) -> list[TxnRef]:
        return await self._call("unreleased")

    def watch(
        self,
        prefix: str = "",
        from_version: int | None = None,
        *,
        after: Mapping[str, int] | None = None,
        since: float | None = None,
    ) -> AsyncIterator[Change]:
        return self.mux.watch(WatchRequest(prefix, from_version, dict(after or {}), since))

    async def close(self) -> None:
        await self.mux.close()
