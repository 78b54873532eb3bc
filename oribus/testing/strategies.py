"""Hypothesis strategies for interleavings of agents and fault schedules (needs ``hypothesis``:
``pip install 'oribus[testing]'``).

A step is ``Start(agent)`` (a run of the agent begins and goes until its first bus
call waits), ``Advance(agent)`` (the agent's waiting call goes through) or
``Restart(clean)`` (the engine crashes, or closes cleanly, and opens again).
``replay(agents, steps)`` runs them with ``oribus.testing.interleave.Interleaving``
and returns its ``Verdict``::

    from hypothesis import given
    from oribus.testing.strategies import interleavings, replay

    @given(interleavings(["alice", "bob"]))
    def test_counter(steps):
        verdict = asyncio.run(replay({"alice": increment, "bob": increment}, steps, check=counted))
        assert verdict.ok, verdict.message

    async def counted(bus, finished):
        assert (await bus.get("counter")).value == finished

Hypothesis shrinks a failing list of steps (deleting steps, then simplifying them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from oribus.client.session import AsyncSession
from oribus.testing.interleave import Agent, Interleaving, Verdict


@dataclass(frozen=True)
class Start:
    agent: str


@dataclass(frozen=True)
class Advance:
    agent: str


@dataclass(frozen=True)
class Restart:
    clean: bool = False


Step = Start | Advance | Restart


def agent_steps(agents: Sequence[str], *, max_steps: int = 12) -> st.SearchStrategy[list[Step]]:
    """Lists of ``Start`` and ``Advance`` steps of these agents (no fault)."""
    if not agents:
        raise ValueError("give at least one agent")
    names = st.sampled_from(list(agents))
    step: st.SearchStrategy[Step] = st.one_of(names.map(Start), names.map(Advance))
    return st.lists(step, max_size=max_steps)


def fault_schedules(*, max_faults: int = 2, max_position: int = 12) -> st.SearchStrategy[list[tuple[int, Restart]]]:
    """Where restarts happen: ``(position, Restart(clean))`` pairs, a position counting the
    agent steps before it; crashes are drawn more often than clean closes."""
    restart = st.sampled_from([Restart(clean=False), Restart(clean=True)])
    return st.lists(st.tuples(st.integers(0, max_position), restart), max_size=max_faults)


@st.composite
def interleavings(draw: Any, agents: Sequence[str], max_steps: int = 12, max_faults: int = 2) -> list[Step]:
    """Agent steps with a fault schedule merged in."""
    steps: list[Step] = list(draw(agent_steps(agents, max_steps=max_steps)))
    faults = draw(fault_schedules(max_faults=max_faults, max_position=max_steps))
    for position, restart in sorted(faults, key=lambda f: f[0], reverse=True):
        steps.insert(min(position, len(steps)), restart)
    return steps


async def replay(agents: Mapping[str, Agent], steps: Sequence[Step], *,
                 check: Callable[[AsyncSession, int], Awaitable[Any]] | None = None,
                 data_dir: str | Path | None = None, shards: int = 1, **engine_options: Any) -> Verdict:
    """Run ``steps`` over a fresh embedded engine (a temporary directory unless ``data_dir``),
    then every run to its end, then ``await check(bus, finished)`` (``finished``: the runs
    that ended without an exception; raise AssertionError when your invariant does not
    hold) and the recorded history."""
    async with Interleaving(agents, data_dir, shards=shards, **engine_options) as run:
        for step in steps:
            if isinstance(step, Start):
                await run.start(step.agent)
            elif isinstance(step, Advance):
                await run.advance(step.agent)
            else:
                await run.restart(clean=step.clean)

        async def check_finished(bus: AsyncSession) -> None:
            if check is not None:
                await check(bus, run.finished_runs())

        return await run.finish(check_finished)
