"""Watch over the network: every committed change, in version order per key, resumable from a version.

Against ``oribus up`` and ``oribus up --processes``. Writers commit single-key
and two-shard changes (plus a delete, a rollback and a refused commit); a
watch replays them from version 0, then streams live changes made by
concurrent writers; another resumes from a version.
"""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from conftest import keys_on_shard
from processes import run_cli

import oribus
from oribus import Conflict, RetryPolicy

WRITERS = 3
INCREMENTS = 15
POLICY = RetryPolicy(retries=1_000, base_delay=0.001, max_delay=0.02)
_round = itertools.count()


@pytest.fixture(params=["up", "up --processes"])
def server(request):
    return request.getfixturevalue("up_embedded" if request.param == "up" else "up_processes")


def fresh_keys() -> tuple[str, str, str]:
    prefix = f"watch/{next(_round)}"
    return prefix + "/", keys_on_shard(0, f"{prefix}/a")[0], keys_on_shard(1, f"{prefix}/b")[0]


async def collect(watch, want: int, timeout: float = 15.0) -> list:
    events = []

    async def take() -> None:
        async for ev in watch:
            events.append(ev)
            if len(events) >= want:
                return

    try:
        await asyncio.wait_for(take(), timeout)
    except TimeoutError:
        raise AssertionError(f"watch delivered {len(events)} of {want} changes: {events}") from None
    return events


def per_key(events) -> dict[str, list]:
    out: dict[str, list] = {}
    for ev in events:
        out.setdefault(ev.key, []).append(ev)
    return out


async def increments(conn, k0: str, k1: str) -> None:
    """WRITERS x INCREMENTS two-shard commits, concurrently: k0 and k1 go 1, 2, 3, ... together."""

    async def increment(tx: oribus.Transaction) -> None:
        got = await tx.get_many([k0, k1])
        tx.put(k0, (got[k0].value or 0) + 1)
        tx.put(k1, (got[k1].value or 0) + 1)

    async def writer(n: int) -> None:
        s = conn.session(agent=f"writer-{n}")
        for _ in range(INCREMENTS):
            await s.run(increment, policy=POLICY)

    await asyncio.gather(*(writer(n) for n in range(WRITERS)))


async def assert_matches_history(conn, events: list, key: str) -> None:
    history = list(reversed(await conn.history(key)))
    assert [(e.version, e.value, e.deleted, e.commit_id) for e in events] == [
        (h.version, h.value, h.deleted, h.commit_id) for h in history[-len(events) :]
    ]


async def test_watch_replays_streams_live_and_resumes_from_a_version(server):
    prefix, k0, k1 = fresh_keys()
    n = WRITERS * INCREMENTS
    conn = oribus.connect(server.address, agent="watcher")
    try:
        # history to replay: 2PC increments, a key outside the prefix, a delete, a rollback,
        # and a refused commit (which must never show)
        await increments(conn, k0, k1)
        other = conn.session(agent="other")
        await other.put(f"elsewhere/{prefix}x", "not watched")
        await other.delete(k0)
        await other.rollback({k0: 2})
        stale = conn.session(agent="stale")
        await stale.get(k1)
        await other.put(k1, "moved on")
        with pytest.raises(Conflict):
            await stale.commit({k1: "refused"}, commit_id="refused-commit")

        watch = conn.watch(prefix, from_version=0)
        replayed = per_key(await collect(watch, (n + 2) + (n + 1)))
        assert set(replayed) == {k0, k1}
        assert [e.version for e in replayed[k0]] == list(range(1, n + 3))
        assert [e.version for e in replayed[k1]] == list(range(1, n + 2))
        assert [e.value for e in replayed[k0][:n]] == list(range(1, n + 1))
        assert replayed[k0][n].deleted and replayed[k0][n].value is None
        assert replayed[k0][n + 1].value == 2 and replayed[k0][n + 1].agent == "other"
        assert replayed[k1][-1].value == "moved on"
        # one two-shard commit: one change per key, with the same commit id
        assert [e.commit_id for e in replayed[k0][:n]] == [e.commit_id for e in replayed[k1][:n]]
        for key in (k0, k1):
            await assert_matches_history(conn, replayed[key], key)
            assert "refused-commit" not in {e.commit_id for e in replayed[key]}

        # the same watch goes on live: concurrent writers, every change in version order
        await conn.session(agent="other").put(k0, 0)
        await conn.session(agent="other").put(k1, 0)
        writing = asyncio.create_task(increments(conn, k0, k1))
        live = per_key(await collect(watch, 2 * (n + 1)))
        await writing
        await watch.aclose()
        assert [e.version for e in live[k0]] == list(range(n + 3, 2 * n + 4))
        assert [e.version for e in live[k1]] == list(range(n + 2, 2 * n + 3))
        assert [e.value for e in live[k0]] == list(range(0, n + 1))
        for key in (k0, k1):
            await assert_matches_history(conn, live[key], key)

        # resume from a version: the kept versions after it, then live changes
        resumed = conn.watch(prefix, from_version=2 * n)
        last0, last1 = 2 * n + 3, 2 * n + 2
        got = per_key(await collect(resumed, (last0 - 2 * n) + (last1 - 2 * n)))
        assert [e.version for e in got[k0]] == list(range(2 * n + 1, last0 + 1))
        assert [e.version for e in got[k1]] == list(range(2 * n + 1, last1 + 1))
        await conn.session(agent="late").put(k1, "after resume")
        (after,) = await collect(resumed, 1)
        assert (after.key, after.version, after.value) == (k1, last1 + 1, "after resume")
        await resumed.aclose()
    finally:
        await conn.close()

    # the CLI's watch prints changes as JSON lines
    r = run_cli(
        "watch", prefix, "--addr", server.address, "--from-version", str(2 * n), "--count", "3"
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 3 and {"key", "version", "value", "agent", "commit_id"} <= set(lines[0])
    for key in (k0, k1):  # each key's changes in version order, all after the version asked
        versions = [line["version"] for line in lines if line["key"] == key]
        assert versions == list(range(2 * n + 1, 2 * n + 1 + len(versions)))
    assert {line["key"] for line in lines} <= {k0, k1}


async def test_live_watch_is_subscribed_when_start_returns(server):
    """``start()`` promises: every change made visible after it returns is delivered."""
    prefix, k0, k1 = fresh_keys()
    conn = oribus.connect(server.address, agent="watcher")
    try:
        watch = conn.watch(prefix, from_version=None)
        await watch.start()
        await conn.commit({k0: "first", k1: "first"})
        got = per_key(await collect(watch, 2, timeout=5))
        assert {k: [(e.version, e.value) for e in evs] for k, evs in got.items()} == {
            k0: [(1, "first")],
            k1: [(1, "first")],
        }
        await watch.aclose()
    finally:
        await conn.close()
