"""ORI across shard processes: a commit depends on reads from two shards, checked atomically.

Against ``oribus up --processes``. Keys are picked with the same slot map the
bus uses, so "on shard 0" and "on shard 1" mean two different processes.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from conftest import keys_on_shard

import oribus
from oribus import Conflict

_round = itertools.count()


def fresh_keys(name: str) -> tuple[str, str, str]:
    """(key on shard 0, key on shard 1, a third key) under a prefix no other test uses."""
    prefix = f"ori/{name}/{next(_round)}"
    a = keys_on_shard(0, f"{prefix}/a")[0]
    b = keys_on_shard(1, f"{prefix}/b")[0]
    return a, b, f"{prefix}/out"


@pytest.fixture
async def sessions(up_processes):
    conn = oribus.connect(up_processes.address, agent="setup")
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize("changed", ["shard-0 key", "shard-1 key", "nothing"])
async def test_transaction_reading_two_shards_is_rejected_when_a_read_key_changed(
    sessions, changed
):
    a, b, out = fresh_keys("txn")
    await sessions.commit({a: 1, b: 1})
    agent, other = sessions.session(agent="agent"), sessions.session(agent="other")

    tx = agent.transaction()
    got = await tx.get_many([a, b])
    tx.put(out, got[a].value + got[b].value)
    if changed != "nothing":
        await other.put(a if changed == "shard-0 key" else b, 100)

    if changed == "nothing":
        assert await tx.commit() == {out: 1}  # the control: the same commit passes unchanged
        assert (await other.get(out)).value == 2
        return
    with pytest.raises(Conflict) as e:
        await tx.commit()
    stale_key = a if changed == "shard-0 key" else b
    assert [(s.key, s.version, s.current) for s in e.value.stale] == [(stale_key, 1, 2)]
    assert (await other.get(out)).version == 0  # nothing was written


@pytest.mark.parametrize("changed", ["shard-0 key", "shard-1 key"])
async def test_session_commit_is_rejected_when_a_read_key_on_another_shard_changed(
    sessions, changed
):
    """Session scope (plain agents): what the session was given is checked, on every shard."""
    a, b, out = fresh_keys("session")
    await sessions.commit({a: 1, b: 1})
    agent, other = sessions.session(agent="agent"), sessions.session(agent="other")
    await agent.get(a)
    await agent.get(b)
    await other.put(a if changed == "shard-0 key" else b, 2)
    with pytest.raises(Conflict) as e:
        await agent.commit({out: "based on stale reads"})
    assert [s.key for s in e.value.stale] == [a if changed == "shard-0 key" else b]
    assert (await other.get(out)).version == 0


async def write_skew_round(sessions, name: str, concurrent: bool) -> tuple[list, str, str]:
    """A reads x and y and writes y; B reads x and y and writes x (x, y on different shards).

    Each alone keeps x + y >= 1; both together would break it: write skew.
    """
    x, y, _ = fresh_keys(name)
    await sessions.commit({x: 1, y: 1})
    alice, bob = sessions.session(agent="alice"), sessions.session(agent="bob")
    ta, tb = alice.transaction(), bob.transaction()
    for tx in (ta, tb):
        got = await tx.get_many([x, y])
        assert got[x].value + got[y].value == 2
    ta.put(y, 0)
    tb.put(x, 0)
    if concurrent:
        results = await asyncio.gather(ta.commit(), tb.commit(), return_exceptions=True)
    else:
        results = []
        for tx in (ta, tb):
            try:
                results.append(await tx.commit())
            except Conflict as e:
                results.append(e)
    return results, x, y


async def test_crossed_commits_sequential_write_skew_is_rejected(sessions):
    results, x, y = await write_skew_round(sessions, "skew-seq", concurrent=False)
    assert results[0] == {y: 2}
    assert isinstance(results[1], Conflict)
    assert [(s.key, s.reason) for s in results[1].stale] == [(y, "stale_read")]
    final = await sessions.get_many([x, y])
    assert (final[x].value, final[y].value) == (1, 0)


async def test_crossed_commits_concurrent_write_skew_is_rejected(sessions):
    """Both commits in flight at once, many rounds: never both succeed."""
    succeeded = []
    for _ in range(15):
        results, x, y = await write_skew_round(sessions, "skew-con", concurrent=True)
        ok = [r for r in results if not isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, BaseException):
                assert isinstance(r, Conflict), repr(r)
        assert len(ok) <= 1, f"write skew committed: {results}"
        final = await sessions.get_many([x, y])
        assert final[x].value + final[y].value >= 1
        assert final[x].version + final[y].version == 2 + len(ok)
        succeeded.append(len(ok))
    # in practice one of the two usually wins; if every round aborted both, something is off
    assert sum(succeeded) >= 5, succeeded


async def test_write_skew_in_session_scope_is_rejected(sessions):
    """The S-Bus case: plain session reads, then single-key commits, crossed."""
    x, y, _ = fresh_keys("skew-session")
    await sessions.commit({x: 1, y: 1})
    alice, bob = sessions.session(agent="alice"), sessions.session(agent="bob")
    for s in (alice, bob):
        await s.get(x)
        await s.get(y)
    assert await alice.commit({y: 0}) == {y: 2}
    with pytest.raises(Conflict) as e:
        await bob.commit({x: 0})
    assert [s.key for s in e.value.stale] == [y]
    final = await sessions.get_many([x, y])
    assert (final[x].value, final[y].value) == (1, 0)
