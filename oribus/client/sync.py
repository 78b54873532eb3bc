"""The synchronous API: the async implementation driven from a private event loop thread.

There is one implementation (``AsyncSession``); ``SyncSession`` and
``SyncTransaction`` forward each call to it on a loop running in a daemon
thread and wait for the result, so the semantics cannot drift apart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

from oribus.client.retry import Backoff, RetryPolicy
from oribus.client.session import AsyncSession, Transaction
from oribus.client.watch import WatchStream
from oribus.errors import OribusError, Unavailable
from oribus.types import SessionRef, WatchEvent

T = TypeVar("T")


class LoopThread:
    """An asyncio loop (uvloop when available) in a daemon thread."""

    _shared: ClassVar[LoopThread | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def shared(cls) -> LoopThread:
        """The loop every network client of the process runs on: started on first use, never closed.

        grpc's asyncio layer cancels a closed channel's calls without waiting for them, and
        delivers their last completions to the calls' loop some time later, from its own
        poller. Were that loop closed by then, each would print a "RuntimeError: Event loop
        is closed" traceback (when the next client's loop polls, or at exit); a loop that
        lives as long as the process takes them harmlessly.
        """
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="oribus-loop", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop; the caller waits on the returned future."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("synchronous oribus calls cannot be made from the client's own loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


def _forward(name: str, cls: type) -> Callable[..., Any]:
    target = getattr(cls, name)

    @functools.wraps(target)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(getattr(self._inner, name)(*args, **kwargs))

    return method


class SyncTransaction:
    """The synchronous face of a Transaction. Commits on normal ``with`` exit."""

    def __init__(self, inner: Transaction, portal: LoopThread) -> None:
        self._inner = inner
        self._portal = portal

    get = _forward("get", Transaction)
    get_many = _forward("get_many", Transaction)
    commit = _forward("commit", Transaction)

    def put(self, key: str, value: Any) -> None:
        self._inner.put(key, value)

    def delete(self, key: str) -> None:
        self._inner.delete(key)

    def expect(self, key: str, version: int) -> None:
        self._inner.expect(key, version)

    def rollback(self, key: str, version: int) -> None:
        self._inner.rollback(key, version)

    @property
    def versions(self) -> dict[str, int] | None:
        return self._inner.versions

    def __enter__(self) -> SyncTransaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._portal.call(self._inner.__aexit__(exc_type, exc, tb))


# How often a thread blocked in a watch checks that the loop still runs (it stops on close).
_LOOP_CHECK_SECONDS = 0.5


async def _next_or_end(stream: WatchStream) -> WatchEvent | None:
    """The stream's next event, or None once it has ended."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


class SyncWatch:
    """The synchronous face of a WatchStream: a plain iterator of WatchEvent.

    ``next()`` blocks until the next change; the iterator ends when ``close()``
    is called (from any thread) or the engine shuts down. Example::

        with bus.watch("team-a/", from_version=0) as changes:
            for ch in changes:
                print(ch.key, ch.version, ch.value)
    """

    def __init__(self, inner: WatchStream, portal: LoopThread) -> None:
        self._inner = inner
        self._portal = portal
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_seen(self) -> dict[str, int]:
        return self._inner.last_seen

    def __iter__(self) -> SyncWatch:
        return self

    def __next__(self) -> WatchEvent:
        if self._closed or not self._portal.loop.is_running():
            self._closed = True
            raise StopIteration
        fut = self._portal.submit(_next_or_end(self._inner))
        while True:
            try:
                event = fut.result(timeout=_LOOP_CHECK_SECONDS)
            except concurrent.futures.TimeoutError:
                if self._portal.loop.is_running():
                    continue
                fut.cancel()  # the loop stopped under us: the session was closed
                event = None
            except concurrent.futures.CancelledError:
                if not self._closed:
                    raise
                event = None  # close() from another thread cancelled the network read
            if event is None:
                self._closed = True
                raise StopIteration
            return event

    def close(self) -> None:
        """Stop watching; a ``next()`` blocked in another thread ends. Idempotent."""
        self._closed = True
        if self._portal.loop.is_running():
            self._portal.call(self._inner.aclose())

    def __enter__(self) -> SyncWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncSession:
    """The synchronous API: the same methods as AsyncSession, without ``await``.

    Example::

        with oribus.open_local_sync("./data", shards=2, agent="planner") as bus:
            item = bus.get("plan")
            bus.commit({"plan": {"steps": 3}})
            with bus.transaction() as tx:
                tx.put("b", (tx.get("a").value or 0) + 1)
    """

    def __init__(self, inner: AsyncSession, portal: LoopThread, *, owns_portal: bool = False,
                 owner: bool = False, watches: weakref.WeakSet[SyncWatch] | None = None) -> None:
        self._inner = inner
        self._portal = portal
        self._owns_portal = owns_portal  # close() stops the loop thread too
        self._owner = owner or owns_portal  # close() releases the engine or connection: warn if never called
        self._closed = False
        # Watches open on this connection, its other sessions' included, and this session's own:
        # close() ends them (all of them if it closes the connection), so a next() blocked in
        # another thread returns even though the loop keeps running.
        self._watches: weakref.WeakSet[SyncWatch] = weakref.WeakSet() if watches is None else watches
        self._own_watches: weakref.WeakSet[SyncWatch] = weakref.WeakSet()

    get = _forward("get", AsyncSession)
    get_many = _forward("get_many", AsyncSession)
    commit = _forward("commit", AsyncSession)
    put = _forward("put", AsyncSession)
    delete = _forward("delete", AsyncSession)
    rollback = _forward("rollback", AsyncSession)
    history = _forward("history", AsyncSession)
    forget = _forward("forget", AsyncSession)
    reset_session = _forward("reset_session", AsyncSession)
    stats = _forward("stats", AsyncSession)
    register = _forward("register", AsyncSession)
    scan = _forward("scan", AsyncSession)

    @property
    def agent(self) -> str:
        return self._inner.agent

    @property
    def session_id(self) -> str:
        return self._inner.session_id

    @property
    def session_ref(self) -> SessionRef:
        return self._inner.session_ref

    @property
    def async_session(self) -> AsyncSession:
        """The async session behind this one (use it only on ``loop``)."""
        return self._inner

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop, running in its own thread, that this session's calls run on."""
        return self._portal.loop

    def session(self, agent: str | None = None, session_id: str | None = None, **kw: Any) -> SyncSession:
        return SyncSession(self._inner.session(agent, session_id, **kw), self._portal, watches=self._watches)

    def transaction(self) -> SyncTransaction:
        return SyncTransaction(self._inner.transaction(), self._portal)

    def watch(
        self, prefix: str = "", from_version: int | None = None, *, policy: RetryPolicy | None = None
    ) -> SyncWatch:
        """Changes of keys under ``prefix`` as a plain iterator (see AsyncSession.watch).

        Subscribed when this returns: every change made visible afterwards is delivered.
        """
        inner = self._inner.watch(prefix, from_version, policy=policy)
        self._portal.call(inner.start())
        watch = SyncWatch(inner, self._portal)
        self._watches.add(watch)
        self._own_watches.add(watch)
        return watch

    def run(self, fn: Callable[[SyncTransaction], T], *, retries: int = 20, policy: RetryPolicy | None = None) -> T:
        """Call ``fn(tx)`` in a fresh transaction and commit, retrying on Conflict (see AsyncSession.run)."""
        backoff = Backoff(policy or RetryPolicy(retries=retries))
        while True:
            tx = self.transaction()
            try:
                result = fn(tx)
                tx.commit()
                return result
            except OribusError as e:
                if (
                    isinstance(e, Unavailable)
                    and tx._inner.sent
                    and self._portal.call(self._inner._settle(tx._inner, backoff.policy))
                ):
                    return result  # the commit did apply; only its answer was lost
                delay = backoff.after(e)
                if delay is None:
                    raise
            time.sleep(delay)

    def close(self) -> None:
        """Close the engine this session owns (if any) and its loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watches if self._owner else self._own_watches):
            if not watch.closed:
                watch.close()
        self._portal.call(self._inner.close())
        if self._owns_portal:
            self._portal.stop()

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._owner and not self._closed:
            warnings.warn("oribus sync session was never closed", ResourceWarning, stacklevel=1)
