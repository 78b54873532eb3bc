"""The one interface through which the bus reaches a shard.

Three implementations keep the same semantics: the shard itself in-process
(``oribus.shards.shard.Shard``, embedded mode: no network hop), a gRPC client
(cluster mode), and a simulated network (deterministic fault injection).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from typing import Any

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
)
from oribus.shards.store import Entry
from oribus.types import SessionRef


class ShardService(abc.ABC):
    shard_id: int

    @abc.abstractmethod
    async def read(self, req: ReadRequest) -> ReadReply:
        """Read keys, recording each as a delivery to the session."""

    @abc.abstractmethod
    async def scan(self, prefix: str = "", after: str = "", limit: int = 1000) -> list[ReadItem]:
        """Live keys under ``prefix`` after ``after`` in key order, with detail; no delivery.

        Like a read it never shows a key under a write intent before its
        transaction's outcome is known.
        """

    @abc.abstractmethod
    async def sessions(self, limit: int = 100) -> list[tuple[SessionRef, dict[str, int], float]]:
        """Up to ``limit`` live sessions of the delivery log, most recently active first:
        (session, {key: version delivered}, seconds idle). A view; touches nothing."""

    @abc.abstractmethod
    async def prepare(self, txn: ShardTxn) -> Vote:
        """2PC phase one: validate this shard's part, lock, log PREPARE durably, vote."""

    @abc.abstractmethod
    async def commit_one_phase(self, txn: ShardTxn) -> TxnOutcome:
        """A transaction that touches only this shard: validate, lock, log, apply."""

    @abc.abstractmethod
    async def decide(self, txn_id: str, commit: bool) -> TxnOutcome:
        """On the primary: record the outcome durably (the commit point)."""

    @abc.abstractmethod
    async def finish(self, txn_id: str, commit: bool) -> TxnOutcome:
        """On the other participants: apply or release a decided transaction."""

    @abc.abstractmethod
    async def release(self, txn_id: str) -> None:
        """On the primary: every participant applied the decision; it may be forgotten."""

    @abc.abstractmethod
    async def status(self, txn_id: str) -> TxnStatus:
        """What this shard knows of a transaction."""

    @abc.abstractmethod
    async def history(self, key: str, limit: int | None = None) -> list[Entry]:
        """Past versions of a key, newest first."""

    @abc.abstractmethod
    async def forget(self, session: SessionRef, keys: list[str]) -> None:
        """Drop deliveries of these keys from the session's log."""

    @abc.abstractmethod
    async def reset(self, session: SessionRef) -> Token | None:
        """Drop every delivery of the session; its record (and token) stays.

        Returns the session's token here — still the one its earlier reads were
        given unless the shard restarted or the session expired — or None if
        this shard has no record of it."""

    @abc.abstractmethod
    async def drop(self, session: SessionRef) -> None:
        """Remove the session's record: a commit presenting a token it was given fails with
        SessionExpired, on every bus alike; its next read starts a new incarnation. For a
        reset or forget by a caller that did not prove it owns the session (specs/http.md)."""

    @abc.abstractmethod
    async def reset_every_session(self) -> int:
        """``reset`` every session of the delivery log at once (S-Bus ``/admin/reset``);
        records and tokens stay. Returns how many sessions had deliveries."""

    @abc.abstractmethod
    async def stats(self) -> dict:
        """Counters for operators and benchmarks."""

    @abc.abstractmethod
    async def expired(self, older_than: float) -> list[TxnRef]:
        """Two-phase transactions prepared here longer than ``older_than`` seconds ago."""

    @abc.abstractmethod
    async def unreleased(self) -> list[TxnRef]:
        """Commit decisions this shard keeps as primary until their participants applied them."""

    @abc.abstractmethod
    def watch(
        self,
        prefix: str = "",
        from_version: int | None = None,
        *,
        after: Mapping[str, int] | None = None,
        since: float | None = None,
    ) -> AsyncIterator[Change]:
        """Changes of keys under ``prefix``: first the kept versions asked for, then live ones.

        The replay (see ``protocol.WatchRequest``) gives, per key in version
        order, every kept version after ``after[key]`` / ``from_version`` (or
        committed since ``since``); then every change is streamed as it becomes
        visible, with no gap or duplicate between the two parts. Raises
        HistoryTruncated if wanted versions are no longer kept, WatchLagged
        (retryable) when the watcher falls too far behind. The stream ends
        without error only when the shard shuts down for good; a transport that
        loses the stream raises Unavailable, so that watchers resume.
        """


class ShardServiceByCalls(ShardService):
    """A ShardService whose every operation is one call ``_call(op, *params)`` of
    ``wire.SHARD_OPS``: the shape of every remote implementation (gRPC, the simulated
    network), which differ only in how a call travels (and in watch)."""

    @abc.abstractmethod
    async def _call(self, op: str, *params: Any) -> Any:
        """Send one call of ``wire.SHARD_OPS`` and return its decoded result."""

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
