"""The interface of a history store, and the records it holds.

A record is ``Older = (version, value, meta)``: ``value`` is the encoded value,
None for a delete (a stored value is never None otherwise: values travel
msgpack-encoded), and ``meta = (agent, session, commit_id, committed_at)`` is
one tuple shared by all the keys one commit wrote, so a 500-key commit pays
for its names and time once.

Versions of a key are consecutive (+1 per commit). The store asks for the
range it keeps, ``current - history_limit + 1 .. current - 1``, and ignores
whatever lies outside it, so a store may hold a little more than is kept
(a history limit lowered between two runs, a version written twice by a
replay): reads stay exact without a compaction pass.

Two rules drop versions (specs/engine.md "Retention"): the **count** — a key
keeps its last ``history_limit`` versions, applied as each write comes in
(``put``/``forget_through``, O(1) per write) — and the **age** — versions
committed more than ``history_max_age_seconds`` ago, dropped by a background
compaction (``oribus/shards/retention.py``) through ``expire_older``, oldest
first and never the current version, so what a key keeps is always one run of
consecutive versions ending at its current one. Each store counts what each
rule dropped (``stats``: ``dropped_by_count``, ``dropped_by_age``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

Meta = tuple[str, str, str, float]  # agent, session id, commit id, committed_at
Older = tuple[int, "bytes | None", Meta]  # version, encoded value (None: deleted), meta


class HistoryView(Protocol):
    """A history store as it was when the view was taken (``HistoryStore.view``)."""

    def ascending(self, key: str, lowest: int, highest: int) -> Iterator[Older]:
        """``key``'s versions ``lowest .. highest``, oldest first."""

    def close(self) -> None:
        """Release the view (idempotent)."""


class HistoryStore(Protocol):
    """Versions older than each key's current one (``oribus/shards/store.py`` keeps the current)."""

    # True when the versions outlive the process (an engine on disk): snapshots then hold
    # only current versions, and a snapshot is written only after ``sync``.
    persistent: bool

    def put(self, key: str, older: Older) -> None:
        """Keep ``older``, the version ``key``'s new write replaces. Idempotent by (key, version)."""

    def forget_through(self, key: str, version: int) -> None:
        """Retention: drop ``key``'s versions up to and including ``version``."""

    def expire_older(self, key: str, cutoff: float, lowest: int, below: int) -> int:
        """Age retention: drop ``key``'s oldest versions in ``lowest .. below - 1`` committed before
        ``cutoff`` (``meta[3]``), oldest first, stopping at the first that is not, so what stays is
        consecutive. Returns how many it dropped; they are unreadable at once (an engine deletes
        them in its next commit). A view taken earlier keeps them (``view``)."""

    def get(self, key: str, version: int) -> Older | None: ...

    def newest_first(self, key: str, below: int, lowest: int) -> Iterator[Older]:
        """``key``'s versions in ``lowest .. below - 1``, newest first."""

    def oldest(self, key: str, lowest: int) -> int | None:
        """The smallest version of ``key`` at or above ``lowest`` held here, or None."""

    def view(self) -> HistoryView | None:
        """A consistent read-only view of what is held now, which later writes and retention
        deletes do not change (a watch replays from it while commits go on); None when the
        store cannot give one without copying (in memory: the caller reads eagerly)."""

    def clear(self) -> None:
        """Drop every version (before a snapshot that holds whole histories is loaded)."""

    def flush(self) -> None:
        """Pass what ``put`` buffered on to the engine without waiting for a disk (LMDB: to its
        committer thread; ``sync`` waits). A no-op in memory."""

    def sync(self) -> None:
        """Make everything written so far durable (fsync). Runs in a worker thread."""

    def close(self) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def sizes(self, key: str) -> dict[str, int]:
        """Bytes of ``key``'s structures here (benchmarks/memory_per_key.py)."""
