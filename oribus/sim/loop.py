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
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar, TypeVarTuple

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_process: contextvars.ContextVar[Process | None] = contextvars.ContextVar("oribus_sim_process", default=None)


class SimulationStalled(RuntimeError):
    """Every task is blocked and no timer is pending: nothing can ever happen again."""


class VirtualSelector(selectors.BaseSelector):
    """A selector that never blocks: waiting ``timeout`` seconds advances the virtual clock.

    Registrations (the loop's self-pipe) go to a real selector, polled with a
    zero timeout, so ``call_soon_threadsafe`` and signals still work.
    """

    def __init__(self, loop_clock: Callable[[float], None]) -> None:
        self._real = selectors.DefaultSelector()
        self._advance = loop_clock

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
    """An event loop on virtual time (see the module docstring). Starts at ``start`` seconds."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        super().__init__(selector=VirtualSelector(self._advance))

    def time(self) -> float:
        return self._now

    def _advance(self, seconds: float) -> None:
        self._now += seconds

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


def run(main: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """Run ``main`` to completion on a fresh ``SimLoop``; then cancel what is left and close.

    Leftover tasks are cancelled in creation order (not in the order of the
    loop's task set, which depends on object addresses).
    """
    loop = SimLoop(start)
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
