"""One watch over every shard: the shards' change streams merged into one.

Each shard's stream is drained by its own task into one bounded queue; the
consumer reads the queue. A key lives on exactly one shard, so the order of
each key's versions is kept; changes of different keys (or shards) are
interleaved as they arrive. Backpressure goes to the shards: a pump waits when
the queue is full, so a slow consumer makes the shards' own bounded queues
fill, and they cut the watch off (WatchLagged) rather than slow down commits.

The merged stream ends with the first error of any shard (after the changes
queued before it), and without error when any shard's stream ends (a shard
that shut down: the merged stream can no longer see every key).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from oribus.contract import ensure_subscribed
from oribus.messages import Change

MERGE_QUEUE_SIZE = 256  # changes handed over; the shards' own queues are the real buffer

_END = None  # queued when a shard's stream ended


class MergedWatch:
    """An async iterator of Change over several shards' watch streams."""

    def __init__(self, streams: Sequence[AsyncIterator[Change]], queue_size: int | None = None) -> None:
        self._streams = list(streams)
        self._queue: asyncio.Queue[Change | BaseException | None] = asyncio.Queue(queue_size or MERGE_QUEUE_SIZE)
        self._pumps: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False

    async def _pump(self, stream: AsyncIterator[Change]) -> None:
        try:
            async for change in stream:
                await self._queue.put(change)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the consumer raises it, after what came before it
            await self._queue.put(e)
            return
        await self._queue.put(_END)

    async def subscribed(self) -> None:
        """Return once every shard's stream is subscribed (remote ones answer first)."""
        await asyncio.gather(*(ensure_subscribed(s) for s in self._streams))
        self._start()

    def _start(self) -> None:
        if not self._started:
            self._started = True
            loop = asyncio.get_running_loop()
            self._pumps = [loop.create_task(self._pump(s)) for s in self._streams]

    def __aiter__(self) -> MergedWatch:
        return self

    async def __anext__(self) -> Change:
        if self._closed:
            raise StopAsyncIteration
        self._start()
        item = await self._queue.get()
        if self._closed or item is _END:
            await self.aclose()
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        return item

    async def aclose(self) -> None:
        """Stop every shard's stream. A pending ``__anext__`` ends with StopAsyncIteration."""
        if self._closed:
            return
        self._closed = True
        for t in self._pumps:
            t.cancel()
        for t in self._pumps:
            with contextlib.suppress(BaseException):
                await t
        for s in self._streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_END)  # wake a reader waiting on an empty queue
