"""The contract between oribus's clients, its bus and its shards: what both sides share.

A client (the SDK, the HTTP gateway's routes, the wire codec) reaches a bus only
through ``BusService`` and the messages below; a bus reaches a shard only through
``ShardService``. Their implementations (``oribus.bus.Bus``, the gRPC ``RemoteBus``,
``oribus.shards.shard.Shard``, the gRPC and simulated shard clients) import this
module, never one another, so the layers import only downwards (tests/unit/test_layering.py).

The bus-to-shard messages stay in ``oribus.messages``: they are the shard protocol of
specs/PROTOCOL.md, one module read beside that spec and shared with the sans-IO
participant, which needs none of the client side. This module adds what sits one level up -- the client-to-bus messages
(``CommitRequest``, ``CommitResult``, ``ReadResult``), the stored ``Entry`` that
history returns on both levels, and the two service interfaces -- and imports only
``oribus.types``, ``oribus.errors``, ``oribus.messages`` and the standard library.
The errors' wire codes are the ``code`` of each class of ``oribus.errors``, the one
error tree.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import NamedTuple

from oribus.messages import (
    Change,
    ReadItem,
    ReadReply,
    ReadRequest,
    Scope,
    ShardTxn,
    Token,
    TxnOutcome,
    TxnRef,
    TxnStatus,
    Vote,
    WatchRequest,
)
from oribus.types import DEFAULT_SCAN_LIMIT, DEFAULT_SESSIONS_LISTED, SessionRef


class Entry(NamedTuple):
    """One version of one key as stored."""

    version: int
    value: bytes | None  # msgpack-encoded; None when deleted
    deleted: bool
    agent: str
    session: str
    commit_id: str
    committed_at: float


@dataclass(slots=True)
class CommitRequest:
    session: SessionRef
    commit_id: str
    writes: dict[str, bytes | None] = field(default_factory=dict)  # encoded value; None = delete
    rollback: dict[str, int] = field(default_factory=dict)  # key -> version to restore
    expect: dict[str, int] = field(default_factory=dict)
    read_set: dict[str, int] = field(default_factory=dict)  # explicit entries
    scope: Scope = Scope.SESSION
    since: dict[int, int] = field(default_factory=dict)  # transaction scope: shard -> first seq
    tokens: dict[int, Token] = field(default_factory=dict)  # the session's tokens per shard
    strict: bool = False
    committed_at: float = 0.0
    # The client tracks its tokens and sent all of them (the SDK does). When False and
    # the bus knows nothing of the session, every shard validates (see Bus.commit).
    complete_tokens: bool = False
    broadcast: bool = False  # make every shard a participant (set by the bus)


@dataclass(slots=True)
class CommitResult:
    commit_id: str
    versions: dict[str, int]  # key -> new version
    tokens: dict[int, Token]  # the session's tokens on the written shards
    two_phase: bool


@dataclass(slots=True)
class ReadResult:
    items: list[ReadItem]  # in the order asked
    tokens: dict[int, Token] = field(default_factory=dict)  # shard -> session token there
    seqs: dict[int, int] = field(default_factory=dict)  # shard -> seq of the first delivery
    skipped: list[str] = field(default_factory=list)  # only_new reads: keys already delivered


async def ensure_subscribed(stream: object) -> None:
    """Wait until ``stream`` is subscribed, for the streams that can tell (remote ones)."""
    subscribed = getattr(stream, "subscribed", None)
    if subscribed is not None:
        await subscribed()


class BusService(abc.ABC):
    """The bus as a session sees it: the methods ``AsyncSession`` and ``WatchStream`` call.

    Implemented in-process by ``oribus.bus.bus.Bus`` and over the network by the gRPC
    client (``oribus.rpc.bus_client.RemoteBus``) and the simulated one, with the same
    semantics, so a remote session has exactly the embedded API.
    """

    @abc.abstractmethod
    async def read(self, session: SessionRef, keys: list[str], record: bool = True,
                   only_new: bool = False) -> ReadResult:
        """Read keys in the order asked; with ``record`` each read is a delivery to the session.
        ``only_new``: record only keys that exist and that the session has not been given yet
        (an earlier delivery is never overwritten); the others are listed in ``skipped``."""

    @abc.abstractmethod
    async def commit(self, req: CommitRequest) -> CommitResult:
        """Validate the request against what the session was delivered (ORI) and apply it,
        or raise Conflict / SessionExpired with nothing applied."""

    @abc.abstractmethod
    async def history(self, key: str, limit: int | None = None) -> list[Entry]:
        """Kept versions of a key, newest first."""

    @abc.abstractmethod
    async def forget(self, session: SessionRef, keys: list[str]) -> bool | None:
        """Drop the session's deliveries of these keys. A session's own caller owns it; the
        in-process bus returns whether it marked the session lost (never, then), a remote
        one returns None."""

    @abc.abstractmethod
    async def reset(self, session: SessionRef) -> bool | None:
        """Drop every delivery of the session (the return as for ``forget``)."""

    @abc.abstractmethod
    async def stats(self) -> dict:
        """Counters for operators and benchmarks."""

    @abc.abstractmethod
    async def scan(self, prefix: str = "", after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[ReadItem]:
        """Live keys under ``prefix`` after ``after`` on every shard, in key order, at most
        ``limit``, with detail (the agent and time of each version); no delivery."""

    @abc.abstractmethod
    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        """Changes of keys under ``request.prefix`` on every shard, each key's in version
        order (the replay as for ``ShardService.watch``)."""


class ShardService(abc.ABC):
    """The one interface through which the bus reaches a shard: in-process, over gRPC,
    or over the simulated network (``oribus.shards.service.ShardServiceByCalls``)."""

    shard_id: int

    @abc.abstractmethod
    async def read(self, req: ReadRequest) -> ReadReply:
        """Read keys, recording each as a delivery to the session."""

    @abc.abstractmethod
    async def scan(self, prefix: str = "", after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[ReadItem]:
        """Live keys under ``prefix`` after ``after`` in key order, with detail; no delivery.

        Like a read it never shows a key under a write intent before its
        transaction's outcome is known.
        """

    @abc.abstractmethod
    async def sessions(
        self, limit: int = DEFAULT_SESSIONS_LISTED
    ) -> list[tuple[SessionRef, dict[str, int], float]]:
        """Up to ``limit`` live sessions of the delivery log, most recently active first:
        (session, {key: version delivered}, seconds idle). A view; touches nothing."""

    @abc.abstractmethod
    async def prepare(self, txn: ShardTxn) -> Vote:
        """2PC phase one: validate this shard's part, lock, log PREPARE durably, vote."""

    @abc.abstractmethod
    async def commit_one_phase(self, txn: ShardTxn) -> TxnOutcome:
        """A transaction that touches only this shard: validate, lock, log, apply."""

    @abc.abstractmethod
    async def validate(self, txn: ShardTxn) -> Vote:
        """A read-only participant: validate this shard's part and hold its read locks for a
        lease, in memory (no record); YES carries the lease's seconds (PROTOCOL.md §5.8)."""

    @abc.abstractmethod
    async def release_lease(self, txn_id: str) -> None:
        """End a read-only participant's lease now (the commit's outcome is known)."""

    async def release_leases(self, txn_ids: list[str]) -> None:
        """End several leases at once: what ``release_lease`` does for each, in one call (the
        coordinator sends the releases of one loop turn together, one call per shard)."""
        for txn_id in txn_ids:
            await self.release_lease(txn_id)

    @abc.abstractmethod
    async def withdraw(self, txn: ShardTxn) -> TxnOutcome:
        """The coordinator will not commit ``txn`` here: answer its outcome if this shard knows
        the id (a retry whose earlier attempt committed), else leave an ABORTED tombstone and
        answer what this shard's checks refuse (raising SessionExpired or InvalidRequest)."""

    @abc.abstractmethod
    async def decide(self, txn_id: str, commit: bool, deadline: float | None = None) -> TxnOutcome:
        """On the primary: record the outcome durably (the commit point); a commit past
        ``deadline`` (the read leases', PROTOCOL.md §5.8) less the skew bound aborts instead."""

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
    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        """Changes of keys under ``request.prefix``: first the kept versions asked for, then
        live ones.

        The replay (see ``oribus.messages.WatchRequest``) gives, per key in version
        order, every kept version after ``after[key]`` / ``from_version`` (or
        committed since ``since``); then every change is streamed as it becomes
        visible, with no gap or duplicate between the two parts. Raises
        HistoryTruncated if wanted versions are no longer kept, WatchLagged
        (retryable) when the watcher falls too far behind. The stream ends
        without error only when the shard shuts down for good; a transport that
        loses the stream raises Unavailable, so that watchers resume.
        """
