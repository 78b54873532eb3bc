"""``AgentMachine``: a Hypothesis ``RuleBasedStateMachine`` that interleaves your agents
with crashes of the engine (needs ``hypothesis``: ``pip install 'oribus[testing]'``).

Subclass it with your agents (async callables given an ``oribus.AsyncSession``) and,
optionally, your own invariant::

    class CounterMachine(AgentMachine):
        agents = {"alice": increment, "bob": increment}

        async def check(self, bus):
            counter = await bus.get("counter")
            assert (counter.value or 0) == self.finished_runs(), "an increment was lost"

    TestCounter = CounterMachine.TestCase

Its rules, over one embedded engine in a temporary directory
(``oribus.testing.interleave``): ``start(agent)``, ``advance(agent)`` (the agent's
waiting bus call goes through) and, unless ``crashes = False``, ``stop_engine(clean)``
(a crash, or a clean close, then a restart).
After every run (its ``teardown``) every run goes to its end, then ``check`` runs and
the recorded history is checked; any failure fails the run, and Hypothesis shrinks the
interleaving (the rules are named so that a shrunk run starts agents rather than restarts
an idle engine). ``last_calls`` and ``last_steps`` keep what the last run did (after a
failure: the shrunk one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from oribus.client.session import AsyncSession
from oribus.testing.interleave import Agent, Interleaving


class AgentMachine(RuleBasedStateMachine):
    """Interleavings of ``agents`` with crashes of the engine; see the module docstring."""

    agents: ClassVar[Mapping[str, Agent]] = {}
    shards: ClassVar[int] = 1  # shards of the engine (more than one: two-phase commits)
    crashes: ClassVar[bool] = True  # draw restarts of the engine too
    engine_options: ClassVar[Mapping[str, Any]] = {}  # fields of EngineConfig
    last_steps: ClassVar[list[str]] = []
    last_calls: ClassVar[list[str]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.agents:
            return
        names = st.sampled_from(sorted(cls.agents))

        # Rules drawn from this class's agents, so a counterexample reads as
        # state.start(agent='bob'); fresh functions, since Hypothesis marks the function.
        def start(self: AgentMachine, agent: str) -> None:
            self._start(agent)

        def advance(self: AgentMachine, agent: str) -> None:
            self._advance(agent)

        # Named to sort after start: Hypothesis tries rules in order of their names, so a
        # shrunk counterexample starts an agent rather than restart an idle engine.
        def stop_engine(self: AgentMachine, clean: bool) -> None:
            self._restart(clean)

        setattr(cls, "start", rule(agent=names)(start))  # noqa: B010
        setattr(cls, "advance", precondition(AgentMachine._any_waiting)(rule(agent=names)(advance)))  # noqa: B010
        if cls.crashes:
            setattr(cls, "stop_engine", rule(clean=st.booleans())(stop_engine))  # noqa: B010

    def __init__(self) -> None:
        super().__init__()
        if not self.agents:
            raise TypeError(f"{type(self).__name__}.agents is empty: give the agents to interleave")
        self._loop = asyncio.new_event_loop()
        self._steps: list[str] = []
        self.interleaving = Interleaving(self.agents, shards=self.shards, **dict(self.engine_options))
        self._loop.run_until_complete(self.interleaving.open())

    def _any_waiting(self) -> bool:
        return any(self.interleaving.waiting(a) for a in self.interleaving.agents)

    def finished_runs(self, agent: str | None = None) -> int:
        """Runs that ended without an exception (of one agent, or of all)."""
        return self.interleaving.finished_runs(agent)

    async def check(self, bus: AsyncSession) -> None:
        """Your invariant, checked once every run ended: raise AssertionError if it does not hold."""

    def _start(self, agent: str) -> None:
        if self._loop.run_until_complete(self.interleaving.start(agent)):
            self._steps.append(f"start({agent!r})")

    def _advance(self, agent: str) -> None:
        if self._loop.run_until_complete(self.interleaving.advance(agent)):
            self._steps.append(f"advance({agent!r})")

    def _restart(self, clean: bool) -> None:
        self._loop.run_until_complete(self.interleaving.restart(clean))
        self._steps.append(f"stop_engine(clean={clean})")

    def teardown(self) -> None:
        try:
            verdict = self._loop.run_until_complete(self.interleaving.finish(self.check))
        finally:
            self._loop.run_until_complete(self.interleaving.close())
            self._loop.close()
        type(self).last_steps = list(self._steps)
        type(self).last_calls = list(self.interleaving.calls)
        if not verdict.ok:
            raise AssertionError(f"after the steps {', '.join(self._steps) or '(none)'}:\n{verdict.message}")
