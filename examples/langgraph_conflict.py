"""Two LangGraph conflicts oribus catches, and how each is resolved. Runs offline.

    pip install 'oribus[langgraph]'
    python examples/langgraph_conflict.py [DATA_DIR]

1. Shared memory (OribusStore): a planning graph fans out to two branches, a
   researcher and a critic, that both read the team's plan from the store, ask a
   (fake) chat model for a note, and write the plan back with their note added.
   Both read the same version; the second write is refused (ItemChanged) and the
   branch's RetryPolicy runs it again on the new plan: both notes are kept. With
   LangGraph's InMemoryStore one note would silently be lost.

2. One conversation thread (OribusSaver): two runs of the graph start from the
   same checkpoint of a thread at once. Only one may extend it; the other is
   refused (CheckpointRaced, naming the checkpoint that got there first) and is
   run again, now starting from the newest checkpoint.
"""

from __future__ import annotations

import asyncio
import operator
import sys
import tempfile
from typing import Annotated, Any, TypedDict

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langgraph.graph import END, START, StateGraph
from langgraph.store.base import BaseStore
from langgraph.types import RetryPolicy

import oribus
from oribus.integrations.langgraph import CheckpointRaced, ItemChanged, OribusSaver, OribusStore

PLAN = ("team", "acme")  # the store namespace of the shared plan


class State(TypedDict):
    request: str
    log: Annotated[list[str], operator.add]


def build_branches(events: list[str], both_read: asyncio.Barrier) -> StateGraph:
    """START -> (researcher, critic in parallel) -> END; both edit the shared plan."""
    llm = FakeListChatModel(responses=["check the supplier's lead times", "the budget is too tight"])
    attempts: dict[str, int] = {}

    def agent(name: str):
        async def node(state: State, *, store: BaseStore) -> dict[str, Any]:
            attempts[name] = attempts.get(name, 0) + 1
            plan = await store.aget(PLAN, "plan")
            notes = list(plan.value["notes"]) if plan else []
            note = (await llm.ainvoke(f"{name}: {state['request']}")).content
            if attempts[name] == 1:
                await both_read.wait()  # a slow model call: both branches have read the plan
                await asyncio.sleep(0.05 if name == "critic" else 0)
            try:
                await store.aput(PLAN, "plan", {"notes": [*notes, f"{name}: {note}"]})
            except ItemChanged as e:
                events.append(f"store: {name}'s write refused (it read the plan at version "
                              f"{e.details['read']}, now {e.details['current']}); retrying on the new plan")
                raise
            return {"log": [f"{name} wrote its note (attempt {attempts[name]})"]}
        return node

    retry = RetryPolicy(retry_on=ItemChanged, initial_interval=0.01, max_attempts=3)
    return (StateGraph(State)
            .add_node("researcher", agent("researcher"), retry_policy=retry)
            .add_node("critic", agent("critic"), retry_policy=retry)
            .add_edge(START, "researcher").add_edge(START, "critic")
            .add_edge("researcher", END).add_edge("critic", END))


def build_reply() -> StateGraph:
    """START -> reply -> END: one model call per run, appended to the thread's log."""
    llm = FakeListChatModel(responses=["noted"])

    async def reply(state: State) -> dict[str, Any]:
        answer = (await llm.ainvoke(state["request"])).content
        return {"log": [f"{state['request']} -> {answer}"]}

    return StateGraph(State).add_node("reply", reply).add_edge(START, "reply").add_edge("reply", END)


async def run_until_it_lands(graph: Any, request: str, config: dict[str, Any], events: list[str],
                             name: str) -> dict[str, Any]:
    """Run the graph; if another run extended the thread first, run again from the newest
    checkpoint, after a jittered backoff that lets the other run finish (retrying at once, two
    runs could keep refusing each other)."""
    backoff = oribus.RetryPolicy(base_delay=0.02, max_delay=0.5)
    for attempt in range(10):
        try:
            return await graph.ainvoke({"request": request, "log": []}, config)
        except CheckpointRaced as e:
            events.append(f"thread: {name} refused: another run extended checkpoint {e.parent_id} "
                          f"first, with {e.newest_id}; running again from there")
            await asyncio.sleep(backoff.delay(attempt + 1))
    raise RuntimeError(f"{name} kept losing the thread")


async def main(data_dir: str) -> dict[str, Any]:
    events: list[str] = []
    async with oribus.open_local(data_dir, agent="planner") as bus:
        store, saver = OribusStore(bus), OribusSaver(bus)
        config = {"configurable": {"thread_id": "acme-plan"}}

        # 1. two parallel branches edit one memory item
        graph = build_branches(events, asyncio.Barrier(2)).compile(store=store, checkpointer=saver)
        await graph.ainvoke({"request": "plan the launch", "log": []}, config)
        notes = (await store.aget(PLAN, "plan")).value["notes"]

        # 2. two runs start from the same checkpoint of one thread at once
        chat = build_reply().compile(checkpointer=saver)
        await asyncio.gather(
            run_until_it_lands(chat, "add a risk", config, events, "run A"),
            run_until_it_lands(chat, "add a cost", config, events, "run B"))
        latest = await saver.aget_tuple(config)
        checkpoints = [t async for t in saver.alist(config)]
    return {"events": events, "notes": notes, "log": latest.checkpoint["channel_values"]["log"],
            "checkpoints": len(checkpoints)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else tmp))
    for line in result["events"]:
        print(line)
    print("the shared plan keeps both notes:", *result["notes"], sep="\n  ")
    print(f"the thread ({result['checkpoints']} checkpoints) holds both runs, one after the other:",
          *result["log"], sep="\n  ")
