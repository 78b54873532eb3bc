"""The remote implementations' common shape of ``oribus.contract.ShardService``.

The interface itself lives in ``oribus.contract``; it has three implementations
with the same semantics: the shard itself in-process (``oribus.shards.shard.Shard``,
embedded mode: no network hop), a gRPC client (cluster mode), and a simulated
network (deterministic fault injection). The last two are ``ShardServiceByCalls``.
"""

from __future__ import annotations

import abc
from typing import Any

from oribus.contract import Entry, ShardService
from oribus.messages import (
    ReadItem,
    ReadReply,
    ReadRequest,
    ShardTxn,
    Token,
    TxnOutcome,
    TxnRef,
    TxnStatus,
    Vote,
)
from oribus.types import DEFAULT_SCAN_LIMIT, DEFAULT_SESSIONS_LISTED, SessionRef


class ShardServiceByCalls(ShardService):
    """A ShardService whose every operation is one call ``_call(op, *params)`` of
    ``oribus.rpc.shard_codec.SHARD_OPS``: the shape of every remote implementation (gRPC, the simulated
    network), which differ only in how a call travels (and in watch)."""

    @abc.abstractmethod
    async def _call(self, op: str, *params: Any) -> Any:
        """Send one call of ``oribus.rpc.shard_codec.SHARD_OPS`` and return its decoded result."""

    async def read(self, req: ReadRequest) -> ReadReply:
        return await self._call("read", req)

    async def scan(self, prefix: str = "", after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[ReadItem]:
        return await self._call("scan", prefix, after, limit)

    async def sessions(
        self, limit: int = DEFAULT_SESSIONS_LISTED
    ) -> list[tuple[SessionRef, dict[str, int], float]]:
        return await self._call("sessions", limit)

    async def prepare(self, txn: ShardTxn) -> Vote:
        return await self._call("prepare", txn)

    async def commit_one_phase(self, txn: ShardTxn) -> TxnOutcome:
        return await self._call("commit_one_phase", txn)

    async def validate(self, txn: ShardTxn) -> Vote:
        return await self._call("validate", txn)

    async def release_lease(self, txn_id: str) -> None:
        await self._call("release_lease", txn_id)

    async def release_leases(self, txn_ids: list[str]) -> None:
        await self._call("release_leases", txn_ids)

    async def withdraw(self, txn: ShardTxn) -> TxnOutcome:
        return await self._call("withdraw", txn)

    async def decide(self, txn_id: str, commit: bool, deadline: float | None = None) -> TxnOutcome:
        return await self._call("decide", txn_id, commit, deadline)

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

    async def drop(self, session: SessionRef) -> None:
        await self._call("drop", session)

    async def reset_every_session(self) -> int:
        return await self._call("reset_every_session")

    async def stats(self) -> dict:
        return await self._call("stats")

    async def expired(self, older_than: float) -> list[TxnRef]:
        return await self._call("expired", older_than)

    async def unreleased(self) -> list[TxnRef]:
        return await self._call("unreleased")
