"""Watch streams of one shard: replay from the kept history, then live changes.

How a watch joins the history and the live changes with no gap and no duplicate:

1. the ``Watcher`` is registered with the shard first — from then on every
   change that becomes visible is queued for it;
2. the replay is planned from the kept history in the same step (no await in
   between, so no commit is applied in the middle): per key, in version
   order, the versions the request asks for, up to the one current at
   registration (``plan_replay``);
3. the stream yields the replay, then the queue, skipping a queued change
   whose key the replay already gave at that version or later — a guard that
   keeps the join exact should planning ever stop being a single step.

Live changes are offered only after ``apply_commit`` made them visible, so an
aborted or refused commit never reaches a watcher, and offering never blocks
the shard: each watcher has a bounded queue, and one that fills is cut off — it
yields what it holds, then raises WatchLagged — so that it can resume from the
last version it saw of each key. Closing the shard ends every stream once its
queue is drained. A watch records no delivery: watching is not reading.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from oribus.contract import Entry
from oribus.errors import DataCorrupted, HistoryTruncated, OribusError, WatchLagged
from oribus.messages import Change, WatchRequest
from oribus.shards.history import HistoryView
from oribus.shards.store import VersionedStore
from oribus.shards.txn import Txn

DEFAULT_QUEUE_LIMIT = 10_000  # live changes queued per watcher; a fuller one is cut off (WatchLagged)


def change_from_entry(key: str, e: Entry) -> Change:
    return Change(key, e.version, e.value, e.deleted, e.agent, e.session, e.commit_id, e.committed_at)


def changes_of(txn: Txn) -> list[Change]:
    """The writes of a committed transaction, as the store now holds them."""
    agent, session = txn.session[0], txn.session[1]
    return [
        Change(k, w.version, None if w.deleted else w.value, w.deleted, agent, session, txn.txn_id,
               txn.committed_at)
        for k, w in txn.writes.items()
    ]


@dataclass
class Replay:
    """A planned replay: the changes in order (lazily read from a history view), the last
    version it gives of each key, and ``close`` to release the view early."""

    changes: Iterator[Change]
    last: dict[str, int]
    close: Callable[[], None] = lambda: None


def plan_replay(store: VersionedStore, req: WatchRequest) -> list[Change]:
    """The kept versions ``req`` asks for, as one list (``replay_plan``, read at once)."""
    replay = replay_plan(store, req)
    try:
        return list(replay.changes)
    finally:
        replay.close()


def replay_plan(store: VersionedStore, req: WatchRequest) -> Replay:
    """The kept versions ``req`` asks for: per key in version order, keys in key order.

    Raises HistoryTruncated, naming the keys, when a key's wanted versions begin
    before the oldest version kept — a replay never skips silently. Everything is
    decided now (which keys, which versions, what is current); with a history store
    on disk the older versions are then read as the watcher consumes them, from a
    view taken now (``HistoryStore.view``), so a replay of a deep history holds
    little memory and later commits cannot take a planned version from it.
    """
    if req.from_version is None and req.since is None:
        keys = sorted(req.after)  # only resumed keys replay anything
    else:
        keys = store.keys(req.prefix)
    # keys with no position of their own (reached only when ``since`` is set)
    since = req.since if req.since is not None else float("inf")
    view = store.older.view()
    # per key: the entries read now (newest first), or the range still to read from ``view``
    parts: list[tuple[str, list[Entry] | tuple[int, Entry]]] = []
    last: dict[str, int] = {}
    truncated: list[tuple[str, object, int, int, str]] = []  # key, asked after, oldest, current, rule
    try:
        for key in keys:
            current = store.current(key)
            if current is None:
                continue
            start = req.after.get(key, req.from_version)
            if start is not None:
                if current.version <= start:
                    continue
                oldest = store.oldest_version(key)
                if oldest > start + 1:
                    truncated.append((key, start, oldest, current.version, store.dropped_by(key, start + 1)))
                    continue
                if view is not None:
                    parts.append((key, (start + 1, current)))
                    last[key] = current.version
                    continue
                wanted = []  # read newest first, only as far back as asked
                for e in store.iter_history(key):
                    if e.version <= start:
                        break
                    wanted.append(e)
            else:
                if current.committed_at < since:
                    continue
                wanted = []  # the newest versions, back to the first one committed before ``since``
                reached = False
                for e in store.iter_history(key):
                    if e.committed_at < since:
                        reached = True
                        break
                    wanted.append(e)
                if not reached and wanted[-1].version > 1:
                    # Every kept version is recent: older ones, now gone, may have been too. Unless
                    # the age rule dropped them (the count rule keeps more) before a time at or
                    # below ``since``: then each was committed before it, and nothing is missed.
                    by_age = wanted[-1].version > store.lowest_by_count(key)
                    if not (by_age and since >= store.age_horizon):
                        truncated.append((key, f"time {since}", wanted[-1].version, current.version,
                                          "age" if by_age else "count"))
                        continue
            parts.append((key, wanted))
            last[key] = current.version
        if truncated:
            shown = ", ".join(f"{k!r} after {s} (kept {o}..{c}, dropped by the {r} limit)"
                              for k, s, o, c, r in truncated[:5])
            more = f" and {len(truncated) - 5} more" if len(truncated) > 5 else ""
            rules = " and ".join(store.rule_text(r) for r in sorted({t[4] for t in truncated}))
            raise HistoryTruncated(
                f"watch of {req.prefix!r} asks for versions no longer kept ({rules}): {shown}{more}; "
                "read the current values and watch from their versions",
                keys=[[k, s, o] for k, s, o, _, _ in truncated[:20]],
                rules={k: r for k, _, _, _, r in truncated[:20]},  # key -> "count" or "age"
            )
    except BaseException:
        if view is not None:
            view.close()
        raise
    if view is None:
        return Replay(iter([change_from_entry(k, e) for k, part in parts if isinstance(part, list)
                            for e in reversed(part)]), last)
    return Replay(_read_parts(parts, view), last, view.close)


def _read_parts(parts: list[tuple[str, list[Entry] | tuple[int, Entry]]], view: HistoryView) -> Iterator[Change]:
    try:
        for key, part in parts:
            if isinstance(part, list):
                yield from (change_from_entry(key, e) for e in reversed(part))
                continue
            first, current = part
            expect = first
            for version, value, meta in view.ascending(key, first, current.version - 1):
                if version != expect:
                    break
                yield Change(key, version, value, value is None, meta[0], meta[1], meta[2], meta[3])
                expect += 1
            if expect != current.version:
                raise DataCorrupted(
                    f"the history store lacks version {expect} of {key!r}, which it held when this "
                    f"watch was planned (kept {first}..{current.version})", key=key, version=expect)
            yield change_from_entry(key, current)
    finally:
        view.close()


class Watcher:
    """One watch on one shard: an async iterator of Change (replay, then live).

    The shard calls ``offer`` for each change made visible and ``end`` when it
    closes; ``detach`` is called once, when the watcher stops receiving.
    """

    def __init__(
        self,
        prefix: str,
        *,
        shard_id: int,
        limit: int = DEFAULT_QUEUE_LIMIT,
        detach: Callable[[Watcher], None],
    ) -> None:
        self.prefix = prefix
        self.shard_id = shard_id
        self.limit = limit
        self.lagged = False
        self._detach = detach
        self._replay: Iterator[Change] | None = None
        self._close_replay: Callable[[], None] = lambda: None  # releases the replay's history view
        self._replayed: dict[str, int] = {}  # key -> last version the replay gives
        self._live: deque[Change] = deque()
        self._ready = asyncio.Event()
        self._ended = False
        self._error: OribusError | None = None

    def set_replay(self, changes: Replay | Iterable[Change]) -> None:
        """What to give before the live changes: a ``Replay`` (read as it is consumed), or changes."""
        if isinstance(changes, Replay):
            self._replay, self._replayed, self._close_replay = changes.changes, dict(changes.last), changes.close
            return
        listed = list(changes)
        self._replay = iter(listed)
        for c in listed:
            self._replayed[c.key] = c.version

    def offer(self, change: Change) -> None:
        """Queue a change that just became visible. Never blocks; cuts the watcher off when full."""
        if self._ended:
            return
        if len(self._live) >= self.limit:
            self.lagged = True
            self._end(
                WatchLagged(
                    f"watcher of {self.prefix!r} on shard {self.shard_id} fell {self.limit} changes "
                    "behind and was cut off; resume from the last version seen of each key",
                    shard=self.shard_id,
                )
            )
            return
        self._live.append(change)
        self._ready.set()

    def end(self) -> None:
        """The shard is closing: the stream ends (without error) once its queue is drained."""
        self._end(None)

    def _end(self, error: OribusError | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = error
        self._detach(self)
        self._ready.set()

    async def subscribed(self) -> None:
        """Already true: the shard registers a watcher before handing it out."""

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> Change:
        while True:
            if self._replay is not None:
                try:
                    return next(self._replay)
                except StopIteration:
                    self._replay = None
                    self._close_replay()
                except BaseException:
                    self._replay = None
                    self._close_replay()
                    raise
            if self._live:
                c = self._live.popleft()
                if self._replayed and c.version <= self._replayed.get(c.key, 0):
                    continue
                return c
            if self._ended:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        """Stop watching now. A pending ``__anext__`` ends with StopAsyncIteration. Idempotent."""
        self._replay = None
        self._close_replay()
        self._live.clear()
        self._error = None
        self._end(None)
        self._ready.set()

    async def aclose(self) -> None:
        self.close()
