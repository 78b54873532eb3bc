"""Age retention: the background compaction that drops versions older than a shard's max age.

The count rule (a key keeps its last ``history_limit`` versions) is applied as
each write comes in, at O(1) per write. The age rule
(``ShardConfig.history_max_age_seconds``) cannot be: a version grows old
without any write to its key. So a shard walks its keys in the background,
one bounded batch per step, and drops each key's versions committed before
``now - max_age`` (``VersionedStore.expire_by_age``; specs/engine.md
"Retention"). ``AgeCompaction`` is the sans-IO core of that walk: it holds the
pass (the keys to visit, taken once when a pass starts) and decides when the
next one may start; the shard's shell (``Shard.compact_history``) calls
``step`` with its own wall clock — the simulator's virtual one in
``oribus.sim`` — so a simulated run stays deterministic.

Pacing: one step every ``ShardConfig.history_compaction_interval`` seconds
(``COMPACTION_INTERVAL`` by default) examines at most
``COMPACTION_BATCH_KEYS`` keys (about a millisecond of the event loop in
memory, a few with the LMDB store, which reads each examined key's oldest
version), so commits never wait long behind it. A pass over every key starts
at most once per ``pass_gap`` (a tenth of the max age, between one step and a
minute): a version is dropped within about max age + pass gap + the time one
pass takes after its commit (10,000 keys a second).
"""

from __future__ import annotations

from oribus.shards.store import VersionedStore

COMPACTION_INTERVAL = 0.1  # seconds between two steps of the age compaction
COMPACTION_BATCH_KEYS = 1024  # keys one step examines
MAX_PASS_GAP = 60.0  # a new pass over the keys starts at least this often (once the last ended)


class AgeCompaction:
    """The walk of the age rule over one store's keys (sans-IO: the caller supplies the time)."""

    def __init__(self, max_age: float, *, batch_keys: int = COMPACTION_BATCH_KEYS,
                 interval: float = COMPACTION_INTERVAL) -> None:
        if not max_age > 0:
            raise ValueError(f"max_age must be > 0, not {max_age!r}")
        self.max_age = max_age
        self.batch_keys = batch_keys
        # a new pass starts no sooner than this after the last one started
        self.pass_gap = min(max(max_age / 10, interval), MAX_PASS_GAP)
        self._keys: list[str] = []  # the current pass's keys (taken when it started)
        self._at = 0  # the next of them to examine
        self._pass_started = float("-inf")
        self.passes = 0  # passes started
        self.dropped = 0  # versions dropped, in all

    def due(self, now: float) -> bool:
        """Is there work to do now (a pass under way, or the next one may start)?"""
        return self._at < len(self._keys) or now >= self._pass_started + self.pass_gap

    def step(self, store: VersionedStore, now: float) -> int:
        """Examine the next batch of keys; drop what is older than ``now - max_age``. Returns how
        many versions it dropped (0 also when it is not yet time for a new pass)."""
        if self._at >= len(self._keys):
            if now < self._pass_started + self.pass_gap:
                return 0
            self._keys, self._at = store.all_keys(), 0
            self._pass_started = now
            self.passes += 1
        batch = self._keys[self._at:self._at + self.batch_keys]
        self._at += len(batch)
        if self._at >= len(self._keys):
            self._keys, self._at = [], 0  # the pass is over: its key list goes
        dropped = store.expire_by_age(batch, now - self.max_age)
        self.dropped += dropped
        return dropped
