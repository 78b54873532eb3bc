"""History stores (oribus/shards/history/): LmdbHistory against MemoryHistory, through VersionedStore.

The store with an LMDB history must answer every question (current, entry_at,
oldest_version, history) exactly as the in-memory one does, across reopens and
across crashes that lose whatever was not flushed or not synced: the WAL
replays those writes, and writing a version again must change nothing.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import lmdb
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oribus import failpoints
from oribus.errors import DataCorrupted, Unavailable
from oribus.shards.history import MemoryHistory
from oribus.shards.history.lmdb_engine import LmdbHistory
from oribus.shards.store import VersionedStore
from oribus.types import SessionRef

S = SessionRef("agent-1", "run-1")
CACHE = 1 << 20


def lmdb_store(path: Path, limit: int, cache_bytes: int = CACHE) -> VersionedStore:
    return VersionedStore(limit, LmdbHistory(path, cache_bytes=cache_bytes))


def write(store: VersionedStore, key: str, version: int, deleted: bool = False) -> bool:
    value = None if deleted else f"{key}={version}".encode()
    return store.apply(key, version, value, deleted, S, f"c-{key}-{version}", 1000.0 + version)


def same_answers(a: VersionedStore, b: VersionedStore, keys: list[str]) -> None:
    for k in keys:
        assert a.current(k) == b.current(k), k
        assert a.version(k) == b.version(k), k
        assert a.oldest_version(k) == b.oldest_version(k), k
        assert a.history(k) == b.history(k), k
        assert a.history(k, 2) == b.history(k, 2), k
        for v in range(0, a.version(k) + 2):
            assert a.entry_at(k, v) == b.entry_at(k, v), (k, v)


def test_versions_round_trip_and_survive_a_reopen(tmp_path):
    store = lmdb_store(tmp_path, 4)
    for v in range(1, 8):
        write(store, "a/k", v, deleted=v == 3)
    write(store, "a/other", 1)
    hist = store.history("a/k")
    assert [e.version for e in hist] == [7, 6, 5, 4]
    assert store.oldest_version("a/k") == 4
    assert store.entry_at("a/k", 3) is None  # beyond the limit: dropped
    assert store.entry_at("a/k", 5).value == b"a/k=5"
    assert store.history("a/other") == [store.current("a/other")]
    snapshot = store.to_snapshot()
    assert "older" not in snapshot and len(snapshot["current"]) == 2 * 4  # current versions only: the rest is on disk
    store.older.close()

    again = lmdb_store(tmp_path, 4)
    again.load_snapshot(snapshot)
    assert again.history("a/k") == hist
    # the retention deletes reached the file: only 4..6 of a/k remain below the current 7
    assert again.older.stats()["records"] == 3 + 1  # and the format record
    again.older.close()


def test_a_deleted_version_reads_back_as_deleted(tmp_path):
    store = lmdb_store(tmp_path, 10)
    write(store, "k", 1)
    write(store, "k", 2, deleted=True)
    write(store, "k", 3)
    e = store.entry_at("k", 2)
    assert e is not None and e.deleted and e.value is None
    store.older.close()


def test_a_commit_shares_one_meta_tuple_among_its_keys(tmp_path):
    store = VersionedStore(5)
    for k in ("a", "b", "c"):
        store.apply(k, 1, b"x", False, S, "one-commit", 5.0)
    metas = {id(store._keys[k][3]) for k in ("a", "b", "c")}
    assert len(metas) == 1


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_lmdb_answers_as_memory_over_a_random_run(tmp_path, limit):
    rng = random.Random(limit)
    mem = VersionedStore(limit, MemoryHistory(limit))
    disk = lmdb_store(tmp_path, limit)
    keys = [f"k/{i}" for i in range(6)]
    for _ in range(300):
        k = rng.choice(keys)
        v = mem.version(k) + 1
        deleted = rng.random() < 0.15
        assert write(mem, k, v, deleted) == write(disk, k, v, deleted)
        if rng.random() < 0.2:
            disk.older.flush()
    same_answers(mem, disk, keys)
    disk.older.close()


def test_a_replayed_write_is_skipped_and_rewriting_a_version_changes_nothing(tmp_path):
    store = lmdb_store(tmp_path, 10)
    for v in (1, 2, 3):
        write(store, "k", v)
    before = store.history("k")
    assert write(store, "k", 2) is False  # replay of an applied version
    store.older.put("k", (2, b"k=2", ("agent-1", "run-1", "c-k-2", 1002.0)))  # the engine written again
    store.older.flush()
    assert store.history("k") == before
    store.older.close()


def test_a_crash_before_the_flush_loses_nothing_the_wal_replays(tmp_path):
    """Versions buffered but never committed to the file are gone after a crash; replaying the
    WAL's records from the snapshot (here: applying the same writes again) brings them back."""
    store = lmdb_store(tmp_path, 10)
    for v in (1, 2, 3):
        write(store, "k", v)
    store.older.flush()
    snapshot = store.to_snapshot()  # at version 3
    store.older.sync()
    for v in (4, 5, 6):
        write(store, "k", v)  # buffered, never flushed: the process dies here
    store.older.env.close()  # a crash: no flush, no sync

    recovered = lmdb_store(tmp_path, 10)
    recovered.load_snapshot(snapshot)
    assert [e.version for e in recovered.history("k")] == [3, 2, 1]
    for v in (4, 5, 6):  # the WAL's records after the snapshot
        write(recovered, "k", v)
    expected = VersionedStore(10)
    for v in range(1, 7):
        write(expected, "k", v)
    same_answers(expected, recovered, ["k"])
    recovered.older.close()


def test_the_read_cache_is_bounded(tmp_path):
    store = lmdb_store(tmp_path, 50, cache_bytes=2_000)
    for v in range(1, 41):
        write(store, "k", v)
    store.older.flush()
    store.older.sync()  # committed: the reads below come from the file, through the cache
    for v in range(1, 40):
        assert store.entry_at("k", v) is not None
    stats = store.older.stats()
    assert 0 < stats["cache_bytes"] <= 2_000
    assert stats["cache_entries"] < 39
    store.older.close()


def test_a_file_of_another_format_is_refused(tmp_path):
    env = lmdb.open(str(tmp_path), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"\x00format", b"99")
    env.close()
    with pytest.raises(DataCorrupted, match="format"):
        LmdbHistory(tmp_path, cache_bytes=CACHE)


def test_a_memory_snapshot_loads_into_an_lmdb_store(tmp_path):
    mem = VersionedStore(5)
    for v in range(1, 5):
        write(mem, "k", v)
    disk = lmdb_store(tmp_path, 5)
    disk.load_snapshot(mem.to_snapshot())  # a shard switching from memory to lmdb
    same_answers(mem, disk, ["k"])
    disk.older.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.sampled_from(["w", "flush", "reopen"])),
                    max_size=60),
       limit=st.integers(1, 6))
def test_lmdb_matches_memory_across_reopens(tmp_path_factory, ops, limit):
    path = tmp_path_factory.mktemp("lmdb")
    mem = VersionedStore(limit)
    disk = lmdb_store(path, limit)
    keys = [f"k{i}" for i in range(4)]
    for i, deleted, op in ops:
        k = keys[i]
        if op == "w":
            v = mem.version(k) + 1
            write(mem, k, v, deleted)
            write(disk, k, v, deleted)
        elif op == "flush":
            disk.older.flush()
        else:  # a clean reopen: snapshot of the current versions, the rest from the file
            snap = disk.to_snapshot()
            disk.older.close()
            disk = lmdb_store(path, limit)
            disk.load_snapshot(snap)
    same_answers(mem, disk, keys)
    disk.older.close()


def test_a_lowered_history_limit_answers_only_the_kept_range_and_drops_the_rest_on_the_next_write(tmp_path):
    store = lmdb_store(tmp_path, 10)
    for v in range(1, 11):
        write(store, "k", v)
    snapshot = store.to_snapshot()
    store.older.close()

    lowered = lmdb_store(tmp_path, 4)  # reopened with a smaller limit: versions 1..6 linger in the file
    lowered.load_snapshot(snapshot)
    assert [e.version for e in lowered.history("k")] == [10, 9, 8, 7]
    assert lowered.oldest_version("k") == 7
    assert lowered.entry_at("k", 6) is None and lowered.entry_at("k", 7) is not None
    write(lowered, "k", 11)
    lowered.older.flush()
    lowered.older.sync()  # the committer's transaction is in the file
    assert lowered.older.stats()["records"] == 3 + 1  # 8, 9, 10 (and the format record)
    assert [e.version for e in lowered.history("k")] == [11, 10, 9, 8]
    lowered.older.close()


def test_a_view_keeps_what_it_saw_while_writes_and_retention_go_on(tmp_path):
    store = lmdb_store(tmp_path, 3)
    for v in range(1, 4):
        write(store, "k", v)
    view = store.older.view()  # versions 1 and 2 are in the file (3 is current)
    for v in range(4, 10):
        write(store, "k", v)  # drops 1..6 from the file
    store.older.flush()
    assert store.entry_at("k", 2) is None
    assert [o[0] for o in view.ascending("k", 1, 2)] == [1, 2]
    assert [o[1] for o in view.ascending("k", 1, 2)] == [b"k=1", b"k=2"]
    assert list(view.ascending("other", 1, 9)) == []
    view.close()
    view.close()  # idempotent
    with pytest.raises(Unavailable, match="closed during a watch's replay"):
        list(view.ascending("k", 1, 2))
    store.older.close()


def test_a_view_outlived_by_its_store_says_so_with_a_retryable_error(tmp_path):
    store = lmdb_store(tmp_path, 3)
    for v in range(1, 4):
        write(store, "k", v)
    view = store.older.view()
    store.older.close()  # the shard closes during a replay
    with pytest.raises(Unavailable):
        list(view.ascending("k", 1, 2))
    view.close()


# ---- the background committer (power-loss safety: synced commits, batched) ----------------


class _HeldCommitter:
    """Holds the committer thread inside its next LMDB write until released."""

    def __init__(self, history: LmdbHistory, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = history._write

        def held(batches):
            self.entered.set()
            assert self.release.wait(10)
            return real(batches)

        monkeypatch.setattr(history, "_write", held)


def test_commits_are_synced_and_only_the_meta_page_waits(tmp_path):
    """LMDB with ``sync`` off can be corrupted by a power cut (a meta page on disk before the
    pages it names); ``sync`` on with ``metasync`` off keeps the file whole and may only undo
    the last commit. ``unsafe_no_fsync`` alone turns the fsync off."""
    safe = LmdbHistory(tmp_path / "safe", cache_bytes=CACHE)
    assert safe.env.flags()["sync"] is True and safe.env.flags()["metasync"] is False
    safe.close()
    unsafe = LmdbHistory(tmp_path / "unsafe", cache_bytes=CACHE, unsafe_no_fsync=True)
    assert unsafe.env.flags()["sync"] is False
    unsafe.close()


def test_versions_handed_to_the_committer_read_back_before_they_are_in_the_file(tmp_path, monkeypatch):
    store = lmdb_store(tmp_path, 10)
    mem = VersionedStore(10)
    held = _HeldCommitter(store.older, monkeypatch)
    for v in range(1, 7):
        write(store, "k", v)
        write(mem, "k", v)
    store.older.flush()
    assert held.entered.wait(10)
    view = store.older.view()
    assert store.older.stats()["records"] == 1  # nothing committed yet: the format record only
    same_answers(mem, store, ["k"])
    assert [o[0] for o in view.ascending("k", 2, 4)] == [2, 3, 4]
    held.release.set()
    store.older.sync()
    assert store.older.stats()["records"] == 1 + 5
    same_answers(mem, store, ["k"])
    assert [o[0] for o in view.ascending("k", 1, 5)] == [1, 2, 3, 4, 5]  # each version once
    view.close()
    store.older.close()


def test_flushes_made_while_a_commit_runs_share_the_next_one(tmp_path, monkeypatch):
    """One fdatasync serves every commit applied while the previous one was being written."""
    store = lmdb_store(tmp_path, 100)
    held = _HeldCommitter(store.older, monkeypatch)
    write(store, "k", 1)
    write(store, "k", 2)
    store.older.flush()
    assert held.entered.wait(10)
    for v in range(3, 9):
        write(store, "k", v)
        store.older.flush()
    held.release.set()
    store.older.sync()
    counters = store.older.stats()
    assert counters["flushes"] == 7 and counters["commits"] == 2
    assert counters["versions_written"] == 7
    assert [e.version for e in store.history("k")] == list(range(8, 0, -1))
    store.older.close()


def test_a_failed_commit_keeps_its_versions_readable_and_sync_refuses_until_one_succeeds(tmp_path):
    store = lmdb_store(tmp_path, 10)
    for v in range(1, 5):
        write(store, "k", v)
    failpoints.arm("history.before_commit", "raise")
    try:
        store.older.flush()
        with pytest.raises(Unavailable, match="committing 3 versions failed"):
            store.older.sync()  # so no snapshot lets the WAL go while the file lacks them
        assert [e.version for e in store.history("k")] == [4, 3, 2, 1]
        assert store.older.stats()["records"] == 1
    finally:
        failpoints.disarm("history.before_commit")
    store.older.sync()  # retried
    assert store.older.stats()["records"] == 1 + 3
    assert [e.version for e in store.history("k")] == [4, 3, 2, 1]
    store.older.close()


# ---- the snapshot form (store.SNAPSHOT_FORMAT) -------------------------------------------------


def first_form(store: VersionedStore) -> list:
    """What snapshots written before the flat form hold: per key its kept entries, oldest first."""
    return [[k, [list(e) for e in reversed(store.history(k))]] for k in store.keys()]


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 4), st.booleans(), st.integers(0, 2)), max_size=50),
       limit=st.integers(1, 5))
def test_a_memory_store_round_trips_through_both_snapshot_forms(ops, limit):
    store = VersionedStore(limit)
    keys = [f"k{i}" for i in range(5)]
    for i, deleted, commit in ops:  # commit: a few commits write several keys with one meta
        k = keys[i]
        v = store.version(k) + 1
        store.apply(k, v, None if deleted else f"{k}={v}".encode(), deleted, S, f"c{commit}-{v}", float(commit))
    for form in (store.to_snapshot(), first_form(store)):
        again = VersionedStore(limit)
        again.load_snapshot(form)
        same_answers(store, again, keys)
        assert again.keys() == store.keys()


def test_the_flat_form_writes_each_commits_meta_once_and_loads_keys_shared_with_the_history():
    store = VersionedStore(3)
    for v in (1, 2):
        for i in range(100):  # one commit of 100 keys per version
            store.apply(f"k{i}", v, b"x", False, S, f"commit-{v}", float(v))
    snap = store.to_snapshot()
    assert snap["format"] == 2 and len(snap["metas"]) == 2 * 4  # two commits, four fields each
    assert len(snap["current"]) == 100 * 4 and len(snap["older"]) == 100 * 4
    again = VersionedStore(3)
    again.load_snapshot(msgpack.unpackb(msgpack.packb(snap, use_bin_type=True), raw=False))  # as a file holds it
    a = again.current("k1")
    assert (a.agent, a.session, a.commit_id, a.committed_at) == (S[0], S[1], "commit-2", 2.0)
    assert again._keys["k1"][3] is again._keys["k2"][3]  # one meta object for the commit's keys
    older = again.older._keys  # the history's key is the current's key object
    assert next(k for k in older if k == "k1") is again._keys["k1"][0]


def test_a_snapshot_form_from_a_newer_build_is_refused():
    with pytest.raises(DataCorrupted, match="unknown store snapshot format 3"):
        VersionedStore(3).load_snapshot({"format": 3, "metas": [], "current": []})


def test_an_lmdb_store_loads_the_first_form(tmp_path):
    mem = VersionedStore(4)
    for v in range(1, 6):
        write(mem, "k", v, deleted=v == 2)
    disk = lmdb_store(tmp_path, 4)
    disk.load_snapshot(first_form(mem))  # a memory shard's snapshot from before, opened with lmdb
    same_answers(mem, disk, ["k"])
    disk.older.close()
