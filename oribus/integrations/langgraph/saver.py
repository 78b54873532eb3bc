"""``OribusSaver``: a LangGraph checkpointer whose threads cannot be extended twice from one checkpoint.

Every LangGraph checkpointer stores what a run hands it; two runs of one thread
that started from the same checkpoint both store their next one, and whichever
the thread reads next "wins" — the other run's work is silently a dead branch.
Here a put that extends a checkpoint (the config's ``checkpoint_id``, which
LangGraph sets to the checkpoint the run loaded or last stored) is checked
against the thread's head, which the put reads in the same oribus transaction
as it writes, so the commit's ORI check covers the read:

- the parent is the thread's newest checkpoint: the put lands;
- the parent is older, and the thread has not moved since this run was handed that
  checkpoint (by ``get_tuple``, ``list`` or the put that stored it): a deliberate
  fork (time travel, ``update_state`` on a past checkpoint) — the put lands;
- otherwise another run extended the thread after this one read it: a race. By
  default (``on_race="reject"``) the put raises ``CheckpointRaced``, naming the
  checkpoint that got there first; ``on_race="rebase"`` stores the checkpoint as a
  child of the newest one instead; a callable decides case by case.

A put without a parent (the first checkpoint of a thread, or a deliberately new
line) is not a race.

"This run": what a run was handed is kept in a context variable, so it follows
LangGraph's run into the tasks (or threads) it starts for its puts, and another
caller reading the same checkpoint later (a UI listing the history while two
runs race) cannot make a stale parent look fresh. A read from a task (or
thread) other than the one whose memory it inherited starts a memory of its own. Two puts that pass these checks concurrently cannot both
commit against the same head: oribus refuses the second (it read a head that
changed), which then reads the head again and is judged as above.

Key layout: ``oribus.integrations.langgraph.keys``. Limits that follow from it:
each channel value, and the pending writes of one checkpoint together, are one
oribus value (``max_value_bytes``, 1 MiB by default); the head of a thread
namespace lists its checkpoint ids and is rewritten by every put, so a put costs
time linear in the thread's length (about 25,000 checkpoints fit the limit;
``delete_thread`` starts a thread over).
"""

from __future__ import annotations

import asyncio
import bisect
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, Literal, NamedTuple, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    get_checkpoint_id,
    get_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from oribus.client import DELETE, AsyncSession, RetryPolicy
from oribus.errors import Conflict
from oribus.integrations.langgraph.connection import (
    Bus,
    LoopBridge,
    RotatingSession,
    current_reader,
    open_bus,
)
from oribus.integrations.langgraph.keys import CheckpointKeys
from oribus.types import MAX_KEYS_PER_REQUEST

RaceDecision = Literal["reject", "rebase"]
RacePolicy = RaceDecision | Callable[["CheckpointRaced"], RaceDecision]

# How many checkpoint ids one run's memory keeps with the head version it was handed them at
# (the fork-or-race test above); beyond it the oldest are forgotten, and a put extending
# a forgotten non-newest checkpoint counts as a race.
_SEEN_LIMIT = 10_000
# Checkpoints loaded per round trip when listing.
_LIST_PAGE = 50
# Transaction retries when a commit was refused for a key other than the thread head
# (a concurrent put of another namespace registering itself, another writer's writes).
_RETRIES = 20


class CheckpointRaced(Conflict):
    """A checkpoint put was refused: another run extended the thread first.

    ``details``: ``thread_id``, ``checkpoint_ns``, ``checkpoint_id`` (the refused one),
    ``parent_id`` (what it extended) and ``newest_id`` (the thread's newest checkpoint,
    the one it raced). Reload the thread (``get_tuple`` without a checkpoint id, i.e.
    run the graph again) to continue from the newest checkpoint.
    """

    def __init__(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str,
                 parent_id: str, newest_id: str | None) -> None:
        where = f"thread {thread_id!r}" + (f" (namespace {checkpoint_ns!r})" if checkpoint_ns else "")
        newest = f"checkpoint {newest_id}" if newest_id else "no checkpoint (it was deleted)"
        super().__init__(
            f"checkpoint {checkpoint_id} of {where} refused: it extends {parent_id}, but another "
            f"run extended the thread since this run read it; its newest is now {newest}",
            thread_id=thread_id, checkpoint_ns=checkpoint_ns, checkpoint_id=checkpoint_id,
            parent_id=parent_id, newest_id=newest_id,
        )
        self.thread_id = thread_id
        self.checkpoint_ns = checkpoint_ns
        self.checkpoint_id = checkpoint_id
        self.parent_id = parent_id
        self.newest_id = newest_id


class RunMemory:
    """The checkpoints one run was handed: (thread, namespace, id) -> the head's version then."""

    def __init__(self, owner: object) -> None:
        self.owner = owner  # the task (or thread) that made the first read
        self.heads: OrderedDict[tuple[str, str, str], int] = OrderedDict()

    def remember(self, thread_id: str, ns: str, checkpoint_id: str, head_version: int) -> None:
        key = (thread_id, ns, checkpoint_id)
        self.heads[key] = head_version
        self.heads.move_to_end(key)
        while len(self.heads) > _SEEN_LIMIT:
            self.heads.popitem(last=False)

    def head_version(self, thread_id: str, ns: str, checkpoint_id: str) -> int | None:
        return self.heads.get((thread_id, ns, checkpoint_id))

    def forget_thread(self, thread_id: str) -> None:
        for key in [k for k in self.heads if k[0] == thread_id]:
            del self.heads[key]


class _ThreadContents(NamedTuple):
    thread_id: str
    # namespace -> (checkpoint ids ascending, id -> checkpoint record, id -> pending writes)
    namespaces: dict[str, tuple[list[str], dict[str, Any], dict[str, Any]]]


def _where(config: RunnableConfig) -> tuple[str, str, str | None]:
    """(thread id, checkpoint namespace, checkpoint id or None) of a config."""
    conf = config.get("configurable") or {}
    if conf.get("thread_id") is None:
        raise ValueError("the config has no configurable.thread_id: a checkpointer needs one")
    return str(conf["thread_id"]), str(conf.get("checkpoint_ns") or ""), get_checkpoint_id(config)


def _config(thread_id: str, ns: str, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint_id}}


class OribusSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer on oribus, refusing a second run's extension of a thread.

    Sync and async: ``get_tuple``, ``list``, ``put``, ``put_writes``, ``delete_thread``,
    ``copy_thread`` (``delete_for_runs`` and ``prune`` are not implemented).

    Example::

        import oribus
        from oribus.integrations.langgraph import OribusSaver

        async with oribus.open_local("./data", agent="graphs") as bus:
            graph = builder.compile(checkpointer=OribusSaver(bus))
            await graph.ainvoke(inputs, {"configurable": {"thread_id": "t1"}})

        # or, opening the bus itself (a data directory, or "host:port" of a running bus):
        async with OribusSaver.from_conn_string("./data") as saver: ...

    ``bus``: an oribus session (``oribus.open_local``, ``oribus.connect``, or their
    sync twins ``open_local_sync``/``Client``, which the synchronous methods need).
    The saver reads and commits through sessions of its own on that bus (same agent).
    ``on_race``: what a put that lost a race does (module docstring): ``"reject"``
    (raise ``CheckpointRaced``), ``"rebase"`` (store it on top of the newest
    checkpoint), or a callable given the ``CheckpointRaced`` that returns one of them.
    ``root``: the key prefix everything is stored under.
    """

    def __init__(self, bus: Bus, *, on_race: RacePolicy = "reject", root: str = "lg",
                 serde: SerializerProtocol | None = None) -> None:
        super().__init__(serde=serde)
        if not callable(on_race) and on_race not in ("reject", "rebase"):
            raise ValueError(f"on_race must be 'reject', 'rebase' or a callable, not {on_race!r}")
        self._bridge = LoopBridge(bus)
        self._sessions = RotatingSession(self._bridge.session)
        self._on_race = on_race
        self.keys = CheckpointKeys(root)
        # what the current run was handed (module docstring, "This run")
        self._memory: ContextVar[RunMemory | None] = ContextVar(f"oribus_saver_{id(self)}", default=None)

    @classmethod
    @asynccontextmanager
    async def from_conn_string(cls, conn: str, *, agent: str = "langgraph", on_race: RacePolicy = "reject",
                               root: str = "lg", **options: Any) -> AsyncIterator[OribusSaver]:
        """A saver on a bus it opens and closes: ``conn`` is ``host:port`` of a running bus
        (``oribus.connect``) or a data directory (``oribus.open_local``); ``options`` go to that call."""
        async with open_bus(conn, agent=agent, **options) as bus:
            yield cls(bus, on_race=on_race, root=root)

    # ---- what the saver remembers of heads it handed out -----------------------------

    def _run_memory(self, *, reading: bool) -> RunMemory:
        """The current run's memory; a read by another task (or thread) than the one whose
        memory this context inherited starts a memory of its own."""
        memory = self._memory.get()
        if memory is None or (reading and memory.owner is not current_reader()):
            memory = RunMemory(current_reader())
            self._memory.set(memory)
        return memory

    def _decide(self, race: CheckpointRaced) -> RaceDecision:
        decision = self._on_race(race) if callable(self._on_race) else self._on_race
        if decision not in ("reject", "rebase"):
            raise ValueError(f"the on_race policy returned {decision!r}, not 'reject' or 'rebase'")
        return decision

    # ---- serialisation ------------------------------------------------------------

    def _dump(self, obj: Any) -> list[Any]:
        kind, data = self.serde.dumps_typed(obj)
        return [kind, data]

    def _load(self, stored: Sequence[Any]) -> Any:
        return self.serde.loads_typed((stored[0], stored[1]))

    # ---- reads -----------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        self._bridge.bind()
        return await self._get_tuple(config, self._run_memory(reading=True))

    async def _get_tuple(self, config: RunnableConfig, memory: RunMemory) -> CheckpointTuple | None:
        thread_id, ns, checkpoint_id = _where(config)
        head_key = self.keys.head(thread_id, ns)
        if checkpoint_id is None:
            head = await self._sessions.for_reading(1).get(head_key)
            ids = head.value["ids"] if head.value else []
            if not ids:
                return None
            checkpoint_id = ids[-1]
            head_version = head.version
            extra: list[str] = []
        else:
            extra = [head_key]
        tuples = await self._load_tuples(thread_id, ns, [checkpoint_id], extra)
        if not tuples:
            return None
        tup, versions = tuples[0]
        if extra:
            head_version = versions[head_key]
        memory.remember(thread_id, ns, checkpoint_id, head_version)
        return tup

    async def _load_tuples(self, thread_id: str, ns: str, ids: Sequence[str], extra: Sequence[str] = ()
                           ) -> list[tuple[CheckpointTuple, dict[str, int]]]:
        """The tuples of these checkpoints (missing ones left out), in ``ids``' order, each
        with the versions of ``extra`` keys read in the same round trip."""
        keys = self.keys
        record_keys = [keys.checkpoint(thread_id, ns, i) for i in ids]
        writes_keys = [keys.writes(thread_id, ns, i) for i in ids]
        wanted = [*record_keys, *writes_keys, *extra]
        items = await self._sessions.for_reading(len(wanted)).get_many(wanted)
        extra_versions = {k: items[k].version for k in extra}
        found: list[tuple[str, dict[str, Any], list[Any], Any]] = []
        blob_keys: list[str] = []
        for cid, rk, wk in zip(ids, record_keys, writes_keys, strict=True):
            record = items[rk].value
            if record is None:
                continue
            checkpoint = self._load(record["checkpoint"])
            found.append((cid, record, items[wk].value or [], checkpoint))
            blob_keys += [keys.blob(thread_id, ns, ch, v) for ch, v in checkpoint["channel_versions"].items()]
        blobs = await self._sessions.for_reading(len(blob_keys)).get_many(blob_keys) if blob_keys else {}
        out = []
        for cid, record, writes, checkpoint in found:
            values = {}
            for ch, v in checkpoint["channel_versions"].items():
                blob = blobs[keys.blob(thread_id, ns, ch, v)].value
                if blob is not None and blob[0] != "empty":
                    values[ch] = self._load(blob)
            checkpoint["channel_values"] = values
            parent = record.get("parent")
            out.append((CheckpointTuple(
                config=_config(thread_id, ns, cid),
                checkpoint=cast(Checkpoint, checkpoint),
                metadata=cast(CheckpointMetadata, self._load(record["metadata"])),
                parent_config=_config(thread_id, ns, parent) if parent else None,
                pending_writes=self._pending_writes(writes),
            ), extra_versions))
        return out

    def _pending_writes(self, entries: list[list[Any]]) -> list[PendingWrite]:
        # entries: [task_id, idx, channel, [type, bytes], task_path]
        ordered = sorted(entries, key=lambda e: writes_sort_key(e[4], e[0], e[1]))
        return [(e[0], e[2], self._load(e[3])) for e in ordered]

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None, limit: int | None = None,
                    ) -> AsyncIterator[CheckpointTuple]:
        self._bridge.bind()
        async for tup in self._list(config, filter, before, limit, self._run_memory(reading=True)):
            yield tup

    async def _list(self, config: RunnableConfig | None, filter: dict[str, Any] | None,
                    before: RunnableConfig | None, limit: int | None, memory: RunMemory,
                    ) -> AsyncIterator[CheckpointTuple]:
        keys = self.keys
        session = self._sessions.for_reading(1)
        only_id: str | None = None
        if config is None:
            threads = (await session.get(keys.threads)).value or []
        else:
            thread_id, _, only_id = _where(config)
            threads = [thread_id]
        conf = (config or {}).get("configurable") or {}
        # the namespaces to list: the config's, else every namespace of each thread
        heads: list[tuple[str, str]] = []
        if config is not None and conf.get("checkpoint_ns") is not None:
            heads = [(threads[0], str(conf["checkpoint_ns"]))]
        elif threads:
            registry = await self._sessions.for_reading(len(threads)).get_many(
                [keys.thread(t) for t in threads])
            heads = [(t, ns) for t in threads for ns in (registry[keys.thread(t)].value or {}).get("ns", [])]
        if not heads:
            return
        head_items = await self._sessions.for_reading(len(heads)).get_many([keys.head(t, ns) for t, ns in heads])
        before_id = get_checkpoint_id(before) if before else None
        candidates = sorted(
            ((cid, t, ns) for t, ns in heads for cid in (head_items[keys.head(t, ns)].value or {}).get("ids", [])
             if (only_id is None or cid == only_id) and (before_id is None or cid < before_id)),
            reverse=True,
        )
        remaining = limit
        for start in range(0, len(candidates), _LIST_PAGE):
            page = candidates[start:start + _LIST_PAGE]
            # load per (thread, namespace), then put back in newest-first order
            loaded: dict[tuple[str, str, str], CheckpointTuple] = {}
            for t, ns in dict.fromkeys((t, ns) for _, t, ns in page):
                ids = [cid for cid, pt, pns in page if (pt, pns) == (t, ns)]
                for tup, _ in await self._load_tuples(t, ns, ids):
                    loaded[(t, ns, tup.config["configurable"]["checkpoint_id"])] = tup
            for cid, t, ns in page:
                found = loaded.get((t, ns, cid))
                if found is None or (filter and not all(found.metadata.get(k) == v
                                                        for k, v in filter.items())):
                    continue
                head_version = head_items[keys.head(t, ns)].version
                memory.remember(t, ns, cid, head_version)
                yield found
                if remaining is not None:
                    remaining -= 1
                    if remaining <= 0:
                        return

    # ---- writes ----------------------------------------------------------------------

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        self._bridge.bind()
        return await self._put(config, checkpoint, metadata, new_versions, self._run_memory(reading=False))

    async def _put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
                   new_versions: ChannelVersions, memory: RunMemory) -> RunnableConfig:
        keys = self.keys
        thread_id, ns, parent_id = _where(config)
        checkpoint_id = checkpoint["id"]
        values = checkpoint.get("channel_values") or {}
        stored = {k: v for k, v in checkpoint.items() if k != "channel_values"}
        blobs = {
            keys.blob(thread_id, ns, ch, version): self._dump(values[ch]) if ch in values else ["empty", b""]
            for ch, version in new_versions.items()
        }
        record: dict[str, Any] = {
            "checkpoint": self._dump(stored),
            "metadata": self._dump(get_checkpoint_metadata(config, metadata)),
            "parent": parent_id,
            # the channel values this checkpoint introduced (delete_thread, copy_thread)
            "blobs": [[ch, str(version)] for ch, version in new_versions.items()],
        }
        head_key, thread_key = keys.head(thread_id, ns), keys.thread(thread_id)

        async def attempt(session: AsyncSession) -> dict[str, int]:
            tx = session.transaction()
            got = await tx.get_many([head_key, thread_key])
            head = got[head_key]
            ids: list[str] = list(head.value["ids"]) if head.value else []
            newest = ids[-1] if ids else None
            record["parent"] = parent_id
            if parent_id is not None and newest != parent_id and (
                    memory.head_version(thread_id, ns, parent_id) != head.version):
                race = CheckpointRaced(thread_id, ns, checkpoint_id, parent_id, newest)
                if self._decide(race) == "reject":
                    raise race
                record["parent"] = newest
            if checkpoint_id not in ids:
                bisect.insort(ids, checkpoint_id)
            tx.put(head_key, {"ids": ids})
            namespaces = (got[thread_key].value or {}).get("ns")
            if namespaces is None:  # a new thread: register it for list(None)
                threads = (await tx.get(keys.threads)).value or []
                if thread_id not in threads:
                    bisect.insort(threads, thread_id)
                    tx.put(keys.threads, threads)
            if ns not in (namespaces or []):
                tx.put(thread_key, {"ns": sorted([*(namespaces or []), ns])})
            tx.put(keys.checkpoint(thread_id, ns, checkpoint_id), record)
            for k, blob in blobs.items():
                tx.put(k, blob)
            return await tx.commit()

        versions = await self._retrying(attempt)
        memory.remember(thread_id, ns, checkpoint_id, versions[head_key])
        return _config(thread_id, ns, checkpoint_id)

    async def _retrying(self, attempt: Callable[[AsyncSession], Any]) -> Any:
        """``attempt`` in a fresh transaction until it commits: a refused commit read a key
        another writer changed, and the next attempt reads it again (and a put then judges
        the thread head again). ``CheckpointRaced`` and other errors are raised at once."""
        policy = RetryPolicy(retries=_RETRIES)
        for n in range(_RETRIES + 1):
            try:
                return await attempt(self._sessions.for_reading(3))
            except CheckpointRaced:
                raise
            except Conflict:
                if n == _RETRIES:
                    raise
                await asyncio.sleep(policy.delay(n))
        raise AssertionError("unreachable")  # pragma: no cover

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                          task_path: str = "") -> None:
        self._bridge.bind()
        thread_id, ns, checkpoint_id = _where(config)
        if checkpoint_id is None:
            raise ValueError("put_writes needs the config of a stored checkpoint (configurable.checkpoint_id)")
        key = self.keys.writes(thread_id, ns, checkpoint_id)
        # Special channels (errors, interrupts, ...) have fixed negative indices and are
        # replaced; a regular write already stored for (task, index) is kept, as a retried
        # task must not record its writes twice.
        replace = all(ch in WRITES_IDX_MAP for ch, _ in writes)
        new = [[task_id, WRITES_IDX_MAP.get(ch, i), ch, self._dump(value), task_path]
               for i, (ch, value) in enumerate(writes)]

        async def attempt(session: AsyncSession) -> None:
            tx = session.transaction()
            entries = {(e[0], e[1]): e for e in (await tx.get(key)).value or []}
            changed = False
            for entry in new:
                if replace or (entry[0], entry[1]) not in entries:
                    entries[(entry[0], entry[1])] = entry
                    changed = True
            if changed:
                tx.put(key, list(entries.values()))
                await tx.commit()

        await self._retrying(attempt)

    async def adelete_thread(self, thread_id: str) -> None:
        self._bridge.bind()
        await self._delete_thread(thread_id, self._run_memory(reading=False))

    async def _thread(self, thread_id: str) -> _ThreadContents:
        """Everything stored for one thread, read (not in a transaction) namespace by namespace."""
        keys = self.keys
        namespaces = ((await self._sessions.for_reading(1).get(keys.thread(thread_id))).value or {}).get("ns", [])
        heads = await self._sessions.for_reading(len(namespaces)).get_many(
            [keys.head(thread_id, ns) for ns in namespaces]) if namespaces else {}
        contents = _ThreadContents(thread_id, {})
        for ns in namespaces:
            ids = (heads[keys.head(thread_id, ns)].value or {}).get("ids", [])
            records: dict[str, Any] = {}
            writes: dict[str, Any] = {}
            for start in range(0, len(ids), MAX_KEYS_PER_REQUEST // 4):
                chunk = ids[start:start + MAX_KEYS_PER_REQUEST // 4]
                wanted = [*(keys.checkpoint(thread_id, ns, i) for i in chunk),
                          *(keys.writes(thread_id, ns, i) for i in chunk)]
                got = await self._sessions.for_reading(len(wanted)).get_many(wanted)
                for i in chunk:
                    records[i] = got[keys.checkpoint(thread_id, ns, i)].value
                    writes[i] = got[keys.writes(thread_id, ns, i)].value
            contents.namespaces[ns] = (ids, records, writes)
        return contents

    def _blob_keys(self, thread_id: str, ns: str, record: dict[str, Any] | None) -> list[str]:
        """The channel values a checkpoint introduced (its record lists them)."""
        return [self.keys.blob(thread_id, ns, ch, v) for ch, v in (record or {}).get("blobs", [])]

    async def _write_in_chunks(self, writes: dict[str, Any]) -> None:
        """Plain writes (``oribus.DELETE`` deletes), a bounded number per commit."""
        items = list(writes.items())
        for start in range(0, len(items), MAX_KEYS_PER_REQUEST // 2):
            tx = self._sessions.for_reading(0).transaction()
            for k, v in items[start:start + MAX_KEYS_PER_REQUEST // 2]:
                tx.put(k, v)
            await tx.commit()

    async def _delete_thread(self, thread_id: str, memory: RunMemory) -> None:
        keys = self.keys
        thread_id = str(thread_id)
        contents = await self._thread(thread_id)
        data: dict[str, Any] = {}
        for ns, (ids, records, _) in contents.namespaces.items():
            for i in ids:
                for k in [keys.checkpoint(thread_id, ns, i), keys.writes(thread_id, ns, i),
                          *self._blob_keys(thread_id, ns, records[i])]:
                    data[k] = DELETE
        # The checkpoints go first; the heads and registries last, in one commit, so a
        # reader sees the thread either whole or gone (a listing skips missing records).
        await self._write_in_chunks(data)

        async def attempt(session: AsyncSession) -> None:
            tx = session.transaction()
            threads = (await tx.get(keys.threads)).value or []
            if thread_id in threads:
                threads.remove(thread_id)
                tx.put(keys.threads, threads)
            for ns in contents.namespaces:
                tx.delete(keys.head(thread_id, ns))
            tx.delete(keys.thread(thread_id))
            await tx.commit()

        if contents.namespaces:
            await self._retrying(attempt)
        memory.forget_thread(thread_id)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, channel value and pending write of one thread to another
        (the target keeps what it had; its heads gain the copied ids)."""
        self._bridge.bind()
        keys = self.keys
        src, dst = str(source_thread_id), str(target_thread_id)
        contents = await self._thread(src)
        if not contents.namespaces:
            return
        blob_keys = [k for ns, (ids, records, _) in contents.namespaces.items() for i in ids
                     for k in self._blob_keys(src, ns, records[i])]
        blobs: dict[str, Any] = {}
        for start in range(0, len(blob_keys), MAX_KEYS_PER_REQUEST // 2):
            chunk = blob_keys[start:start + MAX_KEYS_PER_REQUEST // 2]
            got = await self._sessions.for_reading(len(chunk)).get_many(chunk)
            blobs.update({k: got[k].value for k in chunk})
        data: dict[str, Any] = {}
        for ns, (ids, records, writes) in contents.namespaces.items():
            for i in ids:
                if records[i] is None:
                    continue
                data[keys.checkpoint(dst, ns, i)] = records[i]
                if writes[i] is not None:
                    data[keys.writes(dst, ns, i)] = writes[i]
                for (ch, v), k in zip(records[i].get("blobs", []), self._blob_keys(src, ns, records[i]),
                                      strict=True):
                    if blobs.get(k) is not None:
                        data[keys.blob(dst, ns, ch, v)] = blobs[k]
        # the data first, then the target's heads and registries in one commit
        await self._write_in_chunks(data)

        async def attempt(session: AsyncSession) -> None:
            tx = session.transaction()
            heads = [keys.head(dst, ns) for ns in contents.namespaces]
            got = await tx.get_many([keys.thread(dst), keys.threads, *heads])
            for ns, (ids, records, _) in contents.namespaces.items():
                merged = set((got[keys.head(dst, ns)].value or {}).get("ids", []))
                merged.update(i for i in ids if records[i] is not None)
                tx.put(keys.head(dst, ns), {"ids": sorted(merged)})
            namespaces = set((got[keys.thread(dst)].value or {}).get("ns", [])) | set(contents.namespaces)
            tx.put(keys.thread(dst), {"ns": sorted(namespaces)})
            threads = got[keys.threads].value or []
            if dst not in threads:
                bisect.insort(threads, dst)
                tx.put(keys.threads, threads)
            await tx.commit()

        await self._retrying(attempt)

    # ---- the synchronous face (LangGraph's graph.invoke) -------------------------------

    # The memory is taken here, in the caller's context: the coroutine runs on the session's
    # loop, in a task (and context) of its own.

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._bridge.call(self._get_tuple(config, self._run_memory(reading=True)))

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None) -> Iterator[CheckpointTuple]:
        memory = self._run_memory(reading=True)

        async def collect() -> list[CheckpointTuple]:
            return [t async for t in self._list(config, filter, before, limit, memory)]

        return iter(self._bridge.call(collect()))

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        return self._bridge.call(
            self._put(config, checkpoint, metadata, new_versions, self._run_memory(reading=False)))

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                   task_path: str = "") -> None:
        self._bridge.call(self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._bridge.call(self._delete_thread(thread_id, self._run_memory(reading=False)))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._bridge.call(self.acopy_thread(source_thread_id, target_thread_id))

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Channel versions as sortable strings: a zero-padded counter, then a random
        fraction (two writers of one version from different runs tell apart)."""
        if current is None:
            number = 0
        elif isinstance(current, int):
            number = current
        else:
            number = int(str(current).split(".")[0])
        return f"{number + 1:032}.{random.random():016}"
