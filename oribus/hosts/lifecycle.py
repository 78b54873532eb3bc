"""What every oribus process host shares: how it stops what it started, and how it learns to stop.

A host starts its parts one after the other — a data directory lock, shards, a session
journal, shard processes, the HTTP gateway, the gRPC server, background tasks (the
transaction sweep), a claim in the cluster metadata — and registers each on a
``Teardown`` right after it has started::

    teardown = Teardown(log)
    async with teardown.stop_on_error():       # a failed start stops what it started, then raises
        lock = DataDirLock.acquire(path)
        teardown.push("data directory lock", lock.release)
        await server.start()
        teardown.push("gRPC server", server.stop, graceful=True)
    ...
    await teardown.stop()                       # the gRPC server, then the lock

``stop()`` stops the parts last started first, so a part never outlives what it uses.
Every step runs even when an earlier one failed: the failure is logged with the part's
name and, once every step has run, the first one is raised (on the error path of
``stop_on_error`` the start's own error is raised instead). A graceful part is handed
the grace period, the seconds it may let work in flight finish before it stops hard.
A second ``stop()`` does nothing; one made while the first runs waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_GRACE_SECONDS = 2.0  # a gRPC server's calls in flight get this long to finish on stop

CANCEL_REPEAT_SECONDS = 0.1  # a background task still running this long after its cancel is cancelled again

_log = logging.getLogger("oribus.hosts.lifecycle")


@dataclass(frozen=True)
class _Step:
    name: str  # what the log calls the part: "gRPC server", "shard 1", ...
    stop: Callable[..., Any]  # plain or async; called with the grace when graceful
    graceful: bool


class Teardown:
    """The parts a host started, to be stopped in reverse order (see the module docstring)."""

    def __init__(self, log: logging.Logger | None = None, *, grace: float = DEFAULT_GRACE_SECONDS) -> None:
        self.log = log or _log
        self.grace = grace  # what a graceful part gets when stop() names no grace
        self._steps: list[_Step] = []
        self._stopping: asyncio.Future[list[tuple[str, BaseException]]] | None = None

    def push(self, name: str, stop: Callable[..., Any], *, graceful: bool = False) -> None:
        """Register a part that has just started: ``stop()`` (``stop(grace)`` if ``graceful``)
        stops it, plain or async. Parts pushed after a stop make a new round (a host may be
        started again)."""
        self._steps.append(_Step(name, stop, graceful))

    def push_task(self, name: str, task: asyncio.Task) -> None:
        """Register a background task: on stop, cancelled and waited for (``cancel_and_wait``)."""
        self.push(name, lambda: cancel_and_wait(task))

    async def stop(self, grace: float | None = None) -> None:
        """Stop every registered part, last started first; raise the first failure once
        every step has run. Idempotent: a second call does nothing (while the first still
        runs, it waits for it)."""
        started, failures = await self._run(self.grace if grace is None else grace)
        if started and failures:
            raise failures[0][1]

    @contextlib.asynccontextmanager
    async def stop_on_error(self) -> AsyncIterator[Teardown]:
        """Around a start: if the block raises (a cancel too), stop what it started, each
        failure logged, and re-raise the block's own error."""
        try:
            yield self
        except BaseException:
            await self._run(self.grace)
            raise

    async def __aenter__(self) -> Teardown:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Stop everything when the block ends; its own error, if any, wins over a step's."""
        if exc_type is None:
            await self.stop()
        else:
            await self._run(self.grace)

    async def _run(self, grace: float) -> tuple[bool, list[tuple[str, BaseException]]]:
        """(whether this call started the round, the round's failures)."""
        started = self._stopping is None or (self._stopping.done() and bool(self._steps))
        if started:
            steps, self._steps = self._steps, []
            # In a task of its own, shielded: a caller cancelled mid-stop does not leave half
            # the parts running (the stop goes on; the caller sees its CancelledError).
            self._stopping = asyncio.ensure_future(self._run_steps(steps, grace))
        assert self._stopping is not None
        return started, await asyncio.shield(self._stopping)

    async def _run_steps(self, steps: list[_Step], grace: float) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []
        for step in reversed(steps):
            self.log.debug("stopping %s", step.name)
            try:
                done = step.stop(grace) if step.graceful else step.stop()
                if inspect.isawaitable(done):
                    await done
            except BaseException as e:  # noqa: BLE001 - logged, the other parts must still stop
                self.log.error("stopping %s failed: %s: %s", step.name, type(e).__name__, e,
                               exc_info=e if not isinstance(e, asyncio.CancelledError) else None)
                failures.append((step.name, e))
        return failures


async def cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait until it has ended; raise what it failed with, if anything
    but the cancel.

    The cancel is repeated while the task runs: before Python 3.12, a task cancelled while
    in ``asyncio.wait_for`` just as the awaited reply arrives gets the reply and loses the
    cancel (python/cpython#86296), and a loop such as the transaction sweep, whose shard
    calls wait that way, would then go on — and a stop that waits for it, hang.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_REPEAT_SECONDS)
    failure = None if task.cancelled() else task.exception()
    if failure is not None:
        raise failure


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for a child process told where to listen)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_signal_event() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM. Install it before starting anything, so a
    signal that arrives during start-up still leads to a graceful stop."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
