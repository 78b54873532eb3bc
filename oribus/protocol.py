"""Messages between the bus and the shards — the single source of their shape.

Values travel and rest as msgpack-encoded ``bytes`` (encoded once by the
client side, decoded once by the reader), so no layer ever shares a mutable
object with a caller. Every message is a dataclass with ``to_wire`` /
``from_wire`` (plain lists/dicts for msgpack); the in-process shard connection
passes the objects themselves.

Messages (bus → shard, reply):
    read(ReadRequest)            → ReadReply        read keys, record deliveries
    prepare(ShardTxn)            → Vote             2PC phase one (validate, lock, log)
    commit_one_phase(ShardTxn)   → TxnOutcome       1PC: validate, lock, log, apply
    decide(txn_id, commit)       → TxnOutcome       on the primary: the commit point
    finish(txn_id, commit)       → None             phase two on the other participants
    status(txn_id)               → TxnStatus        a participant asks the primary
    history(key, limit)          → list[Version]
    forget(session, keys) / reset(session)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from oribus.errors import Stale
from oribus.types import SessionRef

# A session's proof of liveness on one shard: (shard epoch, delivery-log incarnation).
Token = tuple[int, int]


class Scope(StrEnum):
    SESSION = "session"  # every delivery of the session (plain HTTP agents, bus.commit)
    TRANSACTION = "transaction"  # deliveries since the transaction began (SDK transactions)


@dataclass(slots=True)
class ReadRequest:
    session: SessionRef
    keys: list[str]
    record: bool = True  # False: a peek that is not a delivery (history views, tools)


@dataclass(slots=True)
class ReadItem:
    key: str
    value: bytes | None  # msgpack-encoded value; None when absent or deleted
    version: int


@dataclass(slots=True)
class ReadReply:
    items: list[ReadItem]
    token: Token  # (epoch, incarnation) of the session on this shard
    seq: int  # delivery sequence number of the first item (transaction scope)


@dataclass(slots=True)
class Write:
    """One written key of a shard transaction, as resolved by the participant."""

    version: int  # the new version this write creates
    value: bytes | None  # encoded value; None for a delete
    deleted: bool = False


@dataclass(slots=True)
class ShardTxn:
    """The part of one commit that concerns one shard."""

    txn_id: str  # the client's commit id: the idempotency key
    session: SessionRef
    writes: dict[str, bytes | None] = field(default_factory=dict)  # key -> encoded value; None = delete
    rollback: dict[str, int] = field(default_factory=dict)  # key -> version whose value to restore
    expect: dict[str, int] = field(default_factory=dict)  # key -> expected current version
    read_set: dict[str, int] = field(default_factory=dict)  # explicit read entries
    scope: Scope = Scope.SESSION
    since_seq: int | None = None  # transaction scope: deliveries with seq >= this (None: none)
    token: Token | None = None  # the session's token for this shard, if it has one
    strict: bool = False  # refuse blind writes
    participants: tuple[int, ...] = ()
    primary: int = 0
    committed_at: float = 0.0  # commit time stamped by the coordinator (seconds since epoch)

    @property
    def written_keys(self) -> list[str]:
        return [*self.writes, *self.rollback]


class VoteKind(StrEnum):
    YES = "yes"
    NO = "no"
    COMMITTED = "committed"  # a retry of a transaction already committed here
    NOTHING = "nothing"  # valid, and nothing to lock or write here: leave this shard out of phase two


@dataclass(slots=True)
class Vote:
    kind: VoteKind
    stale: list[Stale] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # COMMITTED: this shard's new versions
    error: dict[str, Any] | None = None  # a refusal that is not a conflict (SessionExpired, ...)


class TxnState(StrEnum):
    PREPARED = "prepared"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(slots=True)
class TxnOutcome:
    state: TxnState
    versions: dict[str, int] = field(default_factory=dict)  # key -> new version (committed)
    stale: list[Stale] = field(default_factory=list)  # why it aborted
    token: Token | None = None  # the session's token on this shard after the commit


class TxnRef(NamedTuple):
    """A prepared (or kept) transaction as another process sees it."""

    txn_id: str
    primary: int
    participants: tuple[int, ...]


@dataclass(slots=True)
class TxnStatus:
    state: TxnState | None  # None: unknown here
    primary: int
    participants: tuple[int, ...]
    age: float  # seconds since this shard prepared it
