"""History on disk (``history_store="lmdb"``, specs/engine.md "History store") on the embedded engine.

Older versions live in each shard's LMDB file; snapshots hold only current
versions. These tests hold the engine to the in-memory store's answers across
snapshots and reopens, and check the refusals: a rollback to a version no
longer kept, and a directory with an LMDB history opened as ``memory``.
Replica groups with ``lmdb``: tests/integration/test_replica_group.py.
"""

from __future__ import annotations

import asyncio

import pytest

import oribus
from oribus.errors import InvalidRequest
from oribus.shards.config import ShardConfig

OPTIONS = {"history_limit": 6, "snapshot_every_records": 7, "segment_bytes": 4096}


async def versions_of(bus: oribus.AsyncSession, key: str) -> list[tuple[int, object]]:
    return [(v.version, v.value) for v in await bus.history(key)]


async def test_history_survives_snapshots_and_reopens_and_matches_memory(tmp_path):
    """The same writes give the same history with and without the engine, before and after a reopen."""
    got: dict[str, dict[str, list]] = {}
    for store in ("memory", "lmdb"):
        data = tmp_path / store
        async with oribus.open_local(data, shards=2, agent="w", history_store=store, **OPTIONS) as bus:
            for i in range(40):
                await bus.commit({f"doc/{i % 5}": {"i": i}, f"doc/{(i * 3) % 7}": {"j": i}})
            await bus.delete("doc/1")
            await bus.rollback({"doc/2": (await bus.history("doc/2"))[-1].version})
            before = {f"doc/{k}": await versions_of(bus, f"doc/{k}") for k in range(7)}
            stats = await bus.stats()
            assert sum(s["snapshots"] for s in stats["shards"]) > 0, "no snapshot was taken"
        async with oribus.open_local(data, agent="w", history_store=store, **OPTIONS) as bus:
            after = {f"doc/{k}": await versions_of(bus, f"doc/{k}") for k in range(7)}
        assert after == before
        got[store] = after
        if store == "lmdb":
            assert (data / "shard-0000" / "history" / "data.mdb").exists()
    assert got["lmdb"] == got["memory"]
    assert all(len(h) == OPTIONS["history_limit"] for k, h in got["lmdb"].items() if k != "doc/1")


async def test_snapshots_hold_only_current_versions_with_lmdb(tmp_path):
    async with oribus.open_local(tmp_path, shards=1, agent="w", history_store="lmdb", **OPTIONS) as bus:
        for i in range(30):
            await bus.put("k", i)
        shard = bus._owner.shards[0]
        store, cur = shard.snapshot_state()["store"], shard.store.current("k")
        assert "older" not in store  # the engine holds them
        assert store["current"] == ["k", cur.version, cur.value, 0]
        assert store["metas"] == [cur.agent, cur.session, cur.commit_id, cur.committed_at]
        stats = (await bus.stats())["shards"][0]["history"]
        assert stats["store"] == "lmdb" and stats["records"] >= OPTIONS["history_limit"] - 1


async def test_rollback_to_a_compacted_version_is_a_clear_error(tmp_path):
    async with oribus.open_local(tmp_path, shards=1, agent="w", history_store="lmdb", **OPTIONS) as bus:
        for i in range(10):
            await bus.put("k", i)
        with pytest.raises(InvalidRequest, match=r"version 2 of 'k' is no longer in its history \(kept: 5\.\.10\)"):
            await bus.rollback({"k": 2})
        assert (await bus.get("k")).version == 10  # nothing written
        assert await bus.rollback({"k": 5}) == {"k": 11}
        assert (await bus.get("k")).value == 4


async def test_a_directory_with_an_lmdb_history_refuses_to_open_as_memory(tmp_path):
    async with oribus.open_local(tmp_path, shards=1, agent="w", history_store="lmdb") as bus:
        await bus.put("k", 1)
        await bus.put("k", 2)
    with pytest.raises(InvalidRequest, match="history_store='lmdb'"):
        await oribus.open_local(tmp_path, agent="w")
    async with oribus.open_local(tmp_path, agent="w", history_store="lmdb") as bus:  # nothing was changed
        assert [v.version for v in await bus.history("k")] == [2, 1]


async def test_a_memory_directory_moves_its_history_into_lmdb(tmp_path):
    async with oribus.open_local(tmp_path, shards=1, agent="w", **OPTIONS) as bus:
        for i in range(12):
            await bus.put("k", i)
        before = await versions_of(bus, "k")
    async with oribus.open_local(tmp_path, agent="w", history_store="lmdb", **OPTIONS) as bus:
        assert await versions_of(bus, "k") == before


def test_an_unknown_history_store_is_refused(tmp_path):
    with pytest.raises(InvalidRequest, match="history_store must be one of memory, lmdb"):
        ShardConfig(0, tmp_path, history_store="rocksdb")


def test_up_passes_the_history_store_to_its_shard_processes(tmp_path):
    from oribus.hosts.up import UpHost

    host = UpHost(tmp_path, processes=True, history_store="lmdb")
    command = host.shard_command(0, tmp_path / "ready")
    assert command[command.index("--history-store") + 1] == "lmdb"


def test_up_passes_the_history_store_to_its_replica_group_members(tmp_path):
    from oribus.hosts.up import UpHost

    host = UpHost(tmp_path, processes=True, replicas=3, history_store="lmdb")
    command = host.member_command(0, 1, tmp_path / "m", "http://127.0.0.1:2379", None)
    assert command[command.index("--history-store") + 1] == "lmdb"


async def test_a_watch_replays_every_planned_version_though_later_commits_drop_them(tmp_path):
    """The replay reads the engine lazily, from a view taken when the watch was planned: versions
    that later commits push out of the kept history are still given, in order, then the live ones."""
    async with oribus.open_local(tmp_path, shards=1, agent="w", history_store="lmdb", history_limit=4) as bus:
        for i in range(1, 5):
            await bus.put("doc/a", {"i": i})
        stream = bus.watch("doc/", from_version=0)
        await stream.start()  # planned: versions 1..4
        for i in range(5, 12):
            await bus.put("doc/a", {"i": i})  # retention drops 1..7 from the engine
        assert [v.version for v in await bus.history("doc/a")] == [11, 10, 9, 8]
        got = []
        async for event in stream:
            got.append((event.version, event.value["i"]))
            if event.version == 11:
                break
        await stream.aclose()
        assert got == [(v, v) for v in range(1, 12)]


async def test_a_shard_closing_during_a_replay_ends_it_with_a_retryable_error(tmp_path):
    from oribus.messages import WatchRequest

    bus = await oribus.open_local(tmp_path, shards=1, agent="w", history_store="lmdb")
    for i in range(5):
        await bus.put("doc/a", i)
    shard = bus._owner.shards[0]
    # in the file, not still waiting for the committer (a replay serves those from memory)
    shard.store.older.flush()
    await asyncio.get_running_loop().run_in_executor(None, shard.store.older.sync)
    watcher = shard.watch(WatchRequest("doc/", 0))
    assert (await watcher.__anext__()).version == 1  # the replay is under way
    await bus.close()  # the shard, and its history store, close
    with pytest.raises(oribus.Unavailable, match="closed during a watch's replay"):
        await watcher.__anext__()
