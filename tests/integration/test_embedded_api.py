"""The embedded API end to end: ORI semantics, rollback, history, sessions, errors."""

from __future__ import annotations

import asyncio
import json

import pytest

import oribus
from oribus import DELETE, Conflict, InvalidRequest, SessionExpired
from oribus.hosts.up import UpHost
from oribus.types import DEFAULT_MAX_VALUE_BYTES


def bus_engine(session: oribus.AsyncSession):
    return session._owner


@pytest.fixture(params=[1, 4], ids=["1shard", "4shards"])
async def bus(request, data_dir):
    async with oribus.open_local(data_dir, shards=request.param, agent="planner") as b:
        yield b


async def test_absent_key_reads_version_zero(bus):
    item = await bus.get("nothing/here")
    assert item == oribus.Item("nothing/here", None, 0)
    assert not item.exists


async def test_commit_put_get_and_versions(bus):
    assert await bus.commit({"a": 1, "b": [1, 2]}) == {"a": 1, "b": 1}
    assert await bus.put("a", {"x": b"bytes"}) == 2
    items = await bus.get_many(["a", "b", "c"])
    assert items["a"].value == {"x": b"bytes"} and items["a"].version == 2
    assert items["b"].value == [1, 2]
    assert items["c"].version == 0
    assert (await bus.commit({"a": DELETE}))["a"] == 3
    assert await bus.get("a") == oribus.Item("a", None, 3)


async def test_write_skew_is_rejected(bus):
    await bus.commit({"x": 0, "y": 0})
    a = bus.session(agent="A")
    b = bus.session(agent="B")
    await a.get_many(["x", "y"])
    await b.get_many(["x", "y"])
    results = []
    for s, key in ((a, "x"), (b, "y")):
        try:
            await s.commit({key: 1})
            results.append("ok")
        except Conflict as e:
            results.append(e)
    assert results.count("ok") == 1
    err = next(r for r in results if r != "ok")
    assert [(s.key, s.version, s.current, s.reason) for s in err.stale] == [("x", 1, 2, "stale_read")]
    assert (await bus.get("y")).version == 1  # B wrote nothing


async def test_concurrent_write_skew_exactly_one_commits(bus):
    for round_ in range(20):
        kx, ky = f"r{round_}/x", f"r{round_}/y"
        await bus.session(agent="seed").commit({kx: 0, ky: 0})
        a, b = bus.session(agent="A"), bus.session(agent="B")
        await asyncio.gather(a.get_many([kx, ky]), b.get_many([kx, ky]))
        res = await asyncio.gather(a.commit({kx: 1}), b.commit({ky: 1}), return_exceptions=True)
        assert sum(not isinstance(r, Exception) for r in res) == 1, res
        assert all(isinstance(r, Conflict) for r in res if isinstance(r, Exception))


async def test_own_commit_never_makes_next_commit_fail(bus):
    await bus.get_many(["p", "q"])
    await bus.commit({"p": 1})
    await bus.commit({"q": 1})  # depends on p, which this session itself wrote
    await bus.commit({"p": 2, "q": 2})
    await bus.put("p", 3)
    assert (await bus.get("p")).version == 3


async def test_stale_read_fails_whatever_explicit_entries_say(bus):
    other = bus.session(agent="other")
    await bus.get("k")
    await other.put("k", "changed")
    # an explicit entry claiming the current version cannot mask the logged stale read
    with pytest.raises(Conflict) as e:
        await bus.commit({"out": 1}, read_set={"k": 1})
    assert e.value.stale[0].key == "k" and e.value.stale[0].version == 0
    # an explicit stale entry fails even if the log is current
    await bus.get("k")
    with pytest.raises(Conflict):
        await bus.commit({"out": 1}, read_set={"k": 0})
    assert (await bus.get("out")).version == 0


async def test_expected_version(bus):
    await bus.put("e", 1)
    with pytest.raises(Conflict) as e:
        await bus.commit({"e": 2}, expect={"e": 7})
    assert e.value.stale[0].reason == "expected_version"
    assert await bus.commit({"e": 2}, expect={"e": 1}) == {"e": 2}


async def test_lost_update_prevented_for_read_then_written_key(bus):
    other = bus.session(agent="other")
    await bus.get("counter")
    await other.get("counter")
    await other.put("counter", 1)
    with pytest.raises(Conflict):
        await bus.put("counter", 1)


async def test_blind_write_allowed_unless_strict(bus):
    other = bus.session(agent="o")
    await other.put("blind", 1)
    assert await bus.put("blind", 2) == 2
    strict = bus.session(agent="s", strict=True)
    with pytest.raises(Conflict) as e:
        await strict.put("blind", 3)
    assert e.value.stale[0].reason == "blind_write"
    await strict.get("blind")
    assert await strict.put("blind", 3) == 3


async def test_forget_and_reset_drop_dependencies(bus):
    other = bus.session(agent="o")
    await bus.get_many(["f1", "f2"])
    await other.commit({"f1": 1, "f2": 1})
    with pytest.raises(Conflict):
        await bus.put("out", 1)
    await bus.forget(["f1"])
    with pytest.raises(Conflict):
        await bus.put("out", 1)
    await bus.forget(["f2"])
    assert await bus.put("out", 1) == 1
    await bus.get("f1")
    await other.put("f1", 2)
    await bus.reset_session()
    assert await bus.put("out", 2) == 2


async def test_transaction_scope_only_counts_its_own_reads(bus):
    other = bus.session(agent="o")
    await bus.get("old")
    await other.put("old", 1)  # the session's old read is now stale
    async with bus.transaction() as tx:
        a = await tx.get("t/a")
        tx.put("t/b", (a.value or 0) + 1)
    assert tx.versions == {"t/b": 1}
    with pytest.raises(Conflict):  # session scope still sees the stale read
        await bus.put("t/c", 1)


async def test_transaction_conflict_and_discard(bus):
    other = bus.session(agent="o")
    tx = bus.transaction()
    await tx.get("tc")
    await other.put("tc", 5)
    tx.put("tc", 1)
    with pytest.raises(Conflict):
        await tx.commit()
    with pytest.raises(ValueError):
        async with bus.transaction() as tx2:
            tx2.put("discarded", 1)
            raise ValueError
    assert (await bus.get("discarded")).version == 0
    assert (await bus.get("tc")).value == 5


async def test_run_retries_until_commit(bus):
    await bus.put("ctr", 0)
    sessions = [bus.session(agent=f"w{i}") for i in range(8)]

    async def inc(tx):
        v = await tx.get("ctr")
        await asyncio.sleep(0)
        tx.put("ctr", v.value + 1)

    await asyncio.gather(*(s.run(inc, retries=200) for s in sessions for _ in range(5)))
    assert (await bus.get("ctr")).value == 40


async def test_run_gives_up_after_retries(bus):
    other = bus.session(agent="o")

    async def always_stale(tx):
        await tx.get("hot")
        await other.put("hot", 1)
        tx.put("hot", 2)

    with pytest.raises(Conflict):
        await bus.run(always_stale, retries=3)


async def test_rollback_and_history(bus):
    for v in ("one", "two", "three"):
        await bus.put("doc", v)
    hist = await bus.history("doc")
    assert [h.version for h in hist] == [3, 2, 1]
    assert [h.value for h in hist] == ["three", "two", "one"]
    assert hist[0].agent == "planner" and hist[0].session == bus.session_id
    assert hist[0].commit_id and hist[0].committed_at > 0
    assert await bus.rollback({"doc": 1}) == {"doc": 4}
    assert await bus.get("doc") == oribus.Item("doc", "one", 4)
    assert (await bus.history("doc", limit=2))[1].value == "three"
    await bus.rollback({"doc": 0})
    assert (await bus.get("doc")).value is None
    with pytest.raises(InvalidRequest):
        await bus.rollback({"doc": 99})


async def test_multi_key_rollback_is_atomic_and_checked(bus):
    await bus.commit({"r/a": 1, "r/b": 1})
    await bus.commit({"r/a": 2, "r/b": 2})
    other = bus.session(agent="o")
    await bus.get("r/a")
    await other.put("r/a", 3)
    with pytest.raises(Conflict):
        await bus.rollback({"r/a": 1, "r/b": 1})
    assert (await bus.get("r/b")).value == 2
    await bus.get("r/a")  # re-read: the session now depends on the current version
    await bus.rollback({"r/a": 1, "r/b": 1})
    got = await bus.get_many(["r/a", "r/b"])
    assert got["r/a"].value == 1 and got["r/b"].value == 1


async def test_idempotent_commit_id(bus):
    first = await bus.commit({"i/a": 1, "i/b": 2}, commit_id="fixed-id")
    again = await bus.commit({"i/a": 1, "i/b": 2}, commit_id="fixed-id")
    assert first == again
    assert (await bus.get("i/a")).version == 1


async def test_bad_input_is_refused_and_changes_nothing(bus):
    for key in ("", "/a", "a/", "a//b", "x" * 1025, 5, "bad\x00key"):
        with pytest.raises(InvalidRequest):
            await bus.put(key, 1)
    with pytest.raises(InvalidRequest):
        await bus.put("ok", object())
    with pytest.raises(oribus.ValueTooLarge):
        await bus.put("big", b"x" * (2 << 20))
    with pytest.raises(InvalidRequest):
        await bus.commit({"ok": 1}, expect={"ok": "one"})
    with pytest.raises(InvalidRequest):
        await bus.history("ok", limit=0)
    assert (await bus.get("ok")).version == 0
    assert (await bus.get("big")).version == 0


async def test_session_expired_after_restart(data_dir):
    async with oribus.open_local(data_dir, shards=2, agent="a") as bus:
        await bus.put("k", 1)
        await bus.get("k")
        tokens = dict(bus._tokens)
        ref = bus.session_ref
    async with oribus.open_local(data_dir, shards=2, agent="a") as bus:
        assert (await bus.get("k")).value == 1
        survivor = bus.session(agent=ref.agent, session_id=ref.session_id)
        survivor._tokens.update(tokens)
        with pytest.raises(SessionExpired):
            await survivor.put("k", 2)
        await survivor.reset_session()
        await survivor.get("k")
        assert await survivor.put("k", 2) == 2


async def test_session_expired_after_ttl(data_dir):
    async with oribus.open_local(data_dir, shards=2, agent="a", session_ttl_seconds=0.2) as bus:
        await bus.get("k")
        other = bus.session(agent="o")
        await asyncio.sleep(0.3)
        await other.get("k")  # activity elsewhere does not keep bus's session alive
        with pytest.raises(SessionExpired):
            await bus.put("k", 1)
        # a fresh read does not silently revive the lost deliveries either
        await bus.get("k")
        with pytest.raises(SessionExpired):
            await bus.put("k", 1)
        await bus.reset_session()
        assert await bus.put("k", 1) == 1


async def test_delivery_log_cap_is_a_clear_error(data_dir):
    async with oribus.open_local(data_dir, shards=1, agent="a", max_entries_per_session=5) as bus:
        await bus.get_many([f"k{i}" for i in range(5)])
        with pytest.raises(oribus.LimitExceeded):
            await bus.get("k5")
        await bus.get("k0")  # re-reading a known key is fine
        await bus.forget(["k0"])
        await bus.get("k5")


async def test_history_survives_restart(data_dir):
    async with oribus.open_local(data_dir, shards=2, agent="a") as bus:
        for i in range(5):
            await bus.commit({"h": i, "g": -i})
    async with oribus.open_local(data_dir, shards=2, agent="a") as bus:
        assert [h.value for h in await bus.history("h")] == [4, 3, 2, 1, 0]
        assert (await bus.get("g")).version == 5


async def test_shard_count_is_fixed_for_a_data_dir(data_dir):
    async with oribus.open_local(data_dir, shards=2) as bus:
        await bus.put("k", 1)
    with pytest.raises(InvalidRequest, match="holds data for 2 shards"):
        async with oribus.open_local(data_dir, shards=3):
            pass
    # no count given: the directory's own
    async with oribus.open_local(data_dir) as bus:
        assert len(bus_engine(bus).shards) == 2
        assert (await bus.get("k")).value == 1


async def test_a_new_data_dir_gets_one_shard_by_default(data_dir, tmp_path):
    async with oribus.open_local(data_dir) as bus:
        assert len(bus_engine(bus).shards) == 1
        await bus.commit({"a": 1, "b": 2, "c": 3})
    assert json.loads((data_dir / "layout.json").read_text())["shards"] == 1
    # oribus up: the same for in-process shards, one process per core with --processes
    assert UpHost(tmp_path / "up").config.shards == 1
    assert UpHost(tmp_path / "procs", processes=True).config.shards == 2
    assert UpHost(data_dir, processes=True).config.shards == 1  # an existing one keeps its own


async def test_a_damaged_layout_file_is_refused_by_name(data_dir):
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "layout.json").write_text('{"format": 1, "shards": "two"}')
    with pytest.raises(InvalidRequest, match="layout.json names no valid shard count"):
        async with oribus.open_local(data_dir):
            pass
    (data_dir / "layout.json").write_text("{not json")
    with pytest.raises(InvalidRequest, match="layout.json is unreadable"):
        async with oribus.open_local(data_dir):
            pass


def test_sync_api(data_dir):
    with oribus.open_local_sync(data_dir, shards=2, agent="planner") as bus:
        assert bus.put("a", 1) == 1
        assert bus.get("a").value == 1
        with bus.transaction() as tx:
            tx.put("b", tx.get("a").value + 1)
        assert bus.get_many(["b"])["b"].value == 2
        other = bus.session(agent="o")
        other.get("a")
        bus.put("a", 5)
        with pytest.raises(Conflict):
            other.commit({"c": 1})
        assert bus.run(lambda tx: tx.put("d", 1)) is None
        assert [h.value for h in bus.history("a")] == [5, 1]
        assert bus.rollback({"a": 1}) == {"a": 3}


async def test_a_commit_over_the_request_limit_is_refused_clearly(data_dir):
    from oribus.client.session import MAX_COMMIT_BYTES

    async with oribus.open_local(data_dir, shards=1, agent="big") as b:
        value = b"x" * (DEFAULT_MAX_VALUE_BYTES - 64)  # just under the value limit each
        n = MAX_COMMIT_BYTES // len(value) + 1
        with pytest.raises(InvalidRequest, match="split it"):
            await b.commit({f"big/{i}": value for i in range(n)})
        assert (await b.get("big/0")).version == 0  # nothing was sent


async def test_scan_lists_live_keys_by_prefix_in_pages_without_recording_a_read(bus):
    await bus.commit({"team/a": 1, "team/b": 2, "team/c": 3, "teamx": 0, "other/a": 9})
    await bus.delete("team/b")
    assert [(i.key, i.value, i.version) for i in await bus.scan("team/")] == [("team/a", 1, 1), ("team/c", 3, 1)]
    first = await bus.scan("team", limit=2)
    assert [i.key for i in first] == ["team/a", "team/c"]
    assert [i.key for i in await bus.scan("team", after=first[-1].key)] == ["teamx"]
    # a scan is not a delivery: another agent's write after it does not refuse this commit
    other = bus.session(agent="other")
    await other.put("team/z", 5)
    assert [i.key for i in await bus.scan("team/")] == ["team/a", "team/c", "team/z"]
    await other.put("team/z", 6)
    assert await bus.commit({"team/z": 7}) == {"team/z": 3}
    with pytest.raises(InvalidRequest):
        await bus.scan("team/", limit=0)


def test_the_sync_session_scans_too(data_dir):
    with oribus.open_local_sync(data_dir, agent="a") as bus:
        bus.commit({"p/1": 1, "p/2": 2, "q": 3})
        assert [(i.key, i.value) for i in bus.scan("p/", limit=1)] == [("p/1", 1)]
        assert [i.key for i in bus.scan("p/", after="p/1")] == ["p/2"]
