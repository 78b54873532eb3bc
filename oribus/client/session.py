"""The client API: a session of one agent on a bus, and its transactions.

The same classes serve the embedded engine (``oribus.open_local``) and remote
buses (``oribus.connect``): they only call the bus methods ``read``, ``commit``,
``history``, ``forget``, ``reset``, ``stats``, ``scan`` and ``watch``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from oribus import tracing
from oribus.client.retry import Backoff, RetryPolicy
from oribus.client.watch import WatchStream
from oribus.contract import BusService, CommitRequest, ReadResult
from oribus.errors import Conflict, InvalidRequest, OribusError, SessionExpired, Unavailable
from oribus.messages import Scope, Token
from oribus.rpc.wire import MAX_MESSAGE_BYTES
from oribus.types import (
    DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_SCAN_LIMIT,
    DELETE,
    Item,
    SessionRef,
    Version,
    decode_value,
    encode_value,
    validate_key,
)

T = TypeVar("T")

# Commit ids sort by the age of the work they commit: eleven hex digits of the wall clock's
# milliseconds when that work was first tried, then a random per-process prefix and a counter,
# unique without a system call per commit (uuid4 costs an os.urandom each time). A shard decides
# which of two commits waiting on each other's read leases may wait by comparing their ids
# (wait-die, PROTOCOL.md §5.8 rule 7: the older waits, the younger is refused). A session whose
# commit was refused gives its next commits the refused one's age, so a step retried under
# contention grows old and in the end waits instead of being refused again and again (with a
# fresh age per attempt, a hot key could refuse the same step until its retries ran out).
_ID_PREFIX = uuid.uuid4().hex[:20]
_id_counter = itertools.count(1)
_BORN_DIGITS = 11  # hex digits of milliseconds: fixed width until the year 2527


def new_commit_id(born_ms: int | None = None) -> str:
    """A fresh commit id; ``born_ms`` (default: now) is the age it sorts by."""
    if born_ms is None:
        born_ms = time.time_ns() // 1_000_000
    return f"{born_ms:0{_BORN_DIGITS}x}-{_ID_PREFIX}-{next(_id_counter):x}"


def commit_id_born(commit_id: str) -> int | None:
    """The age (milliseconds) a ``new_commit_id`` id sorts by; None for ids made elsewhere."""
    if len(commit_id) <= _BORN_DIGITS or commit_id[_BORN_DIGITS] != "-":
        return None
    try:
        return int(commit_id[:_BORN_DIGITS], 16)
    except ValueError:
        return None

# The largest commit one request can carry (keys and encoded values), with room for the
# rest of the message under the wire's limit.
MAX_COMMIT_BYTES = MAX_MESSAGE_BYTES - (1 << 20)

# How often a commit whose outcome is unknown (Unavailable) is retried with the same commit id.
_SAME_ID_RETRIES = 3


@dataclass(frozen=True, slots=True)
class Registered:
    """What ``AsyncSession.register`` recorded."""

    recorded: dict[str, Item]  # delivered now, at these (current) versions
    skipped: list[str]  # the session held a delivery of these already: it stands
    missing: list[str]  # no such key: nothing recorded


class Closable(Protocol):
    """What a session may own and close with itself: the remote bus, or the embedded engine."""

    async def close(self) -> None: ...


class AsyncSession:
    """One agent's session on a bus: reads are deliveries, commits are checked against them.

    Example::

        async with oribus.open_local("./data", shards=4, agent="planner") as bus:
            plan = await bus.get("plan")
            await bus.commit({"plan": {"steps": 3}})          # refused if "plan" changed since
            async with bus.transaction() as tx:                # only its own reads count
                a = await tx.get("a")
                tx.put("b", (a.value or 0) + 1)
            reviewer = bus.session(agent="reviewer")            # another agent, same engine

    By default (session scope) everything this session ever read is checked
    at each commit, as an LLM's context keeps what it read; call
    ``forget(keys)`` or ``reset_session()`` to drop reads that no longer
    matter. ``strict=True`` refuses blind writes (keys neither read nor expected).
    """

    def __init__(
        self,
        bus: BusService,
        agent: str,
        session_id: str | None = None,
        *,
        strict: bool = False,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        owner: Closable | None = None,
    ) -> None:
        if not isinstance(agent, str) or not agent:
            raise InvalidRequest("agent must be a non-empty str")
        self._bus = bus
        self.session_ref = SessionRef(agent, session_id or uuid.uuid4().hex[:16])
        self.strict = strict
        self.max_value_bytes = max_value_bytes
        self._tokens: dict[int, Token] = {}
        self._owner = owner  # the engine this session closes, if any
        self._closed = False
        # The age of this session's oldest refused commit since its last accepted one: its
        # next commits are made as old (see new_commit_id). None: the last commit went through.
        self._refused_born: int | None = None

    @property
    def agent(self) -> str:
        return self.session_ref.agent

    @property
    def session_id(self) -> str:
        return self.session_ref.session_id

    # ---- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the engine this session owns (if any). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owner is not None:
            await self._owner.close()

    def __del__(self) -> None:
        if self._owner is not None and not self._closed:
            warnings.warn(
                f"oribus session {self.session_ref} owning an engine was never closed",
                ResourceWarning,
                stacklevel=1,
            )

    def session(self, agent: str | None = None, session_id: str | None = None, *, strict: bool | None = None) -> AsyncSession:
        """Another session on the same bus (another agent, or another run of this one)."""
        return AsyncSession(
            self._bus,
            agent or self.agent,
            session_id,
            strict=self.strict if strict is None else strict,
            max_value_bytes=self.max_value_bytes,
        )

    # ---- reads -----------------------------------------------------------------

    def _observe(self, tokens: Mapping[int, Token], into: dict[int, Token]) -> None:
        # keep the FIRST token per shard: a changed one means deliveries were lost
        for sid, (epoch, incarnation) in tokens.items():
            into.setdefault(sid, (epoch, incarnation))

    async def _read(self, keys: list[str]) -> ReadResult:
        with tracing.span("oribus.read", client=True) as span:
            if span is not None:
                span.set_attributes(self._span_attributes(keys=len(keys)))
            result = await self._bus.read(self.session_ref, keys)
        self._observe(result.tokens, self._tokens)
        return result

    def _span_attributes(self, **more: Any) -> dict[str, Any]:
        return {"oribus.agent": self.session_ref.agent, "oribus.session": self.session_ref.session_id,
                **{"oribus." + k: v for k, v in more.items()}}

    async def get(self, key: str) -> Item:
        """Read one key (recorded as a delivery). Absent keys read as version 0, value None."""
        result = await self._read([key])
        i = result.items[0]
        return Item(i.key, decode_value(i.value), i.version)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Item]:
        """Read several keys at once; each read is a delivery."""
        keys = list(dict.fromkeys(keys))
        result = await self._read(keys)
        return {i.key: Item(i.key, decode_value(i.value), i.version) for i in result.items}

    async def register(self, keys: Iterable[str]) -> Registered:
        """Record keys as delivered to this session unless it was given them already.

        Skip-if-exists (S-Bus's ``/delivery_log/register``): a key the session holds a
        delivery of keeps the version it was given, however old, so a later commit is
        still checked against that version; keys that do not exist are not recorded.
        For callers that learn what an agent saw elsewhere, such as ``oribus proxy``
        (the keys an agent's LLM traffic named). Example::

            got = await bus.register(["plan", "budget"])
            got.recorded   # {"plan": Item(...)}: delivered now, at its current version
            got.skipped    # ["budget"]: delivered before, that delivery stands
        """
        keys = list(dict.fromkeys(keys))
        with tracing.span("oribus.register", client=True) as span:
            if span is not None:
                span.set_attributes(self._span_attributes(keys=len(keys)))
            result = await self._bus.read(self.session_ref, keys, True, True)
        self._observe(result.tokens, self._tokens)
        skipped = set(result.skipped)
        recorded = {i.key: Item(i.key, decode_value(i.value), i.version) for i in result.items
                    if i.key not in skipped and i.value is not None}
        missing = [i.key for i in result.items if i.key not in skipped and i.value is None]
        return Registered(recorded, [k for k in keys if k in skipped], missing)

    # ---- commits -----------------------------------------------------------------

    def _encode_writes(self, writes: Mapping[str, Any]) -> dict[str, bytes | None]:
        if not isinstance(writes, Mapping):
            raise InvalidRequest("writes must be a mapping of key -> value")
        out: dict[str, bytes | None] = {}
        for k, v in writes.items():
            validate_key(k)
            out[k] = None if v is DELETE else encode_value(v, self.max_value_bytes)
        return out

    def _request(
        self, commit_id: str | None, *, scope: Scope = Scope.SESSION,
        tokens: dict[int, Token] | None = None, **fields: Any,
    ) -> CommitRequest:
        """A commit of this session; the client sends every token it holds (see Bus.commit)."""
        return CommitRequest(
            session=self.session_ref,
            commit_id=commit_id or self.new_commit_id(),
            scope=scope,
            tokens=dict(self._tokens if tokens is None else tokens),
            strict=self.strict,
            complete_tokens=True,
            **fields,
        )

    def new_commit_id(self) -> str:
        """An id for this session's next commit: as old as its oldest refused one, if any."""
        return new_commit_id(self._refused_born)

    async def _send(self, req: CommitRequest) -> dict[str, int]:
        size = sum(len(k) + (len(v) if v else 0) for k, v in req.writes.items())
        if size > MAX_COMMIT_BYTES:
            # Over the wire's message limit it could only fail as an opaque transport error
            # (and be retried): say what is wrong before anything is sent.
            raise InvalidRequest(
                f"commit carries {size} bytes of keys and values, over the {MAX_COMMIT_BYTES}-byte "
                "limit of one request: split it into several commits",
                size=size, limit=MAX_COMMIT_BYTES,
            )
        policy = RetryPolicy()
        with tracing.span("oribus.commit", client=True) as span:
            if span is not None:
                span.set_attributes(self._span_attributes(commit_id=req.commit_id,
                                                          keys=len(req.writes) + len(req.rollback)))
            for attempt in range(_SAME_ID_RETRIES + 1):
                try:
                    result = await self._bus.commit(req)
                    break
                except Unavailable as e:
                    # the outcome may be unknown: retry the SAME commit id (never applied twice)
                    if attempt == _SAME_ID_RETRIES:
                        raise
                    await asyncio.sleep(policy.delay_after(e, attempt + 3))
                except OribusError as e:
                    tracing.refused(span, e)
                    if isinstance(e, Conflict | SessionExpired) and self._refused_born is None:
                        self._refused_born = commit_id_born(req.commit_id)
                    raise
        self._refused_born = None
        self._observe(result.tokens, self._tokens)
        return dict(result.versions)

    async def commit(
        self,
        writes: Mapping[str, Any],
        *,
        expect: Mapping[str, int] | None = None,
        read_set: Mapping[str, int] | None = None,
        commit_id: str | None = None,
    ) -> dict[str, int]:
        """Atomically write keys (``oribus.DELETE`` deletes) if nothing this session read changed.

        ``expect`` adds expected current versions; ``read_set`` adds explicit
        read entries (checked in addition to the logged reads, never instead).
        Returns key -> new version. Raises Conflict (``.stale`` lists the
        offending keys) and writes nothing if the check fails.
        """
        return await self._send(self._request(
            commit_id,
            writes=self._encode_writes(writes),
            expect=dict(expect or {}),
            read_set=dict(read_set or {}),
        ))

    async def put(self, key: str, value: Any, *, expect: int | None = None) -> int:
        """Commit a single key; returns its new version."""
        versions = await self.commit({key: value}, expect=None if expect is None else {key: expect})
        return versions[key]

    async def delete(self, key: str, *, expect: int | None = None) -> int:
        """Commit a delete of one key; returns its new version."""
        return await self.put(key, DELETE, expect=expect)

    async def rollback(self, targets: Mapping[str, int], *, commit_id: str | None = None) -> dict[str, int]:
        """Atomically restore each key to the value it had at the given version.

        An ordinary commit (checked like any other) whose new versions carry
        the old values; version 0 deletes the key. Returns key -> new version.
        """
        if not isinstance(targets, Mapping) or not targets:
            raise InvalidRequest("rollback takes a non-empty mapping of key -> version")
        return await self._send(self._request(commit_id, rollback=dict(targets)))

    def transaction(self) -> Transaction:
        """A transaction whose read set is only the reads made through it."""
        return Transaction(self)

    async def run(
        self, fn: Callable[[Transaction], Awaitable[T]], *, retries: int = 20, policy: RetryPolicy | None = None
    ) -> T:
        """Call ``await fn(tx)`` in a fresh transaction and commit, retrying on Conflict.

        Retries a conflict at most ``retries`` times with jittered exponential backoff, and
        ``Unavailable`` for ``policy.unavailable_for`` seconds (a failover's length), waiting
        what the server's ``retry_after`` asks where it gives one (``oribus.client.retry``);
        the last error is raised when they run out.
        """
        backoff = Backoff(policy or RetryPolicy(retries=retries))
        while True:
            tx = self.transaction()
            try:
                result = await fn(tx)
                await tx.commit()
                return result
            except OribusError as e:
                if isinstance(e, Unavailable) and tx.sent and await self._settle(tx, backoff.policy):
                    return result  # the commit did apply; only its answer was lost
                delay = backoff.after(e)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    async def _settle(self, tx: Transaction, policy: RetryPolicy) -> bool:
        """Find out whether ``tx``'s commit applied by resending it (same commit id).

        True: it committed (now or earlier). False: it was refused, so it never
        applied and a fresh transaction may start over. Starting over while the
        outcome is unknown could apply the same work twice.
        """
        backoff = Backoff(policy)
        delay: float | None = policy.delay(3)
        while delay is not None:
            await asyncio.sleep(delay)
            try:
                await tx.resend()
                return True
            except Unavailable as e:
                delay = backoff.after(e)
            except (Conflict, SessionExpired):
                return False
        raise Unavailable(
            f"the outcome of commit {tx.commit_id} is still unknown; retry it with the same commit id",
            commit_id=tx.commit_id,
        )

    # ---- history and session upkeep -------------------------------------------------

    async def history(self, key: str, limit: int | None = None) -> list[Version]:
        """Past versions of ``key``, newest first (reading history is not a delivery)."""
        with tracing.span("oribus.history", client=True) as span:
            if span is not None:
                span.set_attributes(self._span_attributes(key=key))
            entries = await self._bus.history(key, limit)
        return [
            Version(e.version, decode_value(e.value), e.agent, e.session, e.commit_id, e.committed_at, e.deleted)
            for e in entries
        ]

    async def forget(self, keys: Iterable[str]) -> None:
        """Drop these keys from the session's read set (later commits no longer depend on them)."""
        await self._bus.forget(self.session_ref, list(keys))

    async def reset_session(self) -> None:
        """Drop every delivery of this session; also clears a SessionExpired state."""
        await self._bus.reset(self.session_ref)
        self._tokens.clear()

    def watch(
        self, prefix: str = "", from_version: int | None = None, *, policy: RetryPolicy | None = None
    ) -> WatchStream:
        """Changes of keys under ``prefix`` as they become visible (an async iterator of WatchEvent).

        ``from_version=None`` watches live changes only; an int first replays
        every kept version after it. The stream resumes by itself after a
        break, from the last version seen of each key (see WatchStream).
        Watching is not reading: it records no delivery. Example::

            async with bus.watch("team-a/") as changes:
                async for ch in changes:
                    print(ch.key, ch.version, ch.value)
        """
        return WatchStream(self._bus, prefix, from_version, policy=policy)

    async def scan(self, prefix: str = "", *, after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[Item]:
        """Live keys under ``prefix`` after ``after``, in key order, at most ``limit`` (a page:
        pass the last key as ``after`` for the next). Listing is not reading: it records no
        delivery, so a commit does not depend on what a scan showed. Example::

            page = await bus.scan("team-a/")
            while page:
                ...
                page = await bus.scan("team-a/", after=page[-1].key)
        """
        items = await self._bus.scan(prefix, after, limit)
        return [Item(i.key, decode_value(i.value), i.version) for i in items]

    async def stats(self) -> dict:
        return await self._bus.stats()


class Transaction:
    """Reads and buffered writes committed together; only its own reads are its read set.

    Use as ``async with session.transaction() as tx: ...`` (commits on normal
    exit, discards on an exception) or call ``await tx.commit()`` yourself.
    Reads see committed state (not the transaction's own buffered writes).
    """

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self.commit_id = session.new_commit_id()
        self._writes: dict[str, Any] = {}
        self._rollback: dict[str, int] = {}
        self._expect: dict[str, int] = {}
        self._since: dict[int, int] = {}
        self._tokens: dict[int, Token] = {}
        # What this transaction itself was given (first read per key). Sent as explicit
        # read entries: the server checks them IN ADDITION to its delivery log, which
        # holds only the session's latest delivery per key and so cannot tell two
        # concurrent transactions of one session apart.
        self._reads: dict[str, int] = {}
        self.versions: dict[str, int] | None = None  # set by a successful commit
        self._sent: CommitRequest | None = None  # the commit request, once sent
        self._done = False

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and not self._done:
            await self.commit()
        self._done = True

    def _check_open(self) -> None:
        if self._done:
            raise InvalidRequest("the transaction is already committed or discarded")

    async def _read(self, keys: list[str]) -> ReadResult:
        self._check_open()
        s = self._session
        with tracing.span("oribus.read", client=True) as span:
            if span is not None:
                span.set_attributes(s._span_attributes(keys=len(keys), commit_id=self.commit_id))
            result = await s._bus.read(s.session_ref, keys)
        s._observe(result.tokens, s._tokens)
        s._observe(result.tokens, self._tokens)
        for sid, seq in result.seqs.items():
            self._since.setdefault(sid, seq)
        for item in result.items:
            self._reads.setdefault(item.key, item.version)
        return result

    async def get(self, key: str) -> Item:
        result = await self._read([key])
        i = result.items[0]
        return Item(i.key, decode_value(i.value), i.version)

    async def get_many(self, keys: Iterable[str]) -> dict[str, Item]:
        result = await self._read(list(dict.fromkeys(keys)))
        return {i.key: Item(i.key, decode_value(i.value), i.version) for i in result.items}

    def put(self, key: str, value: Any) -> None:
        self._check_open()
        validate_key(key)
        self._rollback.pop(key, None)
        self._writes[key] = value

    def delete(self, key: str) -> None:
        self.put(key, DELETE)

    def expect(self, key: str, version: int) -> None:
        """Also require ``key`` to be at ``version`` at commit."""
        self._check_open()
        validate_key(key)
        self._expect[key] = version

    def rollback(self, key: str, version: int) -> None:
        """Restore ``key`` to its value at ``version`` as part of this transaction."""
        self._check_open()
        validate_key(key)
        self._writes.pop(key, None)
        self._rollback[key] = version

    async def commit(self) -> dict[str, int]:
        self._check_open()
        self._done = True
        s = self._session
        req = s._request(
            self.commit_id,
            scope=Scope.TRANSACTION,
            tokens=self._tokens,
            writes=s._encode_writes(self._writes),
            rollback=dict(self._rollback),
            expect=dict(self._expect),
            read_set=dict(self._reads),
            since=dict(self._since),
        )
        self._sent = req
        self.versions = await s._send(req)
        return self.versions

    @property
    def sent(self) -> bool:
        """The commit was sent (its outcome may be unknown if it raised Unavailable)."""
        return self._sent is not None

    async def resend(self) -> dict[str, int]:
        """Send the same commit again (same commit id: never applied twice)."""
        if self._sent is None:
            raise InvalidRequest("the transaction was never committed")
        self.versions = await self._session._send(self._sent)
        return self.versions
