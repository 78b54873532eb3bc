"""Retention (specs/engine.md "Retention"): the count rule and the age rule, in both history stores.

Each test runs against ``MemoryHistory`` and ``LmdbHistory`` through
``VersionedStore``: versions dropped by count as new ones come, by age through
``expire_by_age`` (what the background compaction runs), the current version
never, what a planned watch replay holds is not taken from it, and the
compaction's own pacing (``oribus.shards.retention.AgeCompaction``). A version
written by ``write(store, key, v)`` is committed at time ``1000 + v``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from oribus import failpoints
from oribus.errors import HistoryTruncated, Unavailable
from oribus.messages import WatchRequest
from oribus.shards.history import MemoryHistory
from oribus.shards.history.lmdb_engine import LmdbHistory
from oribus.shards.retention import AgeCompaction
from oribus.shards.store import VersionedStore
from oribus.shards.watch import plan_replay, replay_plan
from oribus.types import SessionRef

S = SessionRef("agent-1", "run-1")
STORES = ("memory", "lmdb")


def make_store(kind: str, path: Path, limit: int = 100, max_age: float | None = 10.0) -> VersionedStore:
    if kind == "memory":
        return VersionedStore(limit, MemoryHistory(limit), history_max_age=max_age)
    return VersionedStore(limit, LmdbHistory(path, cache_bytes=1 << 20), history_max_age=max_age)


def write(store: VersionedStore, key: str, version: int, at: float | None = None) -> None:
    store.apply(key, version, f"{key}={version}".encode(), False, S, f"c-{key}-{version}",
                1000.0 + version if at is None else at)
    store.older.flush()


def settled(store: VersionedStore) -> dict[str, float]:
    """The history store's counters once every delete is in its file (LMDB: the committer's)."""
    store.older.flush()
    store.older.sync()
    return store.older.stats()


def kept(store: VersionedStore, key: str) -> list[int]:
    return [e.version for e in store.history(key)]


@pytest.fixture(params=STORES)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_count_rule_keeps_the_last_n_versions_and_counts_what_it_drops(kind, tmp_path):
    store = make_store(kind, tmp_path, limit=3)
    for v in range(1, 7):
        write(store, "k", v)
    assert kept(store, "k") == [6, 5, 4]
    assert store.oldest_version("k") == 4
    stats = settled(store)
    assert stats["dropped_by_count"] == 3 and stats["dropped_by_age"] == 0
    store.older.close()


def test_the_age_rule_drops_versions_committed_before_the_cutoff_oldest_first(kind, tmp_path):
    store = make_store(kind, tmp_path)
    for v in range(1, 8):
        write(store, "k", v)  # committed at 1001 .. 1007
    write(store, "young", 1)
    assert store.expire_by_age(["k", "young"], 1004.5) == 4
    # unreadable at once (the LMDB store's committer has not deleted them yet)
    assert kept(store, "k") == [7, 6, 5]
    assert store.oldest_version("k") == 5
    assert store.entry_at("k", 4) is None and store.entry_at("k", 5).value == b"k=5"
    assert store.dropped_by("k", 4) == "age"
    stats = settled(store)
    assert stats["dropped_by_age"] == 4 and stats["dropped_by_count"] == 0
    assert kept(store, "k") == [7, 6, 5]
    # a second pass at the same cutoff drops nothing more
    assert store.expire_by_age(["k"], 1004.5) == 0
    store.older.close()


def test_the_current_version_is_never_dropped_whatever_its_age(kind, tmp_path):
    store = make_store(kind, tmp_path)
    for v in range(1, 4):
        write(store, "k", v)
    write(store, "single", 1)
    assert store.expire_by_age(["k", "single", "absent"], 1e12) == 2
    assert kept(store, "k") == [3] and store.current("k").value == b"k=3"
    assert store.oldest_version("k") == 3
    assert kept(store, "single") == [1]
    assert store.expire_by_age(["k", "single"], 1e12) == 0
    # the key goes on: its next version pushes the old current into a fresh history
    write(store, "k", 4)
    assert kept(store, "k") == [4, 3]
    settled(store)
    store.older.close()


def test_a_version_younger_than_an_older_one_stops_the_age_rule_so_what_stays_is_consecutive(kind, tmp_path):
    store = make_store(kind, tmp_path)
    write(store, "k", 1, at=1000.0)
    write(store, "k", 2, at=2000.0)  # committed by a bus whose clock ran ahead
    write(store, "k", 3, at=1001.0)
    write(store, "k", 4, at=1002.0)
    assert store.expire_by_age(["k"], 1500.0) == 1
    assert kept(store, "k") == [4, 3, 2]
    settled(store)
    store.older.close()


def test_the_count_and_the_age_rule_name_themselves_in_the_error(kind, tmp_path):
    store = make_store(kind, tmp_path, limit=5)
    for v in range(1, 9):
        write(store, "k", v)  # the count keeps 4..8
    store.expire_by_age(["k"], 1005.5)  # the age drops 4 and 5
    assert kept(store, "k") == [8, 7, 6]
    by_age = store.not_kept("k", 5, "cannot roll 'k' back")
    assert isinstance(by_age, HistoryTruncated)
    assert by_age.details == {"key": "k", "version": 5, "oldest": 6, "rule": "age"}
    assert "(kept: 6..8)" in by_age.message and "age limit" in by_age.message and "10s" in by_age.message
    by_count = store.not_kept("k", 2, "cannot roll 'k' back")
    assert by_count.details["rule"] == "count" and "last 5 versions" in by_count.message
    settled(store)
    store.older.close()


def test_a_planned_watch_replay_keeps_every_version_a_compaction_drops_meanwhile(kind, tmp_path):
    store = make_store(kind, tmp_path)
    for v in range(1, 7):
        write(store, "w/k", v)
    settled(store)  # versions 1..5 in the LMDB file
    replay = replay_plan(store, WatchRequest("w/", 0))
    assert store.expire_by_age(["w/k"], 1e12) == 5  # every older version, dropped after planning
    settled(store)  # and deleted from the file
    assert kept(store, "w/k") == [6]
    assert [(c.version, c.value) for c in replay.changes] == [(v, f"w/k={v}".encode()) for v in range(1, 7)]
    replay.close()
    # a watch planned now is refused, naming the rule
    with pytest.raises(HistoryTruncated, match="age limit") as e:
        plan_replay(store, WatchRequest("w/", 0))
    assert e.value.details["keys"] == [["w/k", 0, 6]] and e.value.details["rules"] == {"w/k": "age"}
    store.older.close()


def test_a_watch_since_a_time_after_what_the_age_rule_dropped_misses_nothing(kind, tmp_path):
    store = make_store(kind, tmp_path)
    for v in range(1, 7):
        write(store, "w/k", v)
    store.expire_by_age(["w/k"], 1003.5)  # drops 1..3, all committed before 1003.5
    got = plan_replay(store, WatchRequest("w/", since=1004.5))
    assert [c.version for c in got] == [5, 6]
    got = plan_replay(store, WatchRequest("w/", since=1003.5))
    assert [c.version for c in got] == [4, 5, 6]
    # since a time before the cutoff: versions committed after it may be among those dropped
    with pytest.raises(HistoryTruncated) as e:
        plan_replay(store, WatchRequest("w/", since=1002.5))
    assert e.value.details["rules"] == {"w/k": "age"}
    settled(store)
    store.older.close()


def test_a_prepared_rollback_does_not_need_its_target_kept(tmp_path):
    """The rollback's value is copied into the prepared write: dropping the target after the
    prepare changes nothing the commit applies."""
    from oribus.delivery_log import DeliveryLog, DeliveryLogConfig
    from oribus.messages import ShardTxn
    from oribus.shards.participant import Participant, Pending

    store = make_store("memory", tmp_path)
    for v in range(1, 4):
        write(store, "k", v)
    core = Participant(0, 1, store, DeliveryLog(DeliveryLogConfig()))
    st = ShardTxn(txn_id="t-1", session=S, rollback={"k": 1}, primary=0, participants=(0, 1))
    prepared = core.prepare(st)
    assert isinstance(prepared, Pending)
    assert store.expire_by_age(["k"], 1e12) == 2 and store.entry_at("k", 1) is None
    core.apply_commit("t-1")
    assert store.current("k").version == 4 and store.current("k").value == b"k=1"
    with pytest.raises(HistoryTruncated, match=r"version 1 of 'k' is no longer in its history \(kept: 3\.\.4\)"):
        core.prepare(ShardTxn(txn_id="t-2", session=S, rollback={"k": 1}, primary=0, participants=(0, 1)))
    assert store.current("k").version == 4 and "t-2" not in core.prepared  # the refusal changed nothing


# ---- the LMDB store: deletes in the committer, a crash in between --------------------------------


def test_lmdb_age_deletes_reach_the_file_and_survive_a_reopen(tmp_path):
    store = make_store("lmdb", tmp_path)
    for v in range(1, 7):
        write(store, "k", v)
    settled(store)
    records = store.older.stats()["records"]
    store.expire_by_age(["k"], 1003.5)
    assert store.older.stats()["records"] == records  # hidden, not yet deleted
    assert settled(store)["records"] == records - 3
    store.older.close()
    again = make_store("lmdb", tmp_path)
    assert again.older.oldest("k", 1) == 4
    again.older.close()


def test_a_compaction_whose_engine_commit_fails_hides_what_it_dropped_and_a_reopen_brings_it_back(tmp_path):
    """A kill in the committer's transaction of the age deletes (``history.compact_commit``) leaves
    the file as before the compaction: more versions than the live store kept, consecutive, the
    newer ones whole; the next pass drops them again."""
    store = make_store("lmdb", tmp_path)
    for v in range(1, 7):
        write(store, "k", v)
    settled(store)
    failpoints.arm("history.compact_commit", "raise")
    try:
        store.expire_by_age(["k"], 1003.5)
        store.older.flush()
        with pytest.raises(Unavailable):
            store.older.sync()
        assert kept(store, "k") == [6, 5, 4]  # still hidden while the deletes wait in memory
    finally:
        failpoints.disarm("history.compact_commit")
    store.older.env.close()  # the process dies: no close, no sync
    again = make_store("lmdb", tmp_path)
    write(again, "k", 6)  # the snapshot's current version (replay skips what it holds)
    assert kept(again, "k") == [6, 5, 4, 3, 2, 1]
    assert again.expire_by_age(["k"], 1003.5) == 3
    assert settled(again)["dropped_by_age"] == 3
    assert kept(again, "k") == [6, 5, 4]
    again.older.close()


# ---- the compaction's pacing -----------------------------------------------------------------------


def test_the_compaction_examines_one_bounded_batch_per_step_and_paces_its_passes(tmp_path):
    store = make_store("memory", tmp_path)
    for key in ("a", "b", "c"):
        for v in range(1, 4):
            write(store, key, v)
    compaction = AgeCompaction(10.0, batch_keys=2, interval=0.1)
    assert compaction.pass_gap == 1.0  # a tenth of the max age
    now = 1013.5  # cutoff 1003.5: every version but the current ones is old
    assert compaction.step(store, now) == 4  # two keys of three
    assert sorted(len(kept(store, k)) for k in "abc") == [1, 1, 3]
    assert compaction.step(store, now) == 2  # the third: the pass is over
    assert compaction.passes == 1 and compaction.dropped == 6
    for key in ("a", "b", "c"):
        write(store, key, 4, at=1000.0)  # makes version 3 an older one
    assert not compaction.due(now + 0.5)
    assert compaction.step(store, now + 0.5) == 0  # the next pass waits for its gap
    assert compaction.due(now + 1.0)
    assert compaction.step(store, now + 1.0) == 2 and compaction.passes == 2
    with pytest.raises(ValueError):
        AgeCompaction(0)
