"""OribusStore: LangGraph's BaseStore contract (checked against its in-memory store), TTL, and a
read-modify-write of one memory item by two parallel branches."""

from __future__ import annotations

import asyncio
import operator
import threading
from collections import Counter
from typing import Annotated, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    ListNamespacesOp,
    PutOp,
    SearchOp,
)
from langgraph.store.memory import InMemoryStore
from langgraph.types import RetryPolicy

import oribus
from oribus.integrations.langgraph import ItemChanged, OribusStore
from oribus.integrations.langgraph import store as store_module


@pytest.fixture
async def bus(data_dir):
    async with oribus.open_local(data_dir, shards=2, agent="graphs", unsafe_no_fsync=True) as b:
        yield b


@pytest.fixture
async def store(bus):
    return OribusStore(bus)


def as_rows(result):
    """What a store answer says, without timestamps (each store stamps its own)."""
    if result is None:
        return None
    if isinstance(result, list):
        return [as_rows(r) for r in result]
    if isinstance(result, tuple):
        return result
    return (result.namespace, result.key, result.value)


SCRIPT = [
    PutOp(("users", "alice"), "profile", {"name": "Alice", "age": 30, "tags": {"lang": "en"}}),
    PutOp(("users", "bob"), "profile", {"name": "Bob", "age": 25, "tags": {"lang": "fr"}}),
    PutOp(("users", "bob"), "notes", {"text": "likes tea", "age": 99}),
    PutOp(("docs", "v1"), "readme", {"title": "hello", "score": 4.5}),
    PutOp(("docs", "v2"), "readme", {"title": "hello", "score": 2.0}),
    PutOp(("docs", "v2", "draft"), "todo", {"title": "later", "score": 1.0}),
    GetOp(("users", "alice"), "profile"),
    GetOp(("users", "alice"), "missing"),
    SearchOp(("users",), filter={"age": {"$gte": 26}}),
    SearchOp(("users",), filter={"tags": {"lang": "fr"}}),
    SearchOp(("users", "bob"), filter={"age": {"$ne": 25}}),
    SearchOp(("docs",), filter={"title": "hello", "score": {"$gt": 3}}),
    SearchOp(("docs",), filter={"score": {"$lt": 3, "$gte": 1.0}}),
    SearchOp((), filter={"name": "Alice"}),
    ListNamespacesOp(),
    ListNamespacesOp(match_conditions=(("prefix", ("docs",)),)),
    ListNamespacesOp(match_conditions=(("suffix", ("*", "readme")),)),
    ListNamespacesOp(match_conditions=(("suffix", ("v2",)),)),
    ListNamespacesOp(match_conditions=(("prefix", ("docs", "*")),), max_depth=2),
    ListNamespacesOp(max_depth=1),
    ListNamespacesOp(limit=2, offset=1),
    PutOp(("users", "bob"), "notes", None),
    GetOp(("users", "bob"), "notes"),
    SearchOp(("users", "bob")),
    PutOp(("users", "alice"), "profile", {"name": "Alice", "age": 31}),
    GetOp(("users", "alice"), "profile"),
]


def normalise(op, result):
    # both stores order search hits by their own rule when no query ranks them; compare as sets
    if isinstance(op, SearchOp):
        return sorted(as_rows(result), key=repr)
    return as_rows(result)


async def test_answers_what_the_in_memory_store_answers(store):
    from langgraph.store.base import MatchCondition

    ops = [ListNamespacesOp(match_conditions=tuple(MatchCondition(*c) for c in op.match_conditions),
                            max_depth=op.max_depth, limit=op.limit, offset=op.offset)
           if isinstance(op, ListNamespacesOp) and op.match_conditions else op for op in SCRIPT]
    memory = InMemoryStore()
    for op in ops:  # one at a time: a batch may apply its puts after its reads
        (expected,) = await memory.abatch([op])
        (got,) = await store.abatch([op])
        assert normalise(op, got) == normalise(op, expected), op


async def test_an_emptied_namespace_is_no_longer_listed(store):
    # as LangGraph's Postgres store (namespaces are those of stored items); its in-memory
    # store keeps listing a namespace after its last item is deleted
    await store.aput(("a", "b"), "k", {"v": 1})
    await store.aput(("a",), "k", {"v": 1})
    await store.adelete(("a", "b"), "k")
    assert await store.alist_namespaces() == [("a",)]
    assert await store.aget(("a", "b"), "k") is None


async def test_one_batch_answers_in_order(store):
    results = await store.abatch([
        PutOp(("a",), "k", {"v": 1}), GetOp(("a",), "k"), ListNamespacesOp(), SearchOp(("a",)),
    ])
    assert results[0] is None
    assert as_rows(results[1]) == (("a",), "k", {"v": 1})
    assert results[2] == [("a",)]
    assert as_rows(results[3]) == [(("a",), "k", {"v": 1})]


async def test_items_carry_their_times_and_search_items_no_score(store):
    await store.aput(("n",), "k", {"v": 1})
    first = await store.aget(("n",), "k")
    await asyncio.sleep(0.01)
    await store.aput(("n",), "k", {"v": 2})
    second = await store.aget(("n",), "k")
    assert second.created_at == first.created_at and second.updated_at > first.updated_at
    assert first.created_at.tzinfo is not None
    (hit,) = await store.asearch(("n",))
    assert hit.score is None and hit.value == {"v": 2}


async def test_search_limit_and_offset(store):
    for i in range(5):
        await store.aput(("page",), f"k{i}", {"i": i})
    everything = await store.asearch(("page",), limit=10)
    assert len(everything) == 5
    assert [h.key for h in await store.asearch(("page",), limit=2, offset=1)] == [h.key for h in everything[1:3]]


async def test_namespace_rules_of_the_base_store(store):
    for bad in [(), ("",), ("a.b",), ("langgraph", "x")]:
        with pytest.raises(InvalidNamespaceError):
            await store.aput(bad, "k", {"v": 1})
    with pytest.raises(InvalidNamespaceError):
        await store.abatch([GetOp(("a.b",), "k")])


async def test_awkward_names_stay_apart(store):
    await store.aput(("a/b",), "c", {"v": 1})
    await store.aput(("a", "b"), "c", {"v": 2})
    await store.aput(("~",), "%7E", {"v": 3})
    assert (await store.aget(("a/b",), "c")).value == {"v": 1}
    assert (await store.aget(("a", "b"), "c")).value == {"v": 2}
    assert (await store.aget(("~",), "%7E")).value == {"v": 3}
    assert await store.aget(("~",), "~") is None


async def test_ttl_expires_refreshes_and_sweeps(bus, monkeypatch):
    clock = [1_000_000.0]
    monkeypatch.setattr(store_module, "_now", lambda: clock[0])
    store = OribusStore(bus, ttl={"default_ttl": 1.0, "refresh_on_read": True})
    assert store.supports_ttl
    await store.aput(("t",), "short", {"v": 1})           # default: 1 minute
    await store.aput(("t",), "long", {"v": 2}, ttl=10)
    await store.aput(("t",), "forever", {"v": 3}, ttl=None)
    clock[0] += 50
    assert (await store.aget(("t",), "short")).value == {"v": 1}  # read: refreshed to +60 s
    clock[0] += 50
    assert (await store.aget(("t",), "short", refresh_ttl=False)).value == {"v": 1}
    clock[0] += 20
    assert await store.aget(("t",), "short") is None
    assert sorted(h.key for h in await store.asearch(("t",))) == ["forever", "long"]
    assert await store.asweep_ttl() == 1
    assert await store.alist_namespaces() == [("t",)]
    clock[0] += 10 * 60
    assert await store.asweep_ttl() == 1
    assert [h.key for h in await store.asearch(("t",))] == ["forever"]


async def test_a_put_after_a_get_is_refused_if_the_item_changed(bus, store):
    other = OribusStore(bus.session(agent="other"))
    await store.aput(("mem",), "fact", {"n": 1})
    item = await store.aget(("mem",), "fact")
    await other.aput(("mem",), "fact", {"n": 100})
    with pytest.raises(ItemChanged) as refused:
        await store.aput(("mem",), "fact", {"n": item.value["n"] + 1})
    assert isinstance(refused.value, oribus.Conflict)
    assert refused.value.key == "fact" and "'fact'" in str(refused.value)
    assert (await store.aget(("mem",), "fact")).value == {"n": 100}
    # read again, redo: lands
    item = await store.aget(("mem",), "fact")
    await store.aput(("mem",), "fact", {"n": item.value["n"] + 1})
    assert (await other.aget(("mem",), "fact")).value == {"n": 101}
    # a delete after a get is checked the same way; a blind put is not
    await other.aput(("mem",), "fact", {"n": 0})
    with pytest.raises(ItemChanged):
        await store.adelete(("mem",), "fact")
    await other.aput(("mem",), "fresh", {"blind": True})
    await other.aput(("mem",), "fresh", {"blind": 2})


async def test_a_change_inside_the_commit_window_is_refused_by_the_commit(bus, store, monkeypatch):
    from oribus.client.session import Transaction

    other = OribusStore(bus.session(agent="other"))
    await store.aput(("mem",), "fact", {"n": 1})
    item = await store.aget(("mem",), "fact")
    original = Transaction.commit
    armed = [True]
    refusals: list[oribus.Conflict] = []

    async def commit(tx: Transaction) -> dict[str, int]:
        if armed[0]:
            armed[0] = False
            await other.aput(("mem",), "fact", {"n": 50})  # lands between the put's read and commit
        try:
            return await original(tx)
        except oribus.Conflict as e:
            refusals.append(e)
            raise

    monkeypatch.setattr(Transaction, "commit", commit)
    with pytest.raises(ItemChanged):
        await store.aput(("mem",), "fact", {"n": item.value["n"] + 1})
    item_key = store.keys.item(("mem",), "fact")
    assert {s.key for s in refusals[0].stale} == {item_key}
    assert (item_key, "expected_version") in {(s.key, s.reason) for s in refusals[0].stale}
    assert (await other.aget(("mem",), "fact")).value == {"n": 50}


async def test_a_search_hands_out_only_the_items_it_returns(bus, store):
    other = OribusStore(bus.session(agent="other"))
    await store.aput(("s",), "shown", {"kind": "a"})
    await store.aput(("s",), "hidden", {"kind": "b"})
    fresh = OribusStore(bus.session(agent="reader"))
    assert [h.key for h in await fresh.asearch(("s",), filter={"kind": "a"})] == ["shown"]
    await other.aput(("s",), "shown", {"kind": "a", "edited": True})
    await other.aput(("s",), "hidden", {"kind": "b", "edited": True})
    await fresh.aput(("s",), "hidden", {"kind": "b", "mine": True})  # never given to it: a plain put
    with pytest.raises(ItemChanged):
        await fresh.aput(("s",), "shown", {"kind": "a", "mine": True})


async def test_readers_are_tasks(store):
    """Two tasks of one store: each is checked against what it read itself."""
    await store.aput(("mem",), "x", {"n": 0})
    both_read = asyncio.Barrier(2)

    async def increment(first: bool) -> None:
        item = await store.aget(("mem",), "x")
        await both_read.wait()
        if not first:
            await asyncio.sleep(0.05)
        await store.aput(("mem",), "x", {"n": item.value["n"] + 1})

    results = await asyncio.gather(increment(True), increment(False), return_exceptions=True)
    assert results[0] is None and isinstance(results[1], ItemChanged)


class Counted(TypedDict):
    done: Annotated[list[str], operator.add]


def two_branches(store_errors: type[BaseException] | tuple[type[BaseException], ...]):
    """Two parallel branches that each read the counter memory, think, and write it back + 1."""
    attempts: Counter[str] = Counter()
    both_read = asyncio.Barrier(2)

    def branch(name: str):
        async def node(state: Counted, *, store: BaseStore) -> dict:
            attempts[name] += 1
            item = await store.aget(("team",), "counter")
            if attempts[name] == 1:
                await both_read.wait()  # both branches read before either writes
                await asyncio.sleep(0.05 if name == "b" else 0)
            await store.aput(("team",), "counter", {"n": (item.value["n"] if item else 0) + 1})
            return {"done": [name]}
        return node

    retry = RetryPolicy(retry_on=store_errors, initial_interval=0.01, max_attempts=5)
    graph = (StateGraph(Counted)
             .add_node("a", branch("a"), retry_policy=retry).add_node("b", branch("b"), retry_policy=retry)
             .add_edge(START, "a").add_edge(START, "b").add_edge("a", END).add_edge("b", END))
    return graph, attempts


async def test_parallel_branches_with_oribus_one_is_refused_and_retried(store):
    graph, attempts = two_branches(oribus.Conflict)
    out = await graph.compile(store=store).ainvoke({"done": []})
    assert sorted(out["done"]) == ["a", "b"]
    assert sorted(attempts.values()) == [1, 2]  # one branch refused once, then retried
    assert (await store.aget(("team",), "counter")).value == {"n": 2}  # both increments kept


async def test_parallel_branches_with_the_in_memory_store_one_silently_wins():
    memory = InMemoryStore()
    graph, attempts = two_branches(oribus.Conflict)
    out = await graph.compile(store=memory).ainvoke({"done": []})
    assert sorted(out["done"]) == ["a", "b"] and sorted(attempts.values()) == [1, 1]
    assert (await memory.aget(("team",), "counter")).value == {"n": 1}  # one increment lost


async def test_parallel_branches_of_a_sync_graph(data_dir):
    """graph.invoke runs the branches in threads, each node in a context of its own."""
    attempts: Counter[str] = Counter()
    both_read = threading.Barrier(2)

    def branch(name: str):
        def node(state: Counted, *, store: BaseStore) -> dict:
            attempts[name] += 1
            item = store.get(("team",), "counter")
            if attempts[name] == 1:
                both_read.wait(timeout=10)
                if name == "b":
                    threading.Event().wait(0.05)
            store.put(("team",), "counter", {"n": (item.value["n"] if item else 0) + 1})
            return {"done": [name]}
        return node

    retry = RetryPolicy(retry_on=oribus.Conflict, initial_interval=0.01, max_attempts=5)
    graph = (StateGraph(Counted)
             .add_node("a", branch("a"), retry_policy=retry).add_node("b", branch("b"), retry_policy=retry)
             .add_edge(START, "a").add_edge(START, "b").add_edge("a", END).add_edge("b", END))
    with oribus.open_local_sync(data_dir, agent="graphs", unsafe_no_fsync=True) as bus:
        store = OribusStore(bus)
        done = await asyncio.to_thread(lambda: graph.compile(store=store).invoke({"done": []}))
        assert sorted(done["done"]) == ["a", "b"]
        assert sorted(attempts.values()) == [1, 2]
        assert store.get(("team",), "counter").value == {"n": 2}


async def test_sync_methods(data_dir):
    with oribus.open_local_sync(data_dir, agent="graphs", unsafe_no_fsync=True) as bus:
        store = OribusStore(bus)
        store.put(("s",), "k", {"v": 1})
        assert store.get(("s",), "k").value == {"v": 1}
        assert [h.key for h in store.search(("s",))] == ["k"]
        assert store.list_namespaces() == [("s",)]
        item = store.get(("s",), "k")
        other = threading.Thread(target=lambda: store.put(("s",), "k", {"v": 2}))
        other.start()
        other.join()
        with pytest.raises(ItemChanged):  # this thread read v1; the other thread wrote since
            store.put(("s",), "k", {"v": item.value["v"] + 1})
        assert store.get(("s",), "k").value == {"v": 2}  # read again: now the delete is checked against v2
        store.delete(("s",), "k")
        assert store.get(("s",), "k") is None
