"""The versioned key/value store of one shard (current versions in memory; the WAL makes it durable).

Each key keeps its last H versions (``history_limit``, ``types.DEFAULT_HISTORY_LIMIT``),
and, with an age limit (``history_max_age``), only those committed in its last
``history_max_age`` seconds, dropped by a background compaction
(``expire_by_age``, driven by ``oribus/shards/retention.py``); the newest is
the current value, kept whatever its age. A key that was never written reads as
version 0 with no value; a delete is a version of its own with no value.

Layout (issue 20: bytes per key are what limits a shard's size):

* ``_keys``: key -> ``(key, version, value, meta)``, one tuple per key holding
  its current version only. The key object itself is kept so delivery logs can
  share it (``intern``); ``value`` is None for a delete (stored values are
  encoded, so never None otherwise); ``meta = (agent, session, commit_id,
  committed_at)`` is one tuple shared by every key a commit wrote.
* the versions a write replaces go to a ``HistoryStore``
  (``oribus/shards/history/``): deques in memory (``MemoryHistory``), or an
  engine on disk (``LmdbHistory``), which then holds everything but the
  current versions.

``Entry`` objects are built on the way out (``current``, ``history``,
``entry_at``): the store keeps no per-version object beyond the tuples above.

``apply`` is idempotent by version (a write whose version is not newer than
the key's current one is skipped): recovery replays the WAL from a snapshot's
low-water mark and may meet writes the snapshot already holds. Writes to an
engine are idempotent by (key, version) too, so a replay may write a version
it already holds.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterator
from typing import Any

from oribus.contract import Entry
from oribus.errors import DataCorrupted, HistoryTruncated
from oribus.shards.history import HistoryStore, MemoryHistory, Meta, Older
from oribus.types import DEFAULT_HISTORY_LIMIT, SessionRef

_Current = tuple[str, int, "bytes | None", Meta]  # key, version, value (None: deleted), meta

SNAPSHOT_FORMAT = 2  # ``to_snapshot``'s form; 1 (a list of whole entries per key) still loads


def _entry(version: int, value: bytes | None, meta: Meta) -> Entry:
    return Entry(version, value, value is None, meta[0], meta[1], meta[2], meta[3])


class VersionedStore:
    """key -> current version in memory; older kept versions in ``history``."""

    def __init__(self, history_limit: int = DEFAULT_HISTORY_LIMIT, history: HistoryStore | None = None,
                 history_max_age: float | None = None) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be >= 1")
        self.history_limit = history_limit
        self.history_max_age = history_max_age  # seconds; None: no age rule
        # Every version the age rule dropped was committed before this time (the newest cutoff
        # ``expire_by_age`` used): a watch ``since`` a later time misses nothing it dropped.
        self.age_horizon = float("-inf")
        self.older: HistoryStore = history if history is not None else MemoryHistory(history_limit)
        self._keys: dict[str, _Current] = {}
        self._meta: Meta = ("", "", "", 0.0)  # the last commit's, shared by its keys

    def __len__(self) -> int:
        return len(self._keys)

    def intern(self, key: str) -> str:
        """The store's own copy of ``key`` when it holds one (saves memory in delivery logs)."""
        c = self._keys.get(key)
        return key if c is None else c[0]

    def version(self, key: str) -> int:
        c = self._keys.get(key)
        return c[1] if c is not None else 0

    def current(self, key: str) -> Entry | None:
        c = self._keys.get(key)
        return None if c is None else _entry(c[1], c[2], c[3])

    def _meta_for(self, agent: str, session: str, commit_id: str, committed_at: float) -> Meta:
        m = self._meta
        if m[2] == commit_id and m[3] == committed_at and m[0] == agent and m[1] == session:
            return m
        m = self._meta = (sys.intern(agent), sys.intern(session), commit_id, committed_at)
        return m

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
        c = self._keys.get(key)
        if c is not None:
            if c[1] >= version:
                return False
            key = c[0]
            self.older.put(key, (c[1], c[2], c[3]))
            if version - self.history_limit >= 1:
                self.older.forget_through(key, version - self.history_limit)
        meta = self._meta_for(session[0], session[1], commit_id, committed_at)
        self._keys[key] = (key, version, None if deleted else value, meta)
        return True

    def _lowest_kept(self, current: int) -> int:
        return max(1, current - self.history_limit + 1)

    def lowest_by_count(self, key: str) -> int:
        """The oldest version of ``key`` the count rule keeps (the age rule may keep fewer)."""
        c = self._keys.get(key)
        return 0 if c is None else self._lowest_kept(c[1])

    # ---- retention ------------------------------------------------------------

    def all_keys(self) -> list[str]:
        """Every key, unsorted (a compaction pass walks them in batches)."""
        return list(self._keys)

    def expire_by_age(self, keys: list[str], cutoff: float) -> int:
        """Drop the versions of ``keys`` committed before ``cutoff``, oldest first, never the
        current one. Returns how many it dropped."""
        if cutoff > self.age_horizon:
            self.age_horizon = cutoff
        dropped = 0
        for key in keys:
            c = self._keys.get(key)
            if c is None or c[1] <= 1:
                continue
            dropped += self.older.expire_older(key, cutoff, self._lowest_kept(c[1]), c[1])
        return dropped

    def dropped_by(self, key: str, version: int) -> str:
        """Which rule dropped ``version`` of ``key`` (not kept, not current): "count" or "age"."""
        return "count" if version < self.lowest_by_count(key) else "age"

    def rule_text(self, rule: str) -> str:
        if rule == "count":
            return f"the count limit (each key keeps its last {self.history_limit} versions)"
        return f"the age limit (versions committed more than {self.history_max_age:g}s ago are dropped)"

    def not_kept(self, key: str, version: int, what: str) -> HistoryTruncated:
        """The error for ``what`` (a rollback to, or a read of) ``version`` of ``key``, which
        retention dropped: it names the oldest version kept and the rule that dropped it."""
        oldest = self.oldest_version(key)
        rule = self.dropped_by(key, version)
        return HistoryTruncated(
            f"{what}: version {version} of {key!r} is no longer in its history (kept: {oldest}.."
            f"{self.version(key)}): dropped by {self.rule_text(rule)}",
            key=key, version=version, oldest=oldest, rule=rule)

    def entry_at(self, key: str, version: int) -> Entry | None:
        """The stored entry of ``key`` at ``version``, or None when not (or no longer) kept."""
        c = self._keys.get(key)
        if c is None:
            return None
        if version == c[1]:
            return _entry(c[1], c[2], c[3])
        if not self._lowest_kept(c[1]) <= version < c[1]:
            return None
        o = self.older.get(key, version)
        return None if o is None else _entry(*o)

    def oldest_version(self, key: str) -> int:
        c = self._keys.get(key)
        if c is None:
            return 0
        oldest = self.older.oldest(key, self._lowest_kept(c[1]))
        return c[1] if oldest is None else oldest

    def iter_history(self, key: str) -> Iterator[Entry]:
        """Newest first, lazily (an engine reads older versions only as far as asked)."""
        c = self._keys.get(key)
        if c is None:
            return
        yield _entry(c[1], c[2], c[3])
        for o in self._kept_run(key, c):
            yield _entry(*o)

    def _kept_run(self, key: str, c: _Current) -> Iterator[Older]:
        """The versions kept below ``key``'s current ``c``, newest first, lazily."""
        expect = c[1] - 1
        for o in self.older.newest_first(key, c[1], self._lowest_kept(c[1])):
            if o[0] != expect:
                return  # a gap (never in a consistent store): what is below it is not this key's kept run
            yield o
            expect -= 1

    def history(self, key: str, limit: int | None = None) -> list[Entry]:
        """Newest first."""
        out: list[Entry] = []
        if limit is not None and limit <= 0:
            return out
        for e in self.iter_history(key):
            out.append(e)
            if limit is not None and len(out) >= limit:
                break
        return out

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._keys if k.startswith(prefix))

    def live_keys_page(self, prefix: str, after: str, limit: int) -> list[str]:
        """Up to ``limit`` keys under ``prefix`` sorted after ``after``, deleted ones left out.

        O(keys x log limit): a listing for operators and S-Bus's ``GET /shards``,
        not a hot path.
        """
        found = (
            k for k, c in self._keys.items()
            if k > after and k.startswith(prefix) and c[2] is not None
        )
        return heapq.nsmallest(limit, found)

    def sizes_of(self, key: str) -> dict[str, int]:
        """Bytes (``sys.getsizeof``) of ``key``'s structures here, for benchmarks/memory_per_key.py."""
        c = self._keys.get(key)
        if c is None:
            return {}
        meta = c[3]
        return {
            "key": sys.getsizeof(c[0]),
            "current": sys.getsizeof(c),
            "value": sys.getsizeof(c[2]),
            "version": sys.getsizeof(c[1]),
            "meta (shared by a commit's keys)": sys.getsizeof(meta) + sum(sys.getsizeof(x) for x in meta),
            **self.older.sizes(key),
        }

    # ---- snapshot form -------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        """The store in a snapshot (``SNAPSHOT_FORMAT``): each commit's meta once, then flat
        runs of ``key, version, value, meta index`` (value None: a delete) — four scalars a
        version, so loading builds no list or tuple per version. ``older`` (oldest first per
        key, before the key's current version) only when the history store does not persist
        versions itself."""
        index: dict[Meta, int] = {}
        metas: list[Any] = []

        def meta_index(meta: Meta) -> int:
            i = index.get(meta)
            if i is None:
                i = index[meta] = len(index)
                metas.extend(meta)
            return i

        current: list[Any] = []
        for k, c in self._keys.items():
            current += (k, c[1], c[2], meta_index(c[3]))
        out: dict[str, Any] = {"format": SNAPSHOT_FORMAT, "metas": metas, "current": current}
        if not self.older.persistent:
            older: list[Any] = []
            for k, c in self._keys.items():
                for version, value, meta in reversed(list(self._kept_run(k, c))):
                    older += (k, version, value, meta_index(meta))
            out["older"] = older
        return out

    def load_snapshot(self, data: Any) -> None:
        """Load ``to_snapshot``'s form, or the earlier one (a list of ``[key, [entry, ...]]``,
        oldest first, whole entries), which snapshots written before it still hold."""
        self._keys.clear()
        if not self.older.persistent:
            self.older.clear()
        if isinstance(data, dict):
            self._load_flat(data)
        else:
            self._load_entries(data)
        self.older.flush()

    def _load_flat(self, data: dict[str, Any]) -> None:
        if data.get("format") != SNAPSHOT_FORMAT:
            raise DataCorrupted(f"unknown store snapshot format {data.get('format')!r}: this build reads "
                                f"format {SNAPSHOT_FORMAT} and the earlier list form (was it written by a newer "
                                f"oribus?)", reason="snapshot format")
        flat = data["metas"]
        metas = [(sys.intern(flat[i]), sys.intern(flat[i + 1]), flat[i + 2], flat[i + 3])
                 for i in range(0, len(flat), 4)]
        keys = self._keys
        it = iter(data["current"])
        for k, version, value, mi in zip(it, it, it, it, strict=True):
            keys[k] = (k, version, value, metas[mi])
        put = self.older.put
        it = iter(data.get("older", ()))
        for k, version, value, mi in zip(it, it, it, it, strict=True):
            put(keys[k][0], (version, value, metas[mi]))  # the current's key object: one string per key

    def _load_entries(self, data: list[Any]) -> None:
        for k, entries in data:
            if not entries:
                continue
            for e in entries[:-1]:
                e = Entry(*e)
                self.older.put(k, (e.version, None if e.deleted else e.value,
                                   self._meta_for(e.agent, e.session, e.commit_id, e.committed_at)))
            e = Entry(*entries[-1])
            self._keys[k] = (k, e.version, None if e.deleted else e.value,
                             self._meta_for(e.agent, e.session, e.commit_id, e.committed_at))


__all__ = ["Older", "VersionedStore"]
