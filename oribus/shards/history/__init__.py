"""Where a shard keeps the versions of each key older than the current one.

The store (``oribus/shards/store.py``) keeps every key's current version in
memory; a write moves the version it replaces into a ``HistoryStore``:

* ``memory.py``: ``MemoryHistory``, a bounded deque per key (the default, and
  what the simulation and replica groups use);
* ``lmdb_engine.py``: ``LmdbHistory``, an LMDB file below the shard's data
  directory, with a bounded cache of recently read versions
  (specs/engine.md "History store" gives the layout and why LMDB).

Both hold ``Older`` records ``(version, value, meta)``; ``meta`` is one
``Meta`` tuple ``(agent, session, commit_id, committed_at)`` shared by every
key a commit wrote. Both apply retention's two rules (``base.py``; specs/engine.md
"Retention"): the count as versions come in, the age through ``expire_older``,
which the shard's background compaction (``oribus/shards/retention.py``) calls.
"""

from oribus.shards.history.base import HistoryStore, HistoryView, Meta, Older
from oribus.shards.history.memory import MemoryHistory

__all__ = ["HistoryStore", "HistoryView", "MemoryHistory", "Meta", "Older"]
