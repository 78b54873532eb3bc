"""Agents interleaved one bus call at a time, with crashes of the engine between calls.

An agent is the user's own async callable, given an ``oribus.AsyncSession``::

    async def increment(bus):
        await bus.run(add_one)

``Interleaving`` runs agents over one embedded engine (``EmbeddedEngine``) in a
directory, each through a ``RecordingBus`` whose gate holds every call (read, commit,
forget, reset) until its turn. So the order of the calls is exactly the order the
caller picks, and a run replays the same way every time — which is what lets
Hypothesis shrink a failing interleaving:

- ``start(agent)``: start one run of the agent (an agent runs one at a time) and let it
  go until its first call waits at the gate, or it ends;
- ``advance(agent)``: let the agent's waiting call through, and run it until its next
  call waits, or it ends;
- ``restart(clean)``: stop the engine between two calls — a crash (no flush, files
  dropped as a killed process's are; its delivery logs are gone, so sessions that read
  before fail closed with ``SessionExpired``) or a clean close — and open it again
  (a process crash, not a power loss: ``oribus verify --nemesis local`` and the suite's
  crash tests cover what fsync protects);
- ``finish(check)``: let every waiting call through in turn (round robin, in the
  agents' order) until every run ended, then call the user's ``check`` (the
  application's own invariant) and check the recorded history.

``finish`` returns a ``Verdict``: ``ok``, or what failed (an agent's exception, the
invariant, the history's anomalies by class with a minimal example) and the calls in
the order they ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oribus.checker import Report
from oribus.client.session import AsyncSession
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig
from oribus.testing.recording import Recording, RecordingBus

Agent = Callable[[AsyncSession], Awaitable[Any]]
Check = Callable[[AsyncSession], Awaitable[Any]]

# How long one step may take before the interleaving gives up: an agent that neither
# calls the bus nor ends (it waits for something else forever).
STEP_TIMEOUT = 30.0
# The engine's read lease (seconds), unless the caller gives one.
RESTART_READ_LEASE = 0.01
# Calls ``finish`` lets through before it decides the agents never end.
MAX_FINISH_CALLS = 2_000


def crash(engine: EmbeddedEngine) -> None:
    """Stop ``engine`` the way a killed process stops: nothing flushed or closed cleanly,
    its files dropped and its directory locks let go (as the kernel does for a dead process).
    Everything acknowledged was fsynced already; what is lost is what lives in memory."""
    if engine._maintenance is not None:
        engine._maintenance.cancel()
    engine._closed = True
    for shard in engine.shards.values():
        shard._closed = True
        wal: Any = shard.wal  # the shard's Wal: refuse what a dead process could not do
        if wal is not None:
            wal._closed = True
            wal._release()
        if shard._dir_lock is not None:
            shard._dir_lock.release()
    if engine.journal is not None and engine.journal._dir_lock is not None:
        engine.journal._dir_lock.release()
    if engine._dir_lock is not None:
        engine._dir_lock.release()


@dataclass
class _AgentState:
    name: str
    fn: Agent
    session: AsyncSession
    bus: RecordingBus
    task: asyncio.Task[None] | None = None
    waiting: list[tuple[str, asyncio.Future[None]]] = field(default_factory=list)
    in_flight: int = 0
    runs: int = 0
    finished: int = 0  # runs that ended without an exception

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


@dataclass
class Verdict:
    """What ``Interleaving.finish`` found: ``ok``, else ``message`` says what failed."""

    ok: bool
    message: str
    report: Report | None
    calls: list[str]


class Interleaving:
    """Agents over one embedded engine, one bus call at a time, in the order the caller picks.

    Example::

        async with Interleaving({"alice": increment, "bob": increment}) as run:
            await run.start("alice")
            await run.start("bob")
            await run.advance("bob")
            await run.restart(clean=False)
            verdict = await run.finish(check=counter_is_right)
        assert verdict.ok, verdict.message
    """

    def __init__(self, agents: Mapping[str, Agent], data_dir: str | Path | None = None, *,
                 shards: int = 1, **engine_options: Any) -> None:
        if not agents:
            raise ValueError("give at least one agent")
        self._temp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._temp = tempfile.TemporaryDirectory(prefix="oribus-interleave-")
            data_dir = self._temp.name
        # A shard takes no write for its read lease after it starts (specs/PROTOCOL.md §5.8): a
        # lease of the old life could still hold. Restarts here happen between calls, when no
        # lease is held, so a short one keeps runs with restarts fast.
        engine_options.setdefault("read_lease_seconds", RESTART_READ_LEASE)
        # The crashes here are a process's, not a power loss: what the engine wrote stays in
        # the operating system's cache and a restart reads it whether or not it was fsynced
        # (with unsafe_no_fsync a commit is still acknowledged only once written). So fsync
        # would change nothing a run can observe, and costs most of its time.
        engine_options.setdefault("unsafe_no_fsync", True)
        self.config = EngineConfig(data_dir=Path(data_dir), shards=shards, **engine_options)
        self._fns = dict(agents)
        self.recording = Recording()
        self.calls: list[str] = []  # what ran, in order: "alice: read counter", "restart (crash)"
        self.errors: list[str] = []
        self._agents: dict[str, _AgentState] = {}
        self._engine: EmbeddedEngine | None = None
        self._gating = True
        self._changed = asyncio.Event()

    # ---- lifecycle ------------------------------------------------------------------------

    async def open(self) -> Interleaving:
        self._engine = await EmbeddedEngine.open(self.config)
        for name, fn in self._fns.items():
            bus = self.recording.wrap(self._engine.bus, self._gate_of(name), process=name)
            session = AsyncSession(bus, name, f"{name}-session", max_value_bytes=self.config.max_value_bytes)
            self._agents[name] = _AgentState(name, fn, session, bus)
        return self

    async def close(self) -> None:
        """Cancel runs still going and close the engine. Idempotent."""
        self._gating = False
        for state in self._agents.values():
            for _, fut in state.waiting:
                fut.cancel()
            if state.task is not None and not state.task.done():
                state.task.cancel()
                with contextlib.suppress(BaseException):
                    await state.task
        if self._engine is not None:
            await self._engine.close()
            self._engine = None
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None

    async def __aenter__(self) -> Interleaving:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- what the caller sees -----------------------------------------------------------------

    @property
    def agents(self) -> list[str]:
        return list(self._agents)

    def running(self, agent: str) -> bool:
        return self._agents[agent].running

    def waiting(self, agent: str) -> bool:
        """The agent has a call held at the gate (``advance`` lets it through)."""
        return bool(self._agents[agent].waiting)

    def finished_runs(self, agent: str | None = None) -> int:
        """Runs that ended without an exception, of one agent or of all."""
        states = [self._agents[agent]] if agent is not None else list(self._agents.values())
        return sum(s.finished for s in states)

    @property
    def session(self) -> AsyncSession:
        """A session on the engine, outside the interleaving (recorded, never held)."""
        assert self._engine is not None, "open() first"
        return AsyncSession(self.recording.wrap(self._engine.bus, process="check"), "check")

    # ---- the gate -------------------------------------------------------------------------------

    def _gate_of(self, agent: str) -> Callable[[str], contextlib.AbstractAsyncContextManager[None]]:
        @contextlib.asynccontextmanager
        async def gate(what: str) -> AsyncIterator[None]:
            state = self._agents[agent]
            if self._gating:
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                state.waiting.append((what, fut))
                self._changed.set()
                await fut
                self.calls.append(f"{agent}: {what}")
            state.in_flight += 1
            try:
                yield
            finally:
                state.in_flight -= 1
                self._changed.set()

        return gate

    def _quiet(self, state: _AgentState) -> bool:
        return not state.running or (state.in_flight == 0 and bool(state.waiting))

    async def _until_quiet(self, state: _AgentState) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STEP_TIMEOUT
        while not self._quiet(state):
            self._changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"agent {state.name} neither called the bus nor ended within "
                                   f"{STEP_TIMEOUT:g}s")
            assert state.task is not None
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({changed, state.task}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()

    async def _run(self, state: _AgentState) -> None:
        try:
            await state.fn(state.session)
        except Exception as e:
            self.errors.append(f"agent {state.name} (run {state.runs}) raised {type(e).__name__}: {e}\n"
                               + "".join(traceback.format_exception(e)[-6:]))
            self.calls.append(f"{state.name}: raised {type(e).__name__}")
        else:
            state.finished += 1
            self.calls.append(f"{state.name}: run {state.runs} ended")
        finally:
            self._changed.set()

    # ---- steps ---------------------------------------------------------------------------------

    async def start(self, agent: str) -> bool:
        """Start a run of ``agent`` and run it until its first call waits; False (and nothing
        done) if it is running already."""
        state = self._agents[agent]
        if state.running:
            return False
        state.runs += 1
        self.calls.append(f"{agent}: run {state.runs} starts")
        state.task = asyncio.get_running_loop().create_task(self._run(state))
        await self._until_quiet(state)
        return True

    async def advance(self, agent: str) -> bool:
        """Let ``agent``'s waiting call through and run it until its next call waits or it
        ends; False (and nothing done) if no call of it waits."""
        state = self._agents[agent]
        if not state.waiting:
            return False
        _, fut = state.waiting.pop(0)
        fut.set_result(None)
        await self._until_quiet(state)
        return True

    async def restart(self, clean: bool = False) -> None:
        """Stop the engine (a crash, or a clean close) and open it again on the same data."""
        assert self._engine is not None, "open() first"
        self.calls.append(f"restart ({'clean' if clean else 'crash'})")
        if clean:
            await self._engine.close()
        else:
            crash(self._engine)
        self._engine = await EmbeddedEngine.open(self.config)
        for bus in self.recording.buses:
            bus.inner = self._engine.bus

    async def finish(self, check: Check | None = None) -> Verdict:
        """Run every agent to its end (waiting calls let through in turn), then check."""
        for _ in range(MAX_FINISH_CALLS):
            waiting = [s for s in self._agents.values() if s.waiting]
            if not waiting:
                break
            for state in waiting:
                await self.advance(state.name)
        else:
            return Verdict(False, f"the agents still call the bus after {MAX_FINISH_CALLS} calls "
                           "let through in turn: do they end?", None, list(self.calls))
        self._gating = False
        problems = list(self.errors)
        if check is not None:
            try:
                await check(self.session)
            except AssertionError as e:
                problems.append(f"the check failed: {e}".rstrip(": "))
        assert self._engine is not None
        await self.recording.capture_final(self._engine.bus)
        report = self.recording.check()
        if not report.ok:
            problems.append(self.recording.failure(report))
        if not problems:
            return Verdict(True, "", report, list(self.calls))
        message = "\n".join(problems) + "\nthe calls, in the order they ran:\n" + "\n".join(
            f"  {c}" for c in self.calls)
        return Verdict(False, message, report, list(self.calls))
