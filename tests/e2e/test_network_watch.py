"""Watch over the network: every committed change, in version order per key, resumable from a version.

Against ``oribus up`` and ``oribus up --processes``. Writers commit single-key
and two-shard changes (plus a delete, a rollback and a refused commit) while
a live watch runs; then new watches replay from a version and go on live.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess

import pytest
from conftest import keys_on_shard
from processes import oribus_command

import oribus
from oribus import Conflict, RetryPolicy

WRITERS = 3
INCREMENTS = 15
POLICY = RetryPolicy(retries=1_000, base_delay=0.001, max_delay=0.02)
_round = itertools.count()


@pytest.fixture(params=["up", "up --processes"])
def server(request):
    return request.getfixturevalue("up_embedded" if request.param == "up" else "up_processes")


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


async def test_watch_delivers_every_change_in_order_and_resumes(server):
    prefix = f"watch/{next(_round)}"
    k0 = keys_on_shard(0, f"{prefix}/a")[0]
    k1 = keys_on_shard(1, f"{prefix}/b")[0]
    outside = f"elsewhere/{prefix}"
    conn = oribus.connect(server.address, agent="watcher")
    try:
        live = conn.watch(prefix + "/", from_version=None)
        await live.start()  # subscribed: everything committed from here on is delivered

        async def increment(tx: oribus.Transaction) -> None:
            got = await tx.get_many([k0, k1])
            tx.put(k0, (got[k0].value or 0) + 1)  # two shards in one commit: 2PC
            tx.put(k1, (got[k1].value or 0) + 1)

        async def writer(n: int) -> None:
            s = conn.session(agent=f"writer-{n}")
            for _ in range(INCREMENTS):
                await s.run(increment, policy=POLICY)

        await asyncio.gather(*(writer(n) for n in range(WRITERS)))
        other = conn.session(agent="other")
        await other.put(outside, "not watched")
        await other.delete(k0)
        await other.rollback({k0: 2})
        stale = conn.session(agent="stale")
        await stale.get(k1)
        await other.put(k1, "moved on")
        with pytest.raises(Conflict):
            await stale.commit({k1: "refused"})  # never visible, so never watched
        refused_id = "never-visible"

        n0 = WRITERS * INCREMENTS + 2  # increments, delete, rollback
        n1 = WRITERS * INCREMENTS + 1  # increments, "moved on"
        events = await collect(live, n0 + n1)
        await live.aclose()

        by_key: dict[str, list] = {}
        for ev in events:
            by_key.setdefault(ev.key, []).append(ev)
        assert set(by_key) == {k0, k1}
        for key, n in ((k0, n0), (k1, n1)):
            assert [ev.version for ev in by_key[key]] == list(range(1, n + 1)), key
            history = list(reversed(await conn.history(key)))
            assert [(ev.version, ev.value, ev.deleted, ev.commit_id) for ev in by_key[key]] == [
                (h.version, h.value, h.deleted, h.commit_id) for h in history
            ]
            assert refused_id not in {ev.commit_id for ev in by_key[key]}
        assert [ev.value for ev in by_key[k0][:WRITERS * INCREMENTS]] == list(range(1, WRITERS * INCREMENTS + 1))
        assert by_key[k0][-2].deleted and by_key[k0][-2].value is None
        assert by_key[k0][-1].value == 2 and by_key[k0][-1].agent == "other"
        assert by_key[k1][-1].value == "moved on"
        # a two-shard commit reaches the watch as one change per key with the same commit id
        assert {ev.commit_id for ev in by_key[k0][:WRITERS * INCREMENTS]} == {
            ev.commit_id for ev in by_key[k1][:WRITERS * INCREMENTS]}

        # resume from a version: the kept versions after it, then live changes
        resumed = conn.watch(prefix + "/", from_version=40)
        await resumed.start()
        await other.put(k1, "after resume")
        got = await collect(resumed, (n0 - 40) + (n1 - 40) + 1)
        await resumed.aclose()
        assert [(e.key, e.version) for e in got if e.key == k0] == [(k0, v) for v in range(41, n0 + 1)]
        assert [(e.key, e.version) for e in got if e.key == k1] == [(k1, v) for v in range(41, n1 + 2)]
        assert got[-1].value == "after resume" or any(e.value == "after resume" for e in got)
    finally:
        await conn.close()

    # the CLI's watch: a replay from version 0 printed as JSON lines
    cli = subprocess.run(
        oribus_command("watch", prefix + "/", "--addr", server.address, "--from-version", "0", "--count", "3"),
        capture_output=True, text=True, timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert len(lines) == 3
    first = {line["key"]: line for line in lines}
    assert all(line["key"] in (k0, k1) for line in lines)
    assert min(line["version"] for line in lines) == 1 and first[lines[0]["key"]]["version"] >= 1
