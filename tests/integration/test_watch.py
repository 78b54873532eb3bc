"""Watch end to end on the embedded engine: order, visibility, replay, lag and resume, sync."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import pytest

import oribus
from oribus import DELETE, Conflict, HistoryTruncated, WatchEvent, WatchLagged
from oribus.bus import watch as bus_watch
from oribus.messages import WatchRequest

# ---- helpers -----------------------------------------------------------------------------


def engine_of(session: oribus.AsyncSession):
    return session._owner


def bus_of(session: oribus.AsyncSession):
    return session._bus


def keys_on_distinct_shards(session: oribus.AsyncSession, prefix: str, n: int) -> list[str]:
    """``n`` keys under ``prefix``, each on a different shard."""
    by_shard: dict[int, str] = {}
    i = 0
    while len(by_shard) < n:
        key = f"{prefix}{i}"
        by_shard.setdefault(bus_of(session).shard_for(key), key)
        i += 1
    return list(by_shard.values())


async def take(stream, n: int, timeout: float = 5.0) -> list[WatchEvent]:
    """The next ``n`` events of ``stream``."""

    async def run() -> list[WatchEvent]:
        out: list[WatchEvent] = []
        async for ev in stream:
            out.append(ev)
            if len(out) == n:
                break
        return out

    return await asyncio.wait_for(run(), timeout)


async def expected_changes(session, keys) -> dict[str, list[tuple]]:
    """Every kept version of each key, oldest first, as (version, value, deleted, commit_id)."""
    out = {}
    for k in keys:
        hist = await session.history(k)
        out[k] = [(v.version, v.value, v.deleted, v.commit_id) for v in reversed(hist)]
    return out


def by_key(events) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = defaultdict(list)
    for ev in events:
        out[ev.key].append((ev.version, ev.value, ev.deleted, ev.commit_id))
    return dict(out)


def assert_each_key_exactly(events, finals: dict[str, int], first: int = 1) -> None:
    """Each key's versions are exactly first..final, in order, once each."""
    seen: dict[str, list[int]] = defaultdict(list)
    for ev in events:
        seen[ev.key].append(ev.version)
    assert set(seen) == {k for k, v in finals.items() if v >= first}
    for k, final in finals.items():
        if final >= first:
            assert seen[k] == list(range(first, final + 1)), k


def lagged_count(stats: dict) -> int:
    return sum(s["watches_lagged"] for s in stats["shards"])


@pytest.fixture(params=[(1, "memory"), (4, "memory"), (2, "lmdb")], ids=["1shard", "4shards", "2shards-lmdb"])
async def bus(request, data_dir):
    shards, history_store = request.param
    async with oribus.open_local(data_dir, shards=shards, agent="watcher", history_store=history_store) as b:
        yield b


# where older versions live: replays read them from memory or from the shard's LMDB file
history_stores = pytest.mark.parametrize("history_store", ["memory", "lmdb"])


@pytest.fixture
async def bus4(data_dir):
    async with oribus.open_local(data_dir, shards=4, agent="watcher") as b:
        yield b


# ---- every committed change, in version order per key ----------------------------------------


async def test_every_committed_change_in_version_order(bus):
    keys = [f"team/k{i}" for i in range(8)]
    writers = [bus.session(agent=f"w{i}") for i in range(4)]
    async with bus.watch("team/") as changes:

        async def write(s: oribus.AsyncSession, n: int) -> None:
            for j in range(n):
                a, b = keys[(j + n) % 8], keys[(j * 3 + 1) % 8]
                await s.run(lambda tx, a=a, b=b, j=j: _bump(tx, a, b, j))

        await asyncio.gather(*(write(s, 15 + i) for i, s in enumerate(writers)))
        finals = {k: (await bus.history(k, 1))[0].version for k in keys}
        got = await take(changes, sum(finals.values()))
    assert_each_key_exactly(got, finals)
    # values, deletes and commit ids are exactly what the history holds
    assert by_key(got) == await expected_changes(bus, keys)


async def _bump(tx, a: str, b: str, j: int) -> None:
    items = await tx.get_many([a, b])  # read both: concurrent writers conflict and retry
    tx.put(a, {"n": items[a].version + 1, "j": j})
    if a != b:
        tx.put(b, [j])


async def test_multi_shard_commit_delivers_every_key_with_one_commit_id(bus4):
    keys = keys_on_distinct_shards(bus4, "m/", 4)
    async with bus4.watch("m/") as changes:
        versions = await bus4.commit({k: i for i, k in enumerate(keys)}, commit_id="multi-1")
        got = await take(changes, len(keys))
    assert {ev.key: ev.version for ev in got} == versions
    assert {ev.commit_id for ev in got} == {"multi-1"}
    assert {ev.key: ev.value for ev in got} == {k: i for i, k in enumerate(keys)}
    assert all(ev.agent == "watcher" and ev.session == bus4.session_id for ev in got)


# ---- only visible writes: aborted and refused commits never appear ----------------------------


async def test_aborted_and_conflicting_commits_never_appear(bus4):
    x, y, z = keys_on_distinct_shards(bus4, "c/", 3)
    await bus4.session(agent="seed").commit({x: 0, y: 0, z: 0})
    async with bus4.watch("c/") as changes:
        a, b = bus4.session(agent="A"), bus4.session(agent="B")
        # 1PC refused: A read x, B changed it
        await a.get(x)
        await b.put(x, "by-b")
        with pytest.raises(Conflict):
            await a.commit({x: "by-a"}, commit_id="refused-1pc")
        # 2PC aborted: the shard of y votes NO after the shard of z prepared
        a2 = bus4.session(agent="A2")
        await a2.get_many([y, z])
        await b.put(y, "by-b")
        with pytest.raises(Conflict):
            await a2.commit({y: "a2", z: "a2"}, commit_id="aborted-2pc")
        # write skew across shards: exactly one of the two commits
        s1, s2 = bus4.session(agent="S1"), bus4.session(agent="S2")
        await s1.get_many([x, z])
        await s2.get_many([x, z])
        results = await asyncio.gather(
            s1.commit({x: "s1"}, commit_id="skew-1"), s2.commit({z: "s2"}, commit_id="skew-2"),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, Exception) for r in results) == 1
        winner = "skew-1" if not isinstance(results[0], Exception) else "skew-2"
        finals = {k: (await bus4.history(k, 1))[0].version for k in (x, y, z)}
        got = await take(changes, sum(v - 1 for v in finals.values()))  # all but the seeds
        with pytest.raises(asyncio.TimeoutError):
            await take(changes, 1, timeout=0.2)  # and nothing else
    ids = [ev.commit_id for ev in got]
    assert "refused-1pc" not in ids and "aborted-2pc" not in ids
    assert ({"skew-1", "skew-2"} - {winner}).isdisjoint(ids)
    assert winner in ids
    assert [ev.value for ev in got if ev.key == y] == ["by-b"]


# ---- replay from a version, then live with no gap and no duplicate ------------------------------


async def test_from_version_replays_history_then_continues_live(bus):
    for v in range(1, 6):
        await bus.commit({"r/a": f"a{v}", "r/b": f"b{v}"})
    async with bus.watch("r/", from_version=2) as changes:
        replayed = await take(changes, 6)
        assert by_key(replayed)["r/a"][0][:2] == (3, "a3")
        await bus.commit({"r/a": "a6"})
        await bus.put("r/c", "c1")
        live = await take(changes, 2)
    versions = by_key(replayed + live)
    assert [v for v, *_ in versions["r/a"]] == [3, 4, 5, 6]
    assert [v for v, *_ in versions["r/b"]] == [3, 4, 5]
    assert [v for v, *_ in versions["r/c"]] == [1]


async def test_watch_opened_during_writes_has_no_gap_or_duplicate(bus):
    keys = [f"j/k{i}" for i in range(6)]
    stop = asyncio.Event()
    writer_s = bus.session(agent="writer")

    async def writer() -> None:
        i = 0
        while not stop.is_set() or i < 60:
            await writer_s.put(keys[i % len(keys)], i)
            i += 1
            if i % 7 == 0:
                await asyncio.sleep(0)

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.02)  # the watch joins in the middle of the writes
    async with bus.watch("j/", from_version=0) as changes:
        await asyncio.sleep(0.02)
        stop.set()
        await task
        finals = {k: (await bus.history(k, 1))[0].version for k in keys}
        got = await take(changes, sum(finals.values()))
    assert_each_key_exactly(got, finals)


@history_stores
async def test_from_version_older_than_kept_history_fails_loudly(data_dir, history_store):
    async with oribus.open_local(data_dir, shards=2, agent="w", history_limit=3, history_store=history_store) as bus:
        for v in range(10):
            await bus.put("h/k", v)
        await bus.put("h/fresh", 1)
        with pytest.raises(HistoryTruncated) as e:
            await bus.watch("h/", from_version=0).start()
        assert "h/k" in str(e.value) and "h/fresh" not in str(e.value)
        assert e.value.details["keys"] == [["h/k", 0, 8]]
        async with bus.watch("h/", from_version=7) as changes:  # 8..10 are kept
            got = await take(changes, 3)
        assert [ev.version for ev in got] == [8, 9, 10]


# ---- prefixes, deletes, rollbacks ----------------------------------------------------------------


async def test_prefix_filtering(bus):
    async with bus.watch("a/") as only_a, bus.watch() as everything:
        await bus.commit({"a/x": 1, "ab/y": 2, "b/a/z": 3})
        await bus.put("a/deep/er", 4)
        await bus.put("a", 5)
        got_a = await take(only_a, 2)
        got_all = await take(everything, 5)
    assert sorted(ev.key for ev in got_a) == ["a/deep/er", "a/x"]
    assert sorted(ev.key for ev in got_all) == ["a", "a/deep/er", "a/x", "ab/y", "b/a/z"]
    async with bus.watch("ab/", from_version=0) as replay:
        assert [(ev.key, ev.value) for ev in await take(replay, 1)] == [("ab/y", 2)]


async def test_deletes_and_rollbacks_are_changes(bus):
    async with bus.watch("d/") as changes:
        await bus.put("d/k", "one")
        await bus.put("d/k", "two")
        await bus.commit({"d/k": DELETE})
        await bus.rollback({"d/k": 1})
        await bus.rollback({"d/k": 3})  # back to the deleted state
        got = await take(changes, 5)
    assert [(ev.version, ev.value, ev.deleted) for ev in got] == [
        (1, "one", False),
        (2, "two", False),
        (3, None, True),
        (4, "one", False),
        (5, None, True),
    ]


# ---- watching is not reading ------------------------------------------------------------------------


async def test_watching_records_no_delivery(data_dir):
    async with oribus.open_local(data_dir, shards=2, agent="watcher", strict=True) as bus:
        other = bus.session(agent="other", strict=False)
        async with bus.watch("n/", from_version=0) as changes:
            await other.put("n/k", 1)
            assert (await take(changes, 1))[0].value == 1
            # a strict session must have read what it writes: a watched value does not count
            with pytest.raises(Conflict) as e:
                await bus.commit({"n/k": 2})
            assert [s.reason for s in e.value.stale] == ["blind_write"]
            # and a value that changed after it was watched does not make a commit stale
            await other.put("n/k", 3)
            await bus.get("n/other")
            await bus.commit({"n/other": 1})


# ---- slow watchers: cut off, never blocking commits; the client resumes ---------------------------


async def test_slow_watcher_is_cut_off_without_blocking_commits(data_dir):
    async with oribus.open_local(
        data_dir, shards=1, agent="w", shard_overrides={"watch_queue_limit": 20}
    ) as bus:
        raw = bus_of(bus).watch(WatchRequest("s/"))  # the bus's own stream: no resuming
        start = time.monotonic()
        for i in range(100):
            await bus.put(f"s/k{i % 5}", i)  # nobody consumes: commits must not wait
        assert time.monotonic() - start < 10
        got = []
        with pytest.raises(WatchLagged) as e:
            async for change in raw:
                got.append(change)
        assert e.value.retryable and isinstance(e.value, oribus.Unavailable)
        assert len(got) == 20  # what it held before it was cut off
        assert [c.version for c in got if c.key == "s/k0"] == [1, 2, 3, 4]
        stats = await bus.stats()
        assert lagged_count(stats) == 1
        assert stats["shards"][0]["watchers"] == 0


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("from_version", [None, 0], ids=["live", "from0"])
async def test_resumable_iterator_resumes_after_lag_without_loss(data_dir, monkeypatch, shards, from_version):
    monkeypatch.setattr(bus_watch, "MERGE_QUEUE_SIZE", 4)
    async with oribus.open_local(
        data_dir, shards=shards, agent="w", unsafe_no_fsync=True,
        shard_overrides={"watch_queue_limit": 16},
    ) as bus:
        if from_version == 0:
            await bus.commit({"p/old": "before the watch"})
        writer = bus.session(agent="writer")
        final: dict[str, int] = {}
        got: list[WatchEvent] = []
        far_behind = asyncio.Event()
        async with bus.watch("p/", from_version=from_version) as changes:

            async def write() -> None:
                for i in range(300):
                    # a few hot keys, and new keys created all along (also while cut off)
                    key = f"p/hot{i % 4}" if i % 3 else f"p/new{i}"
                    await writer.put(key, i)
                    if i == 150:
                        far_behind.set()
                for k in await _keys(bus, "p/"):
                    final[k] = (await bus.history(k, 1))[0].version
                final["p/~end"] = 1
                await writer.put("p/~end", True)

            async def consume() -> None:
                latest: dict[str, int] = {}
                async for ev in changes:
                    got.append(ev)
                    latest[ev.key] = ev.version
                    if len(got) == 1:
                        await far_behind.wait()  # stalls while 150 changes are committed
                    if "p/~end" in final and all(latest.get(k, 0) >= v for k, v in final.items()):
                        return

            await asyncio.wait_for(asyncio.gather(write(), consume()), 30)
        assert lagged_count(await bus.stats()) >= 1  # it really was cut off and resumed
    assert_each_key_exactly(got, final)


async def _keys(bus, prefix: str) -> list[str]:
    keys: set[str] = set()
    for shard in engine_of(bus).shards.values():
        keys.update(shard.store.keys(prefix))
    return sorted(keys)


@history_stores
async def test_resume_uses_per_key_positions(data_dir, history_store):
    """A resumed watch needs only the versions after those seen, per key — not a global minimum."""
    async with oribus.open_local(data_dir, shards=2, agent="w", history_limit=5, history_store=history_store) as bus:
        for v in range(30):
            await bus.put("q/busy", v)
        await bus.put("q/quiet", "x")
        raw = bus_of(bus).watch(WatchRequest("q/", after={"q/busy": 28, "q/quiet": 1}))
        await bus.put("q/quiet", "y")
        got = [await asyncio.wait_for(raw.__anext__(), 5) for _ in range(3)]
        await raw.aclose()
        assert [(c.key, c.version) for c in got if c.key == "q/busy"] == [("q/busy", 29), ("q/busy", 30)]
        assert [(c.key, c.version, c.value) for c in got if c.key == "q/quiet"] == [
            ("q/quiet", 2, oribus.types.encode_value("y"))
        ]
        # a global from_version of 1 would need q/busy's versions 2.., long gone
        with pytest.raises(HistoryTruncated):
            bus_of(bus).watch(WatchRequest("q/", 1))


# ---- closing ---------------------------------------------------------------------------------------


async def test_closing_the_engine_ends_the_iterator(data_dir):
    bus = await oribus.open_local(data_dir, shards=3, agent="w")
    got: list[WatchEvent] = []

    async def consume() -> None:
        async for ev in bus.watch("e/"):
            got.append(ev)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    await bus.put("e/k", 1)
    while not got:
        await asyncio.sleep(0.005)
    await bus.close()
    await asyncio.wait_for(task, 5)  # ended without error
    assert [ev.value for ev in got] == [1]


async def test_closing_the_stream_detaches_it(bus):
    stream = bus.watch("x/")
    await stream.start()
    assert sum(s["watchers"] for s in (await bus.stats())["shards"]) == len(engine_of(bus).shards)
    waiter = asyncio.create_task(stream.__anext__())
    await asyncio.sleep(0.01)
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, 5)
    assert sum(s["watchers"] for s in (await bus.stats())["shards"]) == 0


# ---- the synchronous iterator ----------------------------------------------------------------------


def test_sync_iterator(data_dir):
    with oribus.open_local_sync(data_dir, shards=2, agent="sync") as bus:
        bus.commit({"y/a": 1, "y/b": 2})
        with bus.watch("y/", from_version=0) as changes:  # subscribed on return
            assert sorted((ev.key, ev.value) for ev in (next(changes), next(changes))) == [
                ("y/a", 1), ("y/b", 2),
            ]
            bus.put("y/a", 3)
            ev = next(changes)
            assert (ev.key, ev.version, ev.value) == ("y/a", 2, 3)
            assert changes.last_seen == {"y/a": 2, "y/b": 1}
        assert list(changes) == []  # closed

        live = bus.watch("y/")
        result: list = []

        def consume() -> None:
            result.extend(live)  # blocks until the engine closes

        t = threading.Thread(target=consume)
        t.start()
        bus.put("y/c", "c")
        deadline = time.monotonic() + 5
        while not result and time.monotonic() < deadline:
            time.sleep(0.01)
    t.join(5)
    assert not t.is_alive()
    assert [(ev.key, ev.value) for ev in result] == [("y/c", "c")]


def test_sync_close_from_another_thread_ends_a_blocked_next(data_dir):
    with oribus.open_local_sync(data_dir, shards=2, agent="sync") as bus:
        changes = bus.watch("z/")
        out: list = []
        t = threading.Thread(target=lambda: out.extend(changes))
        t.start()
        time.sleep(0.05)
        changes.close()
        t.join(5)
        assert not t.is_alive() and out == []
