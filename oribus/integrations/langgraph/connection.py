"""What the saver and the store share: opening a bus from one string, and their sync face.

LangGraph calls a checkpointer's and a store's synchronous methods from worker
threads (``graph.invoke``) and their ``a``-methods from the event loop
(``graph.ainvoke``). An oribus ``AsyncSession`` lives on one event loop, so the
synchronous methods hand their coroutine to that loop and wait (``LoopBridge``);
a ``SyncSession`` brings its own loop thread, which serves the same purpose.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import oribus
from oribus.client import AsyncSession, SyncSession

T = TypeVar("T")

# "host:port", "[v6]:port" or "name:port": an address to connect to; anything else is a data dir.
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):\d+$")

Bus = AsyncSession | SyncSession


def is_address(conn: str) -> bool:
    """True if ``conn`` names a bus to connect to (``host:port``), not a data directory."""
    return bool(_ADDRESS.match(conn)) and not Path(conn).exists()


@asynccontextmanager
async def open_bus(conn: str, *, agent: str, **options: Any) -> AsyncIterator[AsyncSession]:
    """An oribus session from one string: ``host:port`` connects to a running bus
    (``oribus.connect``), anything else opens (or creates) an embedded engine in
    that data directory (``oribus.open_local``). ``options`` go to that call."""
    if not isinstance(conn, str) or not conn:
        raise oribus.InvalidRequest("the connection string must be 'host:port' or a data directory")
    if is_address(conn):
        async with oribus.connect(conn, agent=agent, **options) as session:
            yield session
    else:
        async with oribus.open_local(conn, agent=agent, **options) as session:
            yield session


class LoopBridge:
    """Runs the async implementation for the sync methods, on the loop the session lives on."""

    def __init__(self, bus: Bus) -> None:
        if isinstance(bus, SyncSession):
            self.session: AsyncSession = bus.async_session
            self.loop: asyncio.AbstractEventLoop | None = bus.loop
        elif isinstance(bus, AsyncSession):
            self.session = bus
            try:
                self.loop = asyncio.get_running_loop()
            except RuntimeError:
                self.loop = None  # bound on first async use
        else:
            raise oribus.InvalidRequest(
                f"expected an oribus session (oribus.open_local, oribus.connect), not {type(bus).__name__}")

    def bind(self) -> None:
        """Remember the running loop (called by every async method)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the session's loop from a thread that is not that loop's."""
        loop = self.loop
        if loop is None or not loop.is_running():
            coro.close()
            raise RuntimeError(
                "the synchronous methods need the oribus session's event loop running in "
                "another thread: use the async methods (graph.ainvoke), or open the bus with "
                "oribus.open_local_sync / oribus.Client")
        if _running_loop() is loop:
            coro.close()
            raise RuntimeError(
                "synchronous checkpointer/store calls cannot run on the session's own event "
                "loop: use the async methods (graph.ainvoke, store.aget, ...)")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()


# Keys one session may read before the integration moves to a fresh one: below the delivery
# log's per-session cap (DeliveryLogConfig.max_entries_per_session, 100,000 distinct keys).
ROTATE_AFTER_KEYS = 50_000


class RotatingSession:
    """The integration's own session on the caller's bus, replaced by a fresh one after
    ``ROTATE_AFTER_KEYS`` keys read.

    Every read is a delivery the bus logs for the session; the saver reads each checkpoint
    key once or twice and never needs those deliveries again, so without rotation a
    long-lived saver would reach the per-session cap. A transaction in flight keeps the
    session it started on; the old session's records expire with the bus's session TTL.
    Its own session (same agent, its own session id) also keeps the integration's reads
    out of the read set of the caller's session. It is never ``strict``: the integration
    writes keys it did not read (a new checkpoint, its channel values) by design.
    """

    def __init__(self, base: AsyncSession) -> None:
        self._base = base
        self._current = base.session(strict=False)
        self._keys_read = 0

    def for_reading(self, keys: int) -> AsyncSession:
        """The session to read ``keys`` keys with (rotated first if it has read enough)."""
        self._keys_read += keys
        if self._keys_read > ROTATE_AFTER_KEYS:
            self._current = self._base.session(strict=False)
            self._keys_read = keys
        return self._current


def current_reader() -> object:
    """Who is reading: the asyncio task, else the thread."""
    return _current_task() or threading.current_thread()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
