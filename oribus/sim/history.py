"""The simulated on-disk history store of one shard: ``LmdbHistory``'s durability, in memory.

A simulated shard with ``history_store="lmdb"`` gets this object (through the
``Shard`` seam ``open_history``) instead of an LMDB file. It lives on the
shard's ``SimDisk``, so it outlives crashes, with the durability the real
engine promises and nothing more::

    put() / forget_through()  -> buffered   process memory              lost by any crash
    expire_older()            -> written    (the age rule's deletes)    undone by a crash here
    flush()                   -> written    committed, not fsynced      lost by a crash here
    sync()                    -> durable    fsynced                      always kept

A crash takes everything since the last ``sync``: more than a power cut can
take from the real engine (whose committer fdatasyncs each transaction and may
lose only the batches not yet committed and the last one committed), and what
the shard's rule (fsync the engine
before a snapshot lets the WAL below it go) must survive. Written state is
one dict; an undo log since the last sync rolls it back on a crash.

``unsafe_sync_does_nothing`` (a deliberately broken engine, for testing the
tests): ``sync`` returns without making anything durable, so the versions a
snapshot leaves to the engine are lost by the next crash — the simulation's
history checks must find it.
"""

from __future__ import annotations

from collections.abc import Iterator

from oribus.shards.history import Older

_MISSING = object()


class SimHistory:
    persistent = True

    def __init__(self, *, unsafe_sync_does_nothing: bool = False) -> None:
        self._state: dict[str, dict[int, Older]] = {}  # written: key -> version -> record
        self._undo: list[tuple[str, int, object]] = []  # (key, version, record before) since the sync
        self._puts: dict[tuple[str, int], Older] = {}
        self._forget: dict[str, int] = {}
        self.unsafe_sync_does_nothing = unsafe_sync_does_nothing
        self.lost_versions = 0  # written records a crash rolled back
        self.dropped_by_count = 0  # records ``forget_through`` deleted (retention's count rule)
        self.dropped_by_age = 0  # records ``expire_older`` deleted (the age rule)

    # ---- the HistoryStore interface ----------------------------------------------------

    def put(self, key: str, older: Older) -> None:
        self._puts[(key, older[0])] = older

    def forget_through(self, key: str, version: int) -> None:
        if version > self._forget.get(key, 0):
            self._forget[key] = version

    def _set(self, key: str, version: int, record: Older | None) -> None:
        versions = self._state.setdefault(key, {})
        self._undo.append((key, version, versions.get(version, _MISSING)))
        if record is None:
            versions.pop(version, None)
        else:
            versions[version] = record

    def flush(self) -> None:
        for (key, version), older in self._puts.items():
            self._set(key, version, older)
        for key, through in self._forget.items():
            for version in [v for v in self._state.get(key, {}) if v <= through]:
                self._set(key, version, None)
                self.dropped_by_count += 1
        self._puts, self._forget = {}, {}

    def expire_older(self, key: str, cutoff: float, lowest: int, below: int) -> int:
        """The age rule: written at once (as a flush writes), undone by a crash before a sync,
        as the real engine's deletes may be."""
        self.flush()
        versions = self._state.get(key, {})
        dropped = 0
        version = min((v for v in versions if v >= lowest), default=below)
        while version < below and version in versions and versions[version][2][3] < cutoff:
            self._set(key, version, None)
            dropped += 1
            version += 1
        self.dropped_by_age += dropped
        return dropped

    def sync(self) -> None:
        if not self.unsafe_sync_does_nothing:
            self._undo.clear()

    def get(self, key: str, version: int) -> Older | None:
        pending = self._puts.get((key, version))
        return pending if pending is not None else self._state.get(key, {}).get(version)

    def newest_first(self, key: str, below: int, lowest: int) -> Iterator[Older]:
        self.flush()
        versions = self._state.get(key, {})
        for version in sorted((v for v in versions if lowest <= v < below), reverse=True):
            yield versions[version]

    def oldest(self, key: str, lowest: int) -> int | None:
        self.flush()
        held = [v for v in self._state.get(key, {}) if v >= lowest]
        return min(held) if held else None

    def view(self) -> None:
        return None  # the simulation replays from a list (its histories are small)

    def clear(self) -> None:
        for key, versions in list(self._state.items()):
            for version in list(versions):
                self._set(key, version, None)
        self._puts, self._forget = {}, {}

    def close(self) -> None:
        self.flush()
        self.sync()

    def stats(self) -> dict[str, float]:
        return {"records": sum(len(v) for v in self._state.values()), "unsynced": len(self._undo),
                "lost_versions": self.lost_versions, "dropped_by_count": self.dropped_by_count,
                "dropped_by_age": self.dropped_by_age}

    def sizes(self, key: str) -> dict[str, int]:
        return {}

    # ---- faults --------------------------------------------------------------------------

    def crash(self) -> int:
        """The process died: buffered versions are gone, and so is everything written since the
        last sync. Returns how many written records were rolled back."""
        self._puts, self._forget = {}, {}
        lost = len(self._undo)
        for key, version, before in reversed(self._undo):
            versions = self._state.setdefault(key, {})
            if before is _MISSING:
                versions.pop(version, None)
            else:
                versions[version] = before  # type: ignore[assignment]
        self._undo.clear()
        self.lost_versions += lost
        return lost
