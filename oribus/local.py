"""``open_local``: the embedded engine behind the client API, in this process.

Outside ``oribus.client`` because it joins the two sides: the SDK's sessions and
the bus they run on, which the SDK itself never imports (tests/unit/test_layering.py).
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from oribus.client.session import AsyncSession
from oribus.client.sync import LoopThread, SyncSession
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig


class _Opening:
    """Awaitable and async context manager returned by ``open_local``."""

    def __init__(self, config: EngineConfig, agent: str, session_id: str | None, strict: bool) -> None:
        self._config = config
        self._agent = agent
        self._session_id = session_id
        self._strict = strict
        self._session: AsyncSession | None = None

    async def _open(self) -> AsyncSession:
        engine = await EmbeddedEngine.open(self._config)
        return AsyncSession(
            engine.bus,
            self._agent,
            self._session_id,
            strict=self._strict,
            max_value_bytes=self._config.max_value_bytes,
            owner=engine,
        )

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._open()
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()


def open_local(
    path: str | Path = "./oribus-data",
    *,
    shards: int | None = None,
    agent: str = "agent",
    session_id: str | None = None,
    strict: bool = False,
    **options: Any,
) -> _Opening:
    """Open (or create) an embedded oribus in ``path`` with ``shards`` shards.

    ``shards=None`` opens a directory with the count it was created with and
    creates a new one with a single shard (in one process more shards add
    two-phase commits and no parallelism).

    Use ``async with oribus.open_local(...) as bus:`` or ``bus = await
    oribus.open_local(...)`` then ``await bus.close()``. ``options`` are
    fields of ``EngineConfig`` (history_limit, session_ttl_seconds,
    unsafe_no_fsync, ...).
    """
    return _Opening(EngineConfig(data_dir=Path(path), shards=shards, **options), agent, session_id, strict)


def open_local_sync(
    path: str | Path = "./oribus-data",
    *,
    shards: int | None = None,
    agent: str = "agent",
    session_id: str | None = None,
    strict: bool = False,
    **options: Any,
) -> SyncSession:
    """The synchronous twin of ``open_local``; close it (or use ``with``)."""
    portal = LoopThread()
    try:
        inner = portal.call(
            _Opening(EngineConfig(data_dir=Path(path), shards=shards, **options), agent, session_id, strict)._open()
        )
    except BaseException:
        portal.stop()
        raise
    return SyncSession(inner, portal, owns_portal=True)
