"""oribus.testing.recording: what a session's calls become in the history, and no false alarm.

A recorded history of a healthy engine must check clean whatever the agents do (reads,
session- and transaction-scope commits, expectations, deletes, rollbacks, forget, reset):
a read set recorded wider than what the server validated would report cycles that are not
there. The same calls with ORI switched off must be caught.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

import oribus
from oribus.contract import BusService, CommitRequest, CommitResult
from oribus.errors import Unavailable
from oribus.testing.recording import Recording, RecordingBus

KEYS = ["a", "b", "c"]
AGENTS = ["alice", "bob", "carol"]

op = st.one_of(
    st.tuples(st.just("get"), st.sampled_from(AGENTS), st.lists(st.sampled_from(KEYS), min_size=1, max_size=3)),
    st.tuples(st.just("commit"), st.sampled_from(AGENTS), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("txn"), st.sampled_from(AGENTS), st.sampled_from(KEYS), st.sampled_from(KEYS)),
    st.tuples(st.just("delete"), st.sampled_from(AGENTS), st.sampled_from(KEYS)),
    st.tuples(st.just("rollback"), st.sampled_from(AGENTS), st.sampled_from(KEYS)),
    st.tuples(st.just("forget"), st.sampled_from(AGENTS), st.sampled_from(KEYS)),
    st.tuples(st.just("reset"), st.sampled_from(AGENTS)),
)


async def play(path: Path, ops: list[tuple[Any, ...]], **options: Any) -> Recording:
    recording = Recording()
    with recording.capturing():
        async with oribus.open_local(path, agent="root", **options) as root:
            sessions = {a: root.session(agent=a) for a in AGENTS}
            counter = 0
            for kind, agent, *args in ops:
                bus = sessions[agent]
                counter += 1
                try:
                    if kind == "get":
                        await bus.get_many(args[0])
                    elif kind == "commit":
                        key, expecting = args
                        current = (await bus.get(key)).version if expecting else None
                        await bus.put(key, f"{agent}-{counter}", expect=current)
                    elif kind == "txn":
                        async with bus.transaction() as tx:
                            seen = await tx.get(args[0])
                            tx.put(args[1], f"{agent}-{counter}-from-{seen.version}")
                    elif kind == "delete":
                        await bus.delete(args[0])
                    elif kind == "rollback":
                        versions = await bus.history(args[0])
                        if versions:
                            await bus.rollback({args[0]: versions[-1].version})
                    elif kind == "forget":
                        await bus.forget([args[0]])
                    else:
                        await bus.reset_session()
                except (oribus.Conflict, oribus.SessionExpired):
                    await bus.reset_session()
            await recording.capture_final(root._bus)
    return recording


@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(op, min_size=1, max_size=20))
def test_a_healthy_engine_records_a_clean_history(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("healthy")
    recording = asyncio.run(play(path / "data", ops, unsafe_no_fsync=True))
    report = recording.check()
    assert report.ok, recording.failure(report)


def test_the_same_calls_without_validation_are_caught(tmp_path):
    ops = [("get", "alice", ["a"]), ("get", "bob", ["a"]), ("commit", "alice", "a", False),
           ("commit", "bob", "a", False)]
    healthy = asyncio.run(play(tmp_path / "healthy", ops))
    assert healthy.check().ok
    broken = asyncio.run(play(tmp_path / "broken", ops, unsafe_disable_validation=True))
    report = broken.check()
    assert report.by_kind() == {"G-single": 1}, broken.failure(report)


def test_what_each_scope_is_recorded_with(tmp_path):
    async def scenario() -> list[dict]:
        recording = Recording()
        with recording.capturing():
            async with oribus.open_local(tmp_path / "d", agent="alice") as bus:
                await bus.get_many(["a", "b"])               # session deliveries: a, b
                await bus.forget(["b"])
                await bus.put("c", 1)                        # session scope: reads a, then writes c
                async with bus.transaction() as tx:          # transaction scope: only its own read
                    await tx.get("b")
                    tx.put("a", 2)
        return recording.recorder.events

    events = asyncio.run(scenario())
    oks = [e["ops"] for e in events if e["type"] == "ok"]
    assert oks == [
        [["r", "a", None, 0], ["r", "b", None, 0]],
        [["r", "a", None, 0], ["w", "c", 1, 1]],
        [["r", "b", None, 0]],
        [["r", "b", None, 0], ["w", "a", 2, 1]],
    ]


class AnswerLost(BusService):
    """Applies the first commit, then loses its answer (Unavailable), as a dropped connection does."""

    def __init__(self, inner: BusService) -> None:
        self.inner = inner
        self.lost = False

    async def commit(self, req: CommitRequest) -> CommitResult:
        result = await self.inner.commit(req)
        if not self.lost:
            self.lost = True
            raise Unavailable("connection lost")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


for _name in ("read", "history", "forget", "reset", "stats", "scan", "watch"):
    setattr(AnswerLost, _name, lambda self, *a, _n=_name, **k: getattr(self.inner, _n)(*a, **k))
AnswerLost.__abstractmethods__ = frozenset()


def test_a_commit_resent_after_a_lost_answer_is_one_transaction(tmp_path):
    async def scenario() -> list[dict]:
        recording = Recording()
        async with oribus.open_local(tmp_path / "d", agent="alice") as owner:
            bus = oribus.AsyncSession(RecordingBus(AnswerLost(owner._bus), recording), "alice")
            await bus.put("k", 1)      # the SDK resends it with the same commit id
            await recording.capture_final(owner._bus)
        assert recording.check().ok
        return recording.recorder.events

    events = asyncio.run(scenario())
    assert [e["type"] for e in events] == ["invoke", "ok", "final"]
    assert events[1]["ops"] == [["w", "k", 1, 1]]
