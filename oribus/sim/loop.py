"""A deterministic asyncio event loop on virtual time, with simulated processes.

``SimLoop`` is an ordinary ``asyncio.SelectorEventLoop`` with three changes:

* **virtual time** — ``time()`` reads a counter, not the OS clock. When every
  task is blocked, the loop's selector is asked to wait ``timeout`` seconds
  for the next timer; ``VirtualSelector.select`` never blocks: it moves the
  counter forward by ``timeout`` and reports no I/O. So ``asyncio.sleep(30)``
  costs no wall-clock time, and a run of virtual hours takes what its
  callbacks cost to execute;
* **no threads** — ``run_in_executor`` calls the function at once, on the
  loop's own thread, and returns a done future (the shard runs its recovery
  scan and snapshot writes through the executor; the simulated disk is
  in-memory, so nothing would block);
* **processes** — a ``Process`` is a group of tasks that die together. A task
  belongs to the process whose context created it (a context variable, so
  every task spawned below a server handler — ``asyncio.shield``'s inner task,
  ``gather``'s children, background snapshots — is counted too);
  ``Process.kill()`` cancels them all, which is how a crash of a shard or of
  the bus is simulated.

Determinism. asyncio itself is deterministic given the same sequence of
callbacks: the ready queue is FIFO and timers with equal deadlines keep their
scheduling order (a heap fed in the same order pops in the same order). What
remains is the program's own inputs: seeded ``random.Random`` instances for
everything the simulator decides, no reads of the OS clock on any path that
steers control flow (the shard reads ``Shard.clock``, set to ``SimLoop.time``),
no threads, and ids that do not depend on the OS (the cluster fixes session and
commit ids). Then, **in one process, the same seed gives the same run**, event
for event. Iteration order of sets of strings (e.g. the transactions blocking
a read) depends on string hashing, which is randomised per process: to replay
a run in *another* process — the usual way to debug a failure a test
reported — fix ``PYTHONHASHSEED`` (any value, the same for both runs), e.g.
``PYTHONHASHSEED=0 python -m oribus.sim --seed 17``.

If every task waits for something no timer will ever bring, a real loop would
hang; ``SimLoop`` raises ``SimulationStalled`` instead (a liveness bug, or a
test that forgot to stop something).

The opposite failure is a **livelock**: some task never waits for anything that
takes time (a retry loop that resends at once, a wait on a future that is
already done), so the ready queue is never empty and the virtual clock never
moves — on a real clock the same code would burn a core until a deadline, here
it never reaches one. ``SimLoop`` counts the loop's turns since virtual time
last moved; past ``livelock_turns`` (``LIVELOCK_TURNS``, far more than any burst
of work at one instant in a run) it raises ``SimulationLivelock``, naming the
callbacks that filled the ready queue over the last turns (for a task, the
chain of coroutines it is suspended in), so a livelock is a failing seed with
its culprit instead of a hang.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import selectors
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar, TypeVarTuple

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_process: contextvars.ContextVar[Process | None] = contextvars.ContextVar("oribus_sim_process", default=None)


# Loop turns without virtual time moving before a run is declared livelocked. The busiest
# instant of soak runs (replica groups of 1, 3 and 5) took 12 turns, since the network gives
# every message its own delay; a livelock reaches this limit in about a second of wall-clock time.
LIVELOCK_TURNS = 100_000
# The last turns before that limit whose ready callbacks ``SimulationLivelock`` reports.
_SAMPLED_TURNS = 200


class SimulationStalled(RuntimeError):
    """Every task is blocked and no timer is pending: nothing can ever happen again."""


class SimulationLivelock(RuntimeError):
    """Callbacks keep running but virtual time never moves: some task never waits for time."""


class VirtualSelector(selectors.BaseSelector):
    """A selector that never blocks: waiting ``timeout`` seconds advances the virtual clock.

    Registrations (the loop's self-pipe) go to a real selector, polled with a
    zero timeout, so ``call_soon_threadsafe`` and signals still work.
    ``on_instant`` is called on every turn that does not move the clock (the
    livelock guard).
    """

    def __init__(self, loop_clock: Callable[[float], None], on_instant: Callable[[], None] = lambda: None) -> None:
        self._real = selectors.DefaultSelector()
        self._advance = loop_clock
        self._on_instant = on_instant

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(0)
        if events:
            return events
        if timeout is None:
            raise SimulationStalled(
                "every task is blocked and no timer is pending (deadlock in the simulated system)"
            )
        if timeout > 0:
            self._advance(timeout)
        else:
            self._on_instant()
        return []

    def close(self) -> None:
        self._real.close()


class Process:
    """A simulated OS process: the tasks started on its behalf, which die together.

    ``spawn(coro)`` starts a task in this process; every task that task
    creates belongs here too. ``kill()`` cancels them all at once. Their
    cleanup still runs (as cancellation), but a crash cuts the process off
    first — its simulated disk refuses further writes and the network drops
    what it would send — so nothing it does after the kill reaches anyone.
    A killed process stays dead; a restart is a new Process.
    """

    def __init__(self, loop: SimLoop, name: str) -> None:
        self.loop = loop
        self.name = name
        self.alive = True
        self._tasks: dict[asyncio.Task, None] = {}  # insertion-ordered: kills cancel in creation order
        self._context = contextvars.copy_context()
        self._context.run(_process.set, self)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as a task of this process (from any context)."""
        return self.loop.create_task(coro, name=name, context=self._context.copy())

    def adopt(self, task: asyncio.Task) -> None:
        if not self.alive:
            task.cancel()  # a dead process starts nothing
            return
        self._tasks[task] = None
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)

    @property
    def tasks(self) -> int:
        return len(self._tasks)

    def kill(self) -> int:
        """Cancel every task of this process; returns how many were running."""
        self.alive = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return len(tasks)

    def __repr__(self) -> str:
        return f"<Process {self.name}{'' if self.alive else ' dead'}>"


def current_process() -> Process | None:
    """The simulated process the running code belongs to (None: the test driver itself)."""
    return _process.get()


class SimLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module docstring). Starts at ``start`` seconds.

    ``livelock_turns``: loop turns at one virtual instant before ``SimulationLivelock``.
    """

    def __init__(self, start: float = 0.0, *, livelock_turns: int = LIVELOCK_TURNS) -> None:
        self._now = float(start)
        self._livelock_turns = livelock_turns
        self._sampled_turns = min(_SAMPLED_TURNS, livelock_turns // 2)
        self._turns_at_now = 0
        self._sampled: collections.Counter[str] = collections.Counter()
        super().__init__(selector=VirtualSelector(self._advance, self._instant))

    def time(self) -> float:
        return self._now

    def _advance(self, seconds: float) -> None:
        self._now += seconds
        self._turns_at_now = 0
        self._sampled.clear()

    def _instant(self) -> None:
        """One more loop turn at the same virtual instant (the livelock guard, module docstring)."""
        self._turns_at_now += 1
        if self._turns_at_now <= self._livelock_turns - self._sampled_turns:
            return
        # ``_ready`` is asyncio's own ready queue (BaseEventLoop): read only, to name the culprits.
        self._sampled.update(_describe_callback(h) for h in getattr(self, "_ready", ()))
        if self._turns_at_now < self._livelock_turns:
            return
        top = "; ".join(f"{n}x {what}" for what, n in self._sampled.most_common(5))
        turns = self._turns_at_now
        self._turns_at_now = 0  # the caller's cleanup (cancelling what is left) gets a fresh budget
        self._sampled.clear()
        raise SimulationLivelock(
            f"virtual time stayed at {self._now:.6f}s for {turns} loop turns: some task never waits for "
            f"time (livelock); the ready callbacks over the last {self._sampled_turns} turns: {top or 'none'}"
        )

    def run_in_executor(self, executor: Executor | None, func: Callable[[*Ts], T], *args: *Ts) -> asyncio.Future[T]:
        """Run ``func(*args)`` now, on this thread; return a done future with its result."""
        fut: asyncio.Future[T] = self.create_future()
        try:
            fut.set_result(func(*args))
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:
            fut.set_exception(e)
        return fut

    def create_task(self, coro: Any, *, name: object = None, context: contextvars.Context | None = None) -> asyncio.Task:
        task = super().create_task(coro, name=name, context=context)
        owner = context.get(_process) if context is not None else _process.get()
        if owner is not None:
            owner.adopt(task)
        return task


def _describe_callback(handle: asyncio.Handle) -> str:
    """A ready callback, for a livelock report: a task's name and the coroutines it is suspended in."""
    task = getattr(getattr(handle, "_callback", None), "__self__", None)
    if not isinstance(task, asyncio.Task):
        return repr(handle)
    frames: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(frames) < 12:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return f"task {task.get_name()} in {' -> '.join(frames) or '?'}"


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0, livelock_turns: int = LIVELOCK_TURNS) -> T:
    """Run ``main`` to completion on a fresh ``SimLoop``; then cancel what is left and close.

    Leftover tasks are cancelled in creation order (not in the order of the
    loop's task set, which depends on object addresses).
    """
    loop = SimLoop(start, livelock_turns=livelock_turns)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = sorted(
                (t for t in asyncio.all_tasks(loop) if not t.done()), key=_creation_order
            )
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _creation_order(task: asyncio.Task) -> int:
    # Task names default to "Task-<n>" from a global counter: creation order.
    name = task.get_name()
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
