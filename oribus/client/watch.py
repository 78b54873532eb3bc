"""Resumable watches of the client API: ``session.watch(prefix, from_version)``.

The stream the bus gives can break: a watcher that falls behind is cut off
(WatchLagged), a shard or the bus can become unreachable (Unavailable). The
client remembers the last version it delivered of each key and opens the watch
again from there — per key, so a key with many versions never forces a long
replay of the others — and skips anything it already delivered. Keys not seen
yet resume from the watch's ``from_version``; for a watch of live changes only
(``from_version=None``) they resume from the changes committed since the watch
began, minus ``RESUME_MARGIN_SECONDS`` for commits that were in flight when it
began and for clock skew: such a key may then repeat a change made just before
the watch began, but a change made after it is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from oribus.client.retry import RetryPolicy
from oribus.contract import BusService, ensure_subscribed
from oribus.errors import OribusError, Unavailable
from oribus.messages import Change, WatchRequest
from oribus.types import WatchEvent, decode_value

RESUME_MARGIN_SECONDS = 10.0

# Re-subscribing: a few quick attempts first (a cut-off watcher resumes at once),
# then up to a couple of seconds apart (a shard or bus restarting).
DEFAULT_WATCH_RETRY = RetryPolicy(retries=10, base_delay=0.02, max_delay=2.0)


class WatchStream:
    """Changes of keys under a prefix as they become visible; resumes by itself after a break.

    Example::

        async with session.watch("team-a/", from_version=0) as changes:
            async for ch in changes:
                print(ch.key, ch.version, ch.value, "by", ch.agent)

    Each key's changes arrive in version order, each once; deletes and
    rollbacks are changes like any other, aborted commits never appear.
    ``from_version=None`` watches live changes only; an int first replays
    every kept version after it (HistoryTruncated if some are no longer kept).
    The watch subscribes on ``start()``, on entering ``async with`` or on the
    first ``__anext__``: every change made visible after that is delivered.
    A retryable break (WatchLagged, Unavailable) is resumed from the last
    versions seen, at most ``policy.retries`` times in a row with jittered
    backoff; then the error is raised. Watching records no delivery: what a
    watch shows never becomes part of a commit's read set.
    """

    def __init__(
        self,
        bus: BusService,
        prefix: str = "",
        from_version: int | None = None,
        *,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.request = WatchRequest(prefix, from_version)  # validated here, before any call
        self._bus = bus
        self.policy = policy or DEFAULT_WATCH_RETRY
        self._stream: AsyncIterator[Change] | None = None
        self._seen: dict[str, int] = {}  # key -> last version delivered
        self._started_at: float | None = None
        self._failures = 0  # consecutive breaks without a change delivered
        self._closed = False

    @property
    def prefix(self) -> str:
        return self.request.prefix

    @property
    def from_version(self) -> int | None:
        return self.request.from_version

    @property
    def last_seen(self) -> dict[str, int]:
        """The last version delivered of each key (what a resume starts after)."""
        return dict(self._seen)

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> WatchStream:
        """Subscribe now (idempotent). Returns self."""
        if self._stream is None and not self._closed:
            await self._open()
        return self

    async def aclose(self) -> None:
        """Stop watching. A pending ``__anext__`` ends with StopAsyncIteration. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._drop_stream()

    async def __aenter__(self) -> WatchStream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- iteration -------------------------------------------------------------------

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._stream is None:
                await self._open()
            stream = self._stream
            assert stream is not None
            try:
                change = await stream.__anext__()
            except StopAsyncIteration:
                await self.aclose()  # the engine shut down: the watch is over
                raise
            except Unavailable as e:  # retryable: WatchLagged, or a shard or the bus unreachable
                await self._drop_stream()
                if self._closed:
                    raise StopAsyncIteration from None
                await self._backoff(e)
                continue
            except OribusError:
                await self.aclose()
                raise
            if change.version <= self._seen.get(change.key, -1):
                continue  # delivered before the stream was resumed
            self._seen[change.key] = change.version
            self._failures = 0
            return WatchEvent(
                change.key,
                change.version,
                decode_value(change.value),
                change.deleted,
                change.agent,
                change.session,
                change.commit_id,
                change.committed_at,
            )

    # ---- subscribing -------------------------------------------------------------------

    async def _open(self) -> None:
        while True:
            try:
                if self._started_at is None:
                    began = time.time()
                    self._stream = self._bus.watch(self.request)
                    self._started_at = began
                else:
                    self._stream = self._bus.watch(self._resume_request())
                await ensure_subscribed(self._stream)
                return
            except Unavailable as e:
                await self._backoff(e)
            except OribusError:
                await self.aclose()
                raise

    def _resume_request(self) -> WatchRequest:
        """The watch again after a break: each key seen after its last version delivered;
        with no ``from_version``, the others from when the watch began (less the margin)."""
        since = None
        if self.request.from_version is None:
            assert self._started_at is not None
            since = self._started_at - RESUME_MARGIN_SECONDS
        return replace(self.request, after=self._seen, since=since)

    async def _backoff(self, error: OribusError) -> None:
        self._failures += 1
        if self._failures > self.policy.retries:
            await self.aclose()
            raise error
        await asyncio.sleep(self.policy.delay(self._failures - 1))

    async def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
