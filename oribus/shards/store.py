"""The versioned key/value store of one shard (in memory; the WAL makes it durable).

Each key keeps its last H versions (``history_limit``, ``types.DEFAULT_HISTORY_LIMIT``), newest
last; the newest is the current value. A key that was never written reads as
version 0 with no value; a delete is a version of its own with no value.

``apply`` is idempotent by version (a write whose version is not newer than
the key's current one is skipped): recovery replays the WAL from a snapshot's
low-water mark and may meet writes the snapshot already holds.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

from oribus.contract import Entry
from oribus.types import DEFAULT_HISTORY_LIMIT, SessionRef


class _History(deque[Entry]):
    """A key's versions, oldest first, remembering the canonical key object."""

    __slots__ = ("key",)
    key: str


class VersionedStore:
    """key -> bounded history of Entry; the last entry is the current version."""

    def __init__(self, history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be >= 1")
        self.history_limit = history_limit
        self._keys: dict[str, _History] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def intern(self, key: str) -> str:
        """The store's own copy of ``key`` when it holds one (saves memory in delivery logs)."""
        h = self._keys.get(key)
        return key if h is None else h.key

    def version(self, key: str) -> int:
        h = self._keys.get(key)
        return h[-1].version if h else 0

    def current(self, key: str) -> Entry | None:
        h = self._keys.get(key)
        return h[-1] if h else None

    def apply(
        self,
        key: str,
        version: int,
        value: bytes | None,
        deleted: bool,
        session: SessionRef,
        commit_id: str,
        committed_at: float,
    ) -> bool:
        """Make ``version`` the key's current version. False if already there (replay)."""
        h = self._keys.get(key)
        if h is None:
            h = self._keys[key] = _History((), self.history_limit)
            h.key = key
        elif h[-1].version >= version:
            return False
        h.append(
            Entry(version, None if deleted else value, deleted, session[0], session[1], commit_id, committed_at)
        )
        return True

    def entry_at(self, key: str, version: int) -> Entry | None:
        """The stored entry of ``key`` at ``version``, or None when not (or no longer) kept."""
        h = self._keys.get(key)
        if not h:
            return None
        first = h[0].version
        # versions in a deque are consecutive: index arithmetic, with a scan as a fallback
        i = version - first
        if 0 <= i < len(h) and h[i].version == version:
            return h[i]
        for e in h:
            if e.version == version:
                return e
        return None

    def oldest_version(self, key: str) -> int:
        h = self._keys.get(key)
        return h[0].version if h else 0

    def history(self, key: str, limit: int | None = None) -> list[Entry]:
        """Newest first."""
        h = self._keys.get(key)
        if not h:
            return []
        out = list(reversed(h))
        return out if limit is None else out[:limit]

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._keys if k.startswith(prefix))

    def live_keys_page(self, prefix: str, after: str, limit: int) -> list[str]:
        """Up to ``limit`` keys under ``prefix`` sorted after ``after``, deleted ones left out.

        O(keys x log limit): a listing for operators and S-Bus's ``GET /shards``,
        not a hot path.
        """
        found = (
            k for k, h in self._keys.items()
            if k > after and k.startswith(prefix) and h and not h[-1].deleted
        )
        return heapq.nsmallest(limit, found)

    # ---- snapshot form -------------------------------------------------------

    def to_snapshot(self) -> list[Any]:
        return [[k, [list(e) for e in h]] for k, h in self._keys.items()]

    def load_snapshot(self, data: list[Any]) -> None:
        self._keys.clear()
        for k, entries in data:
            h = self._keys[k] = _History((Entry(*e) for e in entries), self.history_limit)
            h.key = k
