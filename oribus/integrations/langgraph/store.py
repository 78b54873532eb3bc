"""``OribusStore``: LangGraph long-term memory where a read-modify-write cannot lose an update.

LangGraph's stores take the last ``put``: two branches of a graph that both read
a memory item, change it and put it back leave only one change, silently. Here
every item a read (``get``, ``search``) returns is remembered per *reader* — the
asyncio task, or for the synchronous methods the thread's task context; LangGraph
runs each node in one — and a later ``put`` or ``delete`` of that item by the same reader
commits only if the item is still at the version the reader got: the put's
oribus transaction expects that version, so the commit's ORI check refuses it
otherwise (``ItemChanged``, an ``oribus.Conflict``: read again and redo the
change — a node's ``RetryPolicy(retry_on=oribus.Conflict)`` does exactly that).
A put of an item the reader never got is a plain last-writer-wins put, as in
LangGraph.

TTL (``supports_ttl``): an item put with ``ttl`` minutes expires that long after
its last write or (``refresh_ttl``) read; expired items are never returned and
``sweep_ttl``/``asweep_ttl`` deletes them. A refresh is written to a key of its
own beside the item, so it changes no item version and refuses nobody's put.

Key layout: ``oribus.integrations.langgraph.keys``. Semantic search (an
``index`` with embeddings) is not supported: ``query`` is ignored, as by
LangGraph's in-memory store without an index. A search reads every item under
its namespace prefix (filters are applied here, not on the bus): keep the
namespaces a search covers small.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, NamedTuple

from langgraph.store.base import (
    BaseStore,
    GetOp,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
    validate_op_namespace,
)

from oribus.client import AsyncSession, RetryPolicy, Transaction
from oribus.errors import Conflict, InvalidRequest
from oribus.integrations.langgraph.connection import (
    Bus,
    LoopBridge,
    RotatingSession,
    current_reader,
    open_bus,
)
from oribus.integrations.langgraph.keys import StoreKeys
from oribus.types import MAX_KEYS_PER_REQUEST

# Transaction retries when a commit was refused for a key other than the item itself (the
# namespace's key list or the namespace registry, which concurrent puts of other items change).
_RETRIES = 20
_READ_CHUNK = MAX_KEYS_PER_REQUEST // 4


class ItemChanged(Conflict):
    """A put or delete of a store item was refused: it changed since this reader got it.

    ``details``: ``namespace``, ``key``, ``read`` (the version this reader got) and
    ``current``. Get the item again and redo the change.
    """

    def __init__(self, namespace: tuple[str, ...], key: str, read: int, current: int) -> None:
        super().__init__(
            f"store item {key!r} in {namespace!r} changed since this task read it (read version "
            f"{read}, now {current}): get it again and redo the change",
            namespace=list(namespace), key=key, read=read, current=current)
        self.namespace = namespace
        self.key = key


class _Reads:
    """What one reader was given: item key -> version."""

    def __init__(self, owner: object) -> None:
        self.owner = owner  # the task (or thread) it belongs to
        self.versions: dict[str, int] = {}


class _Fetched(NamedTuple):
    key: str  # the item's oribus key
    item: Item | None  # None: absent or expired
    version: int
    ttl: float | None  # minutes




def _now() -> float:
    return time.time()


def _stamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _matches(value: Any, wanted: Any) -> bool:
    """LangGraph's filter rule: equal values, nested dicts matched key by key, and the
    operators $eq, $ne, $gt, $gte, $lt, $lte."""
    if isinstance(wanted, dict):
        if any(k.startswith("$") for k in wanted):
            return all(_compare(value, op, operand) for op, operand in wanted.items())
        return isinstance(value, dict) and all(_matches(value.get(k), v) for k, v in wanted.items())
    return bool(value == wanted)


def _compare(value: Any, op: str, operand: Any) -> bool:
    if op == "$eq":
        return bool(value == operand)
    if op == "$ne":
        return bool(value != operand)
    if value is None:
        return False
    if op == "$gt":
        return float(value) > float(operand)
    if op == "$gte":
        return float(value) >= float(operand)
    if op == "$lt":
        return float(value) < float(operand)
    if op == "$lte":
        return float(value) <= float(operand)
    raise ValueError(f"unsupported filter operator {op!r}")


def _namespace_matches(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = condition.path
    if len(namespace) < len(path):
        return False
    pairs = zip(namespace, path, strict=False) if condition.match_type == "prefix" \
        else zip(reversed(namespace), reversed(path), strict=False)
    return all(p == "*" or n == p for n, p in pairs)


class OribusStore(BaseStore):
    """A LangGraph store on oribus: a put after a get of the same item is checked by ORI.

    Example::

        import oribus
        from oribus.integrations.langgraph import OribusStore

        async with oribus.open_local("./data", agent="graphs") as bus:
            store = OribusStore(bus)
            graph = builder.compile(store=store)

    ``bus``: an oribus session (as for ``OribusSaver``); ``root``: the key prefix;
    ``ttl``: LangGraph's ``TTLConfig`` (``default_ttl`` in minutes, ``refresh_on_read``).
    """

    supports_ttl = True

    def __init__(self, bus: Bus, *, root: str = "lgs", ttl: TTLConfig | None = None) -> None:
        self._bridge = LoopBridge(bus)
        self._sessions = RotatingSession(self._bridge.session)
        self.keys = StoreKeys(root)
        self.ttl_config = ttl
        # what the current reader was given, in a context variable: it goes with the task
        self._reads: ContextVar[_Reads | None] = ContextVar(f"oribus_store_{id(self)}", default=None)

    @classmethod
    @asynccontextmanager
    async def from_conn_string(cls, conn: str, *, agent: str = "langgraph", root: str = "lgs",
                               ttl: TTLConfig | None = None, **options: Any) -> AsyncIterator[OribusStore]:
        """A store on a bus it opens and closes (``conn`` as for ``OribusSaver.from_conn_string``)."""
        async with open_bus(conn, agent=agent, **options) as bus:
            yield cls(bus, root=root, ttl=ttl)

    # ---- readers -----------------------------------------------------------------------

    def _reader(self) -> dict[str, int]:
        """What the current reader was given. A context inherits its parent's variables (a
        task its creator's, LangGraph's node contexts the run's): a reader other than the
        one those reads belong to starts its own."""
        reads = self._reads.get()
        if reads is None or reads.owner is not current_reader():
            reads = _Reads(current_reader())
            self._reads.set(reads)
        return reads.versions

    # ---- batch -------------------------------------------------------------------------

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        self._bridge.bind()
        return await self._batch(list(ops), self._reader())

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        # the reader is taken here, in the caller's context: the call runs on the session's loop
        return self._bridge.call(self._batch(list(ops), self._reader()))

    async def _batch(self, ops: list[Op], reads: dict[str, int]) -> list[Result]:
        for op in ops:
            validate_op_namespace(op)
        results: list[Result] = []
        for op in ops:
            if isinstance(op, GetOp):
                (found,) = await self._fetch([(tuple(op.namespace), op.key)])
                await self._hand_out([found], reads, op.refresh_ttl)  # absent too: a put then expects it absent
                results.append(found.item)
            elif isinstance(op, SearchOp):
                results.append(await self._search(op, reads))
            elif isinstance(op, ListNamespacesOp):
                results.append(await self._list_namespaces(op))
            elif isinstance(op, PutOp):
                await self._put(op, reads)
                results.append(None)
            else:
                raise ValueError(f"unknown store operation {type(op).__name__}")
        return results

    # ---- reads -------------------------------------------------------------------------

    async def _fetch(self, wanted: Sequence[tuple[tuple[str, ...], str]]) -> list[_Fetched]:
        """The items (None: absent or expired) with their versions and TTLs, read but not
        yet handed out (``_hand_out``)."""
        keys = self.keys
        item_keys = [keys.item(ns, k) for ns, k in wanted]
        out: list[_Fetched] = []
        now = _now()
        for start in range(0, len(item_keys), _READ_CHUNK):
            chunk = item_keys[start:start + _READ_CHUNK]
            got = await self._sessions.for_reading(2 * len(chunk)).get_many([*chunk, *(f"{k}/ttl" for k in chunk)])
            for (ns, key), ik in zip(wanted[start:start + _READ_CHUNK], chunk, strict=True):
                record = got[ik].value
                item = None
                if record is not None and not self._expired(record, got[f"{ik}/ttl"].value, now):
                    item = Item(value=record["value"], key=key, namespace=ns,
                                created_at=_stamp(record["created_at"]), updated_at=_stamp(record["updated_at"]))
                out.append(_Fetched(ik, item, got[ik].version, (record or {}).get("ttl")))
        return out

    async def _hand_out(self, fetched: Sequence[_Fetched], reads: dict[str, int], refresh: bool) -> None:
        """Remember what the reader was given (a later put of it is checked against it), and
        refresh the TTL of the items given."""
        now = _now()
        refreshes = {}
        for f in fetched:
            reads[f.key] = f.version
            if refresh and f.item is not None and f.ttl:
                refreshes[f"{f.key}/ttl"] = {"expires_at": now + f.ttl * 60}
        if refreshes:
            tx = self._sessions.for_reading(0).transaction()  # blind writes: never refused
            for k, v in refreshes.items():
                tx.put(k, v)
            await tx.commit()

    @staticmethod
    def _expired(record: dict[str, Any], refreshed: dict[str, Any] | None, now: float) -> bool:
        if record.get("expires_at") is None:
            return False
        expires = max(record["expires_at"], (refreshed or {}).get("expires_at") or 0)
        return bool(expires <= now)

    async def _namespaces(self) -> list[tuple[str, ...]]:
        registry = (await self._sessions.for_reading(1).get(self.keys.namespaces)).value or []
        return [tuple(ns) for ns in registry]

    async def _search(self, op: SearchOp, reads: dict[str, int]) -> list[SearchItem]:
        prefix = tuple(op.namespace_prefix)
        namespaces = [ns for ns in await self._namespaces() if ns[:len(prefix)] == prefix]
        if not namespaces:
            return []
        indexes = await self._sessions.for_reading(len(namespaces)).get_many(
            [self.keys.namespace(ns) for ns in namespaces])
        wanted = [(ns, k) for ns in namespaces
                  for k in (indexes[self.keys.namespace(ns)].value or {}).get("keys", [])]
        hits = [(f, f.item) for f in await self._fetch(wanted) if f.item is not None]
        if op.filter:
            filt = op.filter
            hits = [(f, i) for f, i in hits if all(_matches(i.value.get(k), v) for k, v in filt.items())]
        hits.sort(key=lambda hit: hit[1].updated_at, reverse=True)
        page = hits[op.offset:op.offset + op.limit]
        await self._hand_out([f for f, _ in page], reads, op.refresh_ttl)  # only what the reader was given
        return [SearchItem(namespace=i.namespace, key=i.key, value=i.value, created_at=i.created_at,
                           updated_at=i.updated_at) for _, i in page]

    async def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        namespaces = [ns for ns in await self._namespaces()
                      if all(_namespace_matches(c, ns) for c in op.match_conditions or ())]
        if op.max_depth is not None:
            namespaces = sorted({ns[:op.max_depth] for ns in namespaces})
        return namespaces[op.offset:op.offset + op.limit]

    # ---- writes ------------------------------------------------------------------------

    async def _put(self, op: PutOp, reads: dict[str, int]) -> None:
        keys = self.keys
        ns, key = tuple(op.namespace), op.key
        if op.value is not None and not isinstance(op.value, dict):
            raise InvalidRequest(f"a store value must be a dict, not {type(op.value).__name__}")
        item_key, index_key = keys.item(ns, key), keys.namespace(ns)

        async def attempt(session: AsyncSession) -> dict[str, int]:
            tx = session.transaction()
            got = await tx.get_many([item_key, index_key])
            current = got[item_key]
            read = reads.get(item_key)
            if read is not None:
                if current.version != read:
                    raise ItemChanged(ns, key, read, current.version)
                tx.expect(item_key, read)  # and the commit refuses it if it changes now
            item_keys: list[str] = list((got[index_key].value or {}).get("keys", []))
            now = _now()
            if op.value is None:
                tx.delete(item_key)
                tx.delete(f"{item_key}/ttl")
                if key in item_keys:
                    item_keys.remove(key)
                    if item_keys:
                        tx.put(index_key, {"keys": item_keys})
                    else:
                        tx.delete(index_key)
                        await self._unregister(tx, ns)
            else:
                created = (current.value or {}).get("created_at", now)
                ttl = op.ttl
                tx.put(item_key, {"value": dict(op.value), "created_at": created, "updated_at": now,
                                  "ttl": ttl, "expires_at": now + ttl * 60 if ttl else None})
                tx.delete(f"{item_key}/ttl")
                if key not in item_keys:
                    if not item_keys:
                        await self._register(tx, ns)
                    bisect.insort(item_keys, key)
                    tx.put(index_key, {"keys": item_keys})
            return await tx.commit()

        versions = await self._retrying(attempt, item_key, ns, key, reads)
        reads[item_key] = versions[item_key]

    async def _register(self, tx: Transaction, ns: tuple[str, ...]) -> None:
        registry = (await tx.get(self.keys.namespaces)).value or []
        if list(ns) not in registry:
            bisect.insort(registry, list(ns))
            tx.put(self.keys.namespaces, registry)

    async def _unregister(self, tx: Transaction, ns: tuple[str, ...]) -> None:
        registry = (await tx.get(self.keys.namespaces)).value or []
        if list(ns) in registry:
            registry.remove(list(ns))
            tx.put(self.keys.namespaces, registry)

    async def _retrying(self, attempt: Callable[[AsyncSession], Any], item_key: str,
                        ns: tuple[str, ...], key: str, reads: dict[str, int]) -> Any:
        policy = RetryPolicy(retries=_RETRIES)
        for n in range(_RETRIES + 1):
            try:
                return await attempt(self._sessions.for_reading(3))
            except ItemChanged:
                raise
            except Conflict as e:
                stale = {s.key: s for s in e.stale}
                if item_key in stale and item_key in reads:
                    raise ItemChanged(ns, key, reads[item_key], stale[item_key].current) from e
                if n == _RETRIES:
                    raise
                await asyncio.sleep(policy.delay(n))
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- TTL -------------------------------------------------------------------------

    async def asweep_ttl(self) -> int:
        """Delete every expired item; returns how many."""
        self._bridge.bind()
        expired: list[tuple[tuple[str, ...], str]] = []
        now = _now()
        for ns in await self._namespaces():
            index = (await self._sessions.for_reading(1).get(self.keys.namespace(ns))).value or {}
            item_keys = [self.keys.item(ns, k) for k in index.get("keys", [])]
            for start in range(0, len(item_keys), _READ_CHUNK):
                chunk = item_keys[start:start + _READ_CHUNK]
                got = await self._sessions.for_reading(2 * len(chunk)).get_many(
                    [*chunk, *(f"{k}/ttl" for k in chunk)])
                for k, ik in zip(index["keys"][start:start + _READ_CHUNK], chunk, strict=True):
                    record = got[ik].value
                    if record is not None and self._expired(record, got[f"{ik}/ttl"].value, now):
                        expired.append((ns, k))
        for ns, k in expired:
            await self._put(PutOp(ns, k, None), {})  # as a reader that read nothing: plain deletes
        return len(expired)

    def sweep_ttl(self) -> int:
        """Delete every expired item; returns how many (the sync face of ``asweep_ttl``)."""
        return self._bridge.call(self.asweep_ttl())
