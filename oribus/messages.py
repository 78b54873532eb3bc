"""Messages between the bus and the shards — the single source of their shape.

Values travel and rest as msgpack-encoded ``bytes`` (encoded once by the
client side, decoded once by the reader), so no layer ever shares a mutable
object with a caller. Every message is a dataclass with ``to_wire`` /
``from_wire`` (plain lists/dicts for msgpack); the in-process shard connection
passes the objects themselves.

Messages (bus → shard, reply):
    read(ReadRequest)            → ReadReply        read keys, record deliveries
    prepare(ShardTxn)            → Vote             2PC phase one on a writer (validate, lock, log)
    validate(ShardTxn)           → Vote             a read-only participant: validate, lease read locks
    release_lease(txn_id)        → None             end a read-only participant's lease
    release_leases(txn_ids)      → None             end several (one call per shard per loop turn)
    commit_one_phase(ShardTxn)   → TxnOutcome       1PC: validate, lock, log, apply
    withdraw(txn_id)             → TxnOutcome       the coordinator will not commit it: its outcome, or a tombstone
    decide(txn_id, commit, deadline) → TxnOutcome   on the primary: the commit point
    finish(txn_id, commit)       → None             phase two on the other writers
    status(txn_id)               → TxnStatus        a participant asks the primary
    history(key, limit)          → list[Version]
    forget(session, keys) / reset(session)
    watch(WatchRequest)          → stream of Change
                                 replay kept versions, then live ones

A watch is answered from the moment it is registered: every change that
becomes visible after that is streamed, and the replay covers what the request
asks of the kept history before it (see ``oribus.shards.watch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from oribus.errors import InvalidRequest, Stale
from oribus.types import SessionRef, validate_key, validate_prefix

# A session's proof of liveness on one shard: (shard epoch, delivery-log incarnation).
Token = tuple[int, int]


class Scope(StrEnum):
    SESSION = "session"  # every delivery of the session (plain HTTP agents, bus.commit)
    TRANSACTION = "transaction"  # deliveries since the transaction began (SDK transactions)


# Each enum's members by wire value, for the codecs: a dict lookup, where ``Scope(value)``
# costs about 2 µs (EnumMeta.__call__), several times per commit.
SCOPES: dict[str, Scope] = {s.value: s for s in Scope}


@dataclass(slots=True)
class ReadRequest:
    session: SessionRef
    keys: list[str]
    record: bool = True  # False: a peek that is not a delivery (history views, tools)
    detail: bool = False  # also return who committed each current version, and when
    # S-Bus delivery_log/register: record only keys that exist and that the session has
    # no delivery of yet — a key it already read keeps the version it was really given.
    only_new: bool = False


@dataclass(slots=True)
class ReadItem:
    key: str
    value: bytes | None  # msgpack-encoded value; None when absent or deleted
    version: int
    agent: str = ""  # detail reads only: the agent that committed this version
    committed_at: float = 0.0  # detail reads only: when (unix time)


@dataclass(slots=True)
class ReadReply:
    items: list[ReadItem]
    token: Token  # (epoch, incarnation) of the session on this shard
    seq: int  # delivery sequence number of the first item (transaction scope)
    skipped: list[str] = field(default_factory=list)  # only_new reads: keys already delivered


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
    participants: tuple[int, ...] = ()  # the writers: the shards that keep a record of it
    primary: int = 0
    committed_at: float = 0.0  # commit time stamped by the coordinator (seconds since epoch)
    # The read leases' deadline (the coordinator's wall clock, seconds since the epoch): a
    # one-phase commit point refuses past it less the clock-skew bound (PROTOCOL.md §5.8).
    deadline: float | None = None

    @property
    def written_keys(self) -> list[str]:
        return [*self.writes, *self.rollback]


class VoteKind(StrEnum):
    YES = "yes"
    NO = "no"
    COMMITTED = "committed"  # a retry of a transaction already committed here
    NOTHING = "nothing"  # valid, and nothing to lock or write here: leave this shard out of phase two


VOTE_KINDS: dict[str, VoteKind] = {k.value: k for k in VoteKind}


@dataclass(slots=True)
class Vote:
    kind: VoteKind
    stale: list[Stale] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # YES, COMMITTED: this shard's new versions
    error: dict[str, Any] | None = None  # a refusal that is not a conflict (SessionExpired, ...)
    lease: float = 0.0  # a read-only participant's YES: seconds its read lease lasts


class TxnState(StrEnum):
    PREPARED = "prepared"
    COMMITTED = "committed"
    ABORTED = "aborted"


TXN_STATES: dict[str, TxnState] = {t.value: t for t in TxnState}


@dataclass(slots=True)
class TxnOutcome:
    state: TxnState
    versions: dict[str, int] = field(default_factory=dict)  # key -> new version (committed)
    stale: list[Stale] = field(default_factory=list)  # why it aborted
    token: Token | None = None  # the session's token on this shard after the commit
    reason: str = ""  # why it aborted when no key is stale: LEASE_EXPIRED, or ""


# TxnOutcome.reason of a commit point refused because the read leases' deadline passed
LEASE_EXPIRED = "lease_expired"


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


@dataclass(slots=True)
class Change:
    """One committed write, streamed to watchers once it is visible (applied).

    Wire form: ``[key, version, value, deleted, agent, session, commit_id, committed_at]``.
    """

    key: str
    version: int
    value: bytes | None  # msgpack-encoded value; None for a delete
    deleted: bool
    agent: str
    session: str  # the committing session's id
    commit_id: str
    committed_at: float  # seconds since the epoch, stamped by the coordinator

    def to_wire(self) -> list[Any]:
        return [self.key, self.version, self.value, self.deleted, self.agent, self.session,
                self.commit_id, self.committed_at]

    @classmethod
    def from_wire(cls, raw: Any) -> Change:
        if not isinstance(raw, list | tuple) or len(raw) != 8:
            raise InvalidRequest("a change is [key, version, value, deleted, agent, session, commit_id, time]")
        key, version, value, deleted, agent, session, commit_id, committed_at = raw
        if not (
            isinstance(key, str)
            and isinstance(version, int)
            and (value is None or isinstance(value, bytes))
            and isinstance(deleted, bool)
            and isinstance(agent, str)
            and isinstance(session, str)
            and isinstance(commit_id, str)
            and isinstance(committed_at, int | float)
        ):
            raise InvalidRequest("a change has a field of the wrong type")
        return cls(key, version, value, deleted, agent, session, commit_id, float(committed_at))


@dataclass(frozen=True, slots=True)
class WatchRequest:
    """What a watch replays before it streams live changes.

    For each key under ``prefix`` the replay starts after, in this order of precedence:
    ``after[key]`` (the last version a resuming watcher saw), else ``from_version``,
    else — when ``since`` is set — the versions committed at or after ``since``;
    with none of them the key is watched live only. Versions that would be needed
    but are no longer kept fail the watch (HistoryTruncated), never skipped.

    Built once where a watch enters (the SDK's ``WatchStream``, an HTTP route, a
    server decoding the wire) and passed unchanged through ``BusService.watch`` and
    ``ShardService.watch``. The constructor validates every field — raising
    InvalidRequest — so a WatchRequest that exists is well formed; it keeps its own
    copy of ``after``.

    Wire form: ``{"p": prefix, "f": from_version, "a": {key: version}, "s": since}``.
    """

    prefix: str = ""
    from_version: int | None = None  # replay every version > this of every key (None: none)
    after: Mapping[str, int] = field(default_factory=dict)  # per key: replay versions > this
    since: float | None = None  # keys not in ``after`` (and no from_version): commit time >= this

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)
        if self.from_version is not None and not _is_version(self.from_version):
            raise InvalidRequest("from_version must be None or an int >= 0")
        if not isinstance(self.after, Mapping):
            raise InvalidRequest("after must be a mapping of key -> version")
        after = dict(self.after)  # a copy: the caller's later changes do not reach the request
        for k, v in after.items():
            validate_key(k)
            if not k.startswith(self.prefix):
                raise InvalidRequest(f"key {k!r} of after is not under the prefix {self.prefix!r}", key=k)
            if not _is_version(v):
                raise InvalidRequest(f"after version of {k!r} must be an int >= 0", key=k)
        if self.since is not None and (
            not isinstance(self.since, int | float) or isinstance(self.since, bool) or self.since != self.since
        ):
            raise InvalidRequest("since must be None or a time in seconds since the epoch")
        object.__setattr__(self, "after", after)  # frozen: the one assignment, at construction

    def to_wire(self) -> dict[str, Any]:
        return {"p": self.prefix, "f": self.from_version, "a": dict(self.after), "s": self.since}

    @classmethod
    def from_wire(cls, raw: Any) -> WatchRequest:
        if not isinstance(raw, dict):
            raise InvalidRequest('a watch request is {"p": prefix, "f": from_version, "a": after, "s": since}')
        after = raw.get("a")
        return cls(raw.get("p", ""), raw.get("f"), {} if after is None else after, raw.get("s"))


def _is_version(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
