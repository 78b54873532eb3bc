"""OribusSaver: LangGraph's own checkpointer conformance suite, and two runs racing on one thread."""

from __future__ import annotations

import asyncio
import operator
import threading
from typing import Annotated, TypedDict

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import BASE_CAPABILITIES
from langgraph.checkpoint.conformance.test_utils import (
    generate_checkpoint,
    generate_config,
    generate_metadata,
)
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

import oribus
from oribus.client.session import Transaction
from oribus.hosts.up import UpHost
from oribus.integrations.langgraph import CheckpointRaced, OribusSaver


def conformance_factory(conn: str, name: str, **options):
    @checkpointer_test(name=name)
    async def factory():
        async with OribusSaver.from_conn_string(conn, **options) as saver:
            yield saver
    return factory


async def run_conformance(factory) -> dict[str, tuple[int, int]]:
    report = await validate(factory)
    report.print_report()
    assert report.passed_all_base() and report.passed_all(), {k: r.failures for k, r in report.results.items()}
    counts = {k: (r.tests_passed, r.tests_failed) for k, r in report.results.items() if r.detected}
    # every base capability, and of the optional ones copy_thread
    assert set(counts) == {c.value for c in BASE_CAPABILITIES} | {"copy_thread"}
    return counts


async def test_conformance_suite_embedded(data_dir):
    counts = await run_conformance(conformance_factory(str(data_dir), "OribusSaver (embedded)", unsafe_no_fsync=True))
    # LangGraph's suite (langgraph-checkpoint-conformance 0.0.2): 58 base tests, 8 of copy_thread
    assert sum(p for p, _ in counts.values()) >= 66 and not any(f for _, f in counts.values())


async def test_conformance_suite_over_the_network(tmp_path):
    cluster = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=2, unsafe_no_fsync=True)
    await cluster.start()
    try:
        counts = await run_conformance(conformance_factory(cluster.address, "OribusSaver (remote)"))
        assert sum(p for p, _ in counts.values()) >= 66
    finally:
        await cluster.stop()


@pytest.fixture
async def bus(data_dir):
    async with oribus.open_local(data_dir, shards=2, agent="graphs", unsafe_no_fsync=True) as b:
        yield b


async def put(saver: OribusSaver, thread: str, parent: str | None, step: int) -> str:
    config = generate_config(thread, checkpoint_id=parent)
    checkpoint = generate_checkpoint(channel_values={"step": step}, channel_versions={"step": step + 1})
    stored = await saver.aput(config, checkpoint, generate_metadata(step=step), {"step": step + 1})
    return stored["configurable"]["checkpoint_id"]


async def newest(saver: OribusSaver, thread: str) -> str:
    tup = await saver.aget_tuple(generate_config(thread))
    assert tup is not None
    return tup.checkpoint["id"]


@pytest.mark.parametrize("savers", [1, 2], ids=["one saver", "two savers (two processes)"])
async def test_the_second_run_to_extend_a_checkpoint_is_refused_naming_the_winner(bus, savers):
    first = OribusSaver(bus)
    second = OribusSaver(bus.session(agent="other")) if savers == 2 else first
    root = await put(first, "t", None, 0)
    # both runs load the thread: its newest checkpoint is root
    assert await newest(first, "t") == root and await newest(second, "t") == root
    winner = await put(first, "t", root, 1)
    with pytest.raises(CheckpointRaced) as refused:
        await put(second, "t", root, 1)
    e = refused.value
    assert (e.thread_id, e.parent_id, e.newest_id) == ("t", root, winner)
    assert winner in str(e) and root in str(e)
    assert isinstance(e, oribus.Conflict)
    assert await newest(first, "t") == winner
    assert [t.checkpoint["id"] async for t in first.alist(generate_config("t"))] == [winner, root]


async def test_another_reader_handed_the_parent_later_does_not_make_it_fresh(bus):
    """Runs are tasks: while two race, a third task (a UI listing the history) is handed the
    contested parent at the thread's new head; the losing run is still refused."""
    saver = OribusSaver(bus)
    root = await put(saver, "t", None, 0)
    both_read, a_stored, listed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    loaded = []

    async def run(name: str) -> str:
        assert await newest(saver, "t") == root
        loaded.append(name)
        if len(loaded) == 2:
            both_read.set()
        await both_read.wait()
        if name == "a":
            stored = await put(saver, "t", root, 1)
            a_stored.set()
            return stored
        await listed.wait()
        return await put(saver, "t", root, 1)

    async def ui() -> None:
        await a_stored.wait()
        assert [t.checkpoint["id"] async for t in saver.alist(generate_config("t"))][-1] == root
        listed.set()

    a, b, _ = await asyncio.gather(run("a"), run("b"), ui(), return_exceptions=True)
    assert isinstance(b, CheckpointRaced) and b.newest_id == a


async def test_a_race_inside_the_commit_window_is_refused_by_the_commit(bus, monkeypatch):
    """The other run commits between this put's read of the head and its commit: oribus
    refuses the commit (the head it read changed), the put reads again and reports the race."""
    a, b = OribusSaver(bus), OribusSaver(bus.session(agent="other"))
    root = await put(a, "t", None, 0)
    await newest(a, "t"), await newest(b, "t")
    original = Transaction.commit
    refusals: list[oribus.Conflict] = []
    armed = {"on": True}
    winner: dict[str, str] = {}

    async def commit(tx: Transaction) -> dict[str, int]:
        if armed["on"]:
            armed["on"] = False
            winner["id"] = await put(a, "t", root, 1)  # lands while b's put is about to commit
        try:
            return await original(tx)
        except oribus.Conflict as e:
            refusals.append(e)
            raise

    monkeypatch.setattr(Transaction, "commit", commit)
    with pytest.raises(CheckpointRaced) as refused:
        await put(b, "t", root, 1)
    assert refused.value.newest_id == winner["id"]
    assert [s.key for s in refusals[0].stale] == [b.keys.head("t", "")]


async def test_a_deliberate_fork_from_an_older_checkpoint_is_not_a_race(bus):
    saver = OribusSaver(bus)
    c0 = await put(saver, "t", None, 0)
    c1 = await put(saver, "t", c0, 1)
    await put(saver, "t", c1, 2)
    # time travel: load c0 explicitly, then extend it
    assert (await saver.aget_tuple(generate_config("t", checkpoint_id=c0))).checkpoint["id"] == c0
    fork = await put(saver, "t", c0, 1)
    tup = await saver.aget_tuple(generate_config("t", checkpoint_id=fork))
    assert tup.parent_config["configurable"]["checkpoint_id"] == c0
    # but if another run extends the thread after the fork's parent was read, it is a race
    c_old = c1
    assert (await saver.aget_tuple(generate_config("t", checkpoint_id=c_old))).checkpoint["id"] == c_old
    await put(saver, "t", fork, 2)
    with pytest.raises(CheckpointRaced):
        await put(saver, "t", c_old, 2)


async def test_list_across_namespaces_and_threads(bus):
    saver = OribusSaver(bus)
    for thread in ("t1", "t2"):
        for ns in ("", "child:1"):
            config = generate_config(thread, checkpoint_ns=ns)
            await saver.aput(config, generate_checkpoint(), generate_metadata(source=f"{thread}/{ns}"), {})
    sources = [t.metadata["source"] async for t in saver.alist({"configurable": {"thread_id": "t1"}})]
    assert sorted(sources) == ["t1/", "t1/child:1"]
    assert [t.metadata["source"] async for t in saver.alist(
        {"configurable": {"thread_id": "t1", "checkpoint_ns": None}})] == sources
    everything = [t.metadata["source"] async for t in saver.alist(None)]
    assert sorted(everything) == ["t1/", "t1/child:1", "t2/", "t2/child:1"]
    assert [t.metadata["source"] async for t in saver.alist(None, filter={"source": "t2/"})] == ["t2/"]
    await saver.adelete_thread("t1")
    assert sorted([t.metadata["source"] async for t in saver.alist(None)]) == ["t2/", "t2/child:1"]


async def test_a_copied_thread_continues_on_its_own(bus):
    saver = OribusSaver(bus)
    c0 = await put(saver, "src", None, 0)
    c1 = await put(saver, "src", c0, 1)
    await saver.aput_writes(generate_config("src", checkpoint_id=c1), [("ch", "w")], "task")
    await saver.acopy_thread("src", "dst")
    copied = await saver.aget_tuple(generate_config("dst"))
    assert copied.checkpoint["id"] == c1 and copied.checkpoint["channel_values"] == {"step": 1}
    assert copied.pending_writes == [("task", "ch", "w")]
    assert copied.parent_config["configurable"] == {"thread_id": "dst", "checkpoint_ns": "", "checkpoint_id": c0}
    c2 = await put(saver, "dst", c1, 2)  # the copy is extended ...
    assert await newest(saver, "src") == c1  # ... and the source is not
    assert await newest(saver, "dst") == c2
    await saver.adelete_thread("src")
    assert (await saver.aget_tuple(generate_config("dst", checkpoint_id=c0))).checkpoint["channel_values"] == {
        "step": 0}


async def test_parentless_puts_are_not_races(bus):
    saver = OribusSaver(bus)
    ids = [await put(saver, "t", None, i) for i in range(3)]
    assert await newest(saver, "t") == ids[-1]


async def test_rebase_policy_stores_the_loser_on_top_of_the_newest(bus):
    saver = OribusSaver(bus, on_race="rebase")
    root = await put(saver, "t", None, 0)
    await newest(saver, "t")
    winner = await put(saver, "t", root, 1)
    rebased = await put(saver, "t", root, 1)
    tup = await saver.aget_tuple(generate_config("t"))
    assert tup.checkpoint["id"] == rebased
    assert tup.parent_config["configurable"]["checkpoint_id"] == winner


async def test_a_callable_policy_sees_the_race_and_decides(bus):
    seen: list[CheckpointRaced] = []

    def policy(race: CheckpointRaced) -> str:
        seen.append(race)
        return "reject" if race.checkpoint_ns == "" else "rebase"

    saver = OribusSaver(bus, on_race=policy)
    root = await put(saver, "t", None, 0)
    await newest(saver, "t")
    winner = await put(saver, "t", root, 1)
    with pytest.raises(CheckpointRaced):
        await put(saver, "t", root, 1)
    assert [(r.parent_id, r.newest_id) for r in seen] == [(root, winner)]
    with pytest.raises(ValueError, match="on_race"):
        OribusSaver(bus, on_race="ignore")


class State(TypedDict):
    log: Annotated[list[str], operator.add]


def slow_graph(entered: asyncio.Barrier):
    async def work(state: State) -> dict:
        await entered.wait()  # both runs are past their first checkpoint before either writes
        return {"log": [f"step {len(state['log'])}"]}

    return StateGraph(State).add_node("work", work).add_edge(START, "work").add_edge("work", END)


async def race_two_runs(checkpointer) -> list[object]:
    config = {"configurable": {"thread_id": "shared"}}
    graph = slow_graph(asyncio.Barrier(1)).compile(checkpointer=checkpointer)
    await graph.ainvoke({"log": ["start"]}, config)
    racing = slow_graph(asyncio.Barrier(2)).compile(checkpointer=checkpointer)
    return await asyncio.gather(
        racing.ainvoke({"log": ["run A"]}, config), racing.ainvoke({"log": ["run B"]}, config),
        return_exceptions=True)


async def test_two_graph_runs_racing_on_one_thread(bus):
    """With oribus exactly one of two concurrent runs extends the thread; with LangGraph's
    in-memory saver both "succeed" and one run's work silently ends up off the thread."""
    results = await race_two_runs(OribusSaver(bus))
    raced = [r for r in results if isinstance(r, CheckpointRaced)]
    assert len(raced) == 1, results
    (done,) = [r for r in results if not isinstance(r, BaseException)]
    saver_view = await OribusSaver(bus).aget_tuple({"configurable": {"thread_id": "shared"}})
    assert saver_view.checkpoint["channel_values"]["log"] == done["log"]

    memory = await race_two_runs(InMemorySaver())
    assert not any(isinstance(r, BaseException) for r in memory)  # both "succeeded"


async def test_sync_methods_run_on_the_session_loop(data_dir):
    with oribus.open_local_sync(data_dir, agent="graphs", unsafe_no_fsync=True) as bus:
        saver = OribusSaver(bus)
        graph = StateGraph(State).add_node("work", lambda s: {"log": ["sync"]}) \
            .add_edge(START, "work").add_edge("work", END).compile(checkpointer=saver)
        config = {"configurable": {"thread_id": "sync"}}
        assert graph.invoke({"log": ["a"]}, config)["log"] == ["a", "sync"]
        assert graph.invoke({"log": ["b"]}, config)["log"] == ["a", "sync", "b", "sync"]
        assert len(list(saver.list(config))) == 6
        saver.delete_thread("sync")
        assert saver.get_tuple(config) is None


async def test_sync_methods_on_the_loop_itself_say_what_to_use(bus):
    saver = OribusSaver(bus)
    with pytest.raises(RuntimeError, match="async methods"):
        saver.get_tuple(generate_config("t"))
    # from another thread they work
    await put(saver, "t", None, 0)
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(saver.get_tuple(generate_config("t"))))
    worker.start()
    while worker.is_alive():
        await asyncio.sleep(0.01)
    assert out[0].checkpoint["channel_values"] == {"step": 0}


async def test_from_conn_string_refuses_what_is_neither_address_nor_directory():
    with pytest.raises(oribus.InvalidRequest):
        async with OribusSaver.from_conn_string(""):
            pass


async def test_a_strict_session_still_stores_checkpoints(data_dir):
    """The saver writes keys it never read (a new checkpoint): its own sessions are not strict."""
    async with oribus.open_local(data_dir, agent="graphs", strict=True, unsafe_no_fsync=True) as bus:
        saver = OribusSaver(bus)
        root = await put(saver, "t", None, 0)
        assert await newest(saver, "t") == root
