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

Replica groups (``oribus.sim.group``): every member keeps one of these on its
own simulated disk (``MemberNode.history``), used by its follower core and by
the Shard it serves as primary. A crash of the member rolls it back as above,
and the disk then holds ``reopened()``, a new object with the durable state: the
dead incarnation's object is no longer on the disk, so what its cancelled tasks
still do to it (a ``finally`` that closes a Shard) reaches nothing. A lost disk
loses the engine whole. A learner's catch-up carries the
primary's engine in the real catch-up frame (``oribus/shards/replica/catchup.py``),
where LMDB's consistent copy (``LmdbHistory.copy_file``) would be::

    primary:  copy()      the written state now (durable + written, not the buffered:
                          a read transaction sees committed transactions only), taken
                          after the snapshot file was read (ReplicaMember._snapshot_source)
              copy_file() that copy encoded (``encode``: msgpack of [key, [[version,
                          value, meta], ...]], keys and versions sorted) in an unlinked
                          temporary file, which CatchupSource frames with its CRC-32C
    learner:  install()   the decoded copy replaces the whole engine, durable at once
                          (as install_file renames an fsynced file over data.mdb)

The frame travels over the simulated network in ``SnapshotChunk``s of
``SimConfig.snapshot_chunk_bytes``, so faults can cut it mid-transfer.

What the model leaves out: LMDB's pages (a copy is the state, not a file; its
size and compaction are not modelled), the committer's batching (``flush`` is
one transaction, ``sync`` makes every written one durable; the real engine
may keep the last committed batch across a power cut, this one loses it —
stricter), torn or damaged files (the frame's CRC is checked, but nothing here
damages a file), and the time a copy or an install takes (none: they happen
at one instant of virtual time, where the real ones run in a worker thread).

``unsafe_empty_catchup_copy`` (deliberately broken, for testing the tests):
``copy`` gives an empty engine, so a learner that catches up from a snapshot
lacks every version the snapshot leaves to the engine; once it serves as
primary the final read of the histories must find them missing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import msgpack

from oribus.errors import DataCorrupted
from oribus.shards.history import Older

_MISSING = object()


class SimHistory:
    persistent = True

    def __init__(self, *, unsafe_sync_does_nothing: bool = False, unsafe_empty_catchup_copy: bool = False) -> None:
        self._state: dict[str, dict[int, Older]] = {}  # written: key -> version -> record
        self._undo: list[tuple[str, int, object]] = []  # (key, version, record before) since the sync
        self._puts: dict[tuple[str, int], Older] = {}
        self._forget: dict[str, int] = {}
        self.unsafe_sync_does_nothing = unsafe_sync_does_nothing
        self.unsafe_empty_catchup_copy = unsafe_empty_catchup_copy
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

    def reopened(self) -> SimHistory:
        """The engine as the next process opens it, a new object: this one's durable state
        (call after ``crash``), its options and counters. This one stays the dead process's."""
        new = SimHistory(unsafe_sync_does_nothing=self.unsafe_sync_does_nothing,
                         unsafe_empty_catchup_copy=self.unsafe_empty_catchup_copy)
        new._state = self._written()
        new.lost_versions = self.lost_versions
        return new

    def _written(self) -> dict[str, dict[int, Older]]:
        """A copy of the written state (the keys that hold versions)."""
        return {key: dict(versions) for key, versions in self._state.items() if versions}

    # ---- a replica group's catch-up: the engine's consistent copy ------------------------

    def copy(self) -> SimHistory:
        """LMDB's consistent copy (``LmdbHistory.copy_file``): every version written so far,
        durable or not (a read transaction sees committed transactions, synced or not), none
        of those still buffered (the WAL after the snapshot replays them at the learner)."""
        copy = SimHistory()
        if not self.unsafe_empty_catchup_copy:
            copy._state = self._written()
        return copy

    def encode(self) -> bytes:
        """The written state as bytes (module docstring): what the catch-up frame carries."""
        return msgpack.packb([[key, [list(versions[v]) for v in sorted(versions)]]
                              for key, versions in sorted(self._state.items()) if versions], use_bin_type=True)

    @staticmethod
    def decode(raw: bytes) -> SimHistory:
        """``encode``'s inverse; ``DataCorrupted`` if ``raw`` is not such a state."""
        try:
            items = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            state: dict[str, dict[int, Older]] = {
                key: {int(e[0]): (int(e[0]), e[1], tuple(e[2])) for e in entries} for key, entries in items}
        except (ValueError, TypeError, IndexError, msgpack.UnpackException) as e:
            raise DataCorrupted(f"a simulated history store copy does not decode: {e}") from e
        history = SimHistory()
        history._state = state
        return history

    def copy_file(self) -> BinaryIO:
        """``copy`` encoded in an unlinked temporary file, as ``LmdbHistory.copy_file`` gives
        it (``ReplicaMember._snapshot_source`` hands it to ``CatchupSource``, which closes it)."""
        f = tempfile.TemporaryFile()  # noqa: SIM115 (closed by CatchupSource.close)
        f.write(self.copy().encode())
        f.flush()
        return f

    def install(self, copy: SimHistory | None) -> None:
        """Replace the whole engine by ``copy`` (None: an empty engine), durable at once: the
        learner's side of a catch-up (``LmdbHistory.install_file`` renames the fsynced copy
        over ``data.mdb`` and fsyncs the directory)."""
        self._state = {} if copy is None else copy._written()
        self._puts, self._forget = {}, {}
        self._undo.clear()
