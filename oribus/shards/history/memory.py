"""``MemoryHistory``: older versions in a bounded deque per key, in this process's memory.

The default history store: nothing on disk, so a snapshot holds each key's
whole kept history (``persistent = False``) and recovery rebuilds the deques
from it and the WAL. A key with one version has no deque at all (nor one whose
older versions the age rule all dropped).

Retention: a full deque drops its oldest version as a new one comes in (the
count); ``expire_older`` pops the oldest while they are older than the cutoff
(the age). A watch never reads these deques lazily: its replay copies the
versions it plans when it is planned (``HistoryStore.view`` is None here), so
a compaction during a replay cannot take a version from it.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator

from oribus.shards.history.base import Older


class MemoryHistory:
    persistent = False

    def __init__(self, history_limit: int) -> None:
        self._depth = history_limit - 1  # older versions kept per key (the current is the store's)
        self._keys: dict[str, deque[Older]] = {}
        self.dropped_by_count = 0  # versions a full deque pushed out (or ``forget_through`` dropped)
        self.dropped_by_age = 0  # versions ``expire_older`` dropped

    def put(self, key: str, older: Older) -> None:
        if self._depth < 1:
            self.dropped_by_count += 1
            return
        d = self._keys.get(key)
        if d is None:
            d = self._keys[key] = deque((), self._depth)
        elif d and d[-1][0] >= older[0]:
            return  # already held (idempotent)
        if len(d) == self._depth:
            self.dropped_by_count += 1  # the append pushes the oldest out
        d.append(older)

    def forget_through(self, key: str, version: int) -> None:
        d = self._keys.get(key)
        while d and d[0][0] <= version:
            d.popleft()
            self.dropped_by_count += 1

    def expire_older(self, key: str, cutoff: float, lowest: int, below: int) -> int:
        d = self._keys.get(key)
        if not d:
            return 0
        dropped = 0
        while d and d[0][0] < below and d[0][2][3] < cutoff:
            d.popleft()
            dropped += 1
        if not d:
            del self._keys[key]
        self.dropped_by_age += dropped
        return dropped

    def get(self, key: str, version: int) -> Older | None:
        d = self._keys.get(key)
        if not d:
            return None
        # versions in a deque are consecutive: index arithmetic, with a scan as a fallback
        i = version - d[0][0]
        if 0 <= i < len(d) and d[i][0] == version:
            return d[i]
        for o in d:
            if o[0] == version:
                return o
        return None

    def newest_first(self, key: str, below: int, lowest: int) -> Iterator[Older]:
        for o in reversed(self._keys.get(key, ())):
            if o[0] < lowest:
                return
            if o[0] < below:
                yield o

    def oldest(self, key: str, lowest: int) -> int | None:
        for o in self._keys.get(key, ()):
            if o[0] >= lowest:
                return o[0]
        return None

    def view(self) -> None:
        return None  # the deques change with every write: a replay copies what it needs

    def clear(self) -> None:
        self._keys.clear()

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {"keys_with_history": len(self._keys), "dropped_by_count": self.dropped_by_count,
                "dropped_by_age": self.dropped_by_age}

    def sizes(self, key: str) -> dict[str, int]:
        d = self._keys.get(key)
        if not d:
            return {}
        return {"history_deque": sys.getsizeof(d), "older_record": sys.getsizeof(d[-1])}
