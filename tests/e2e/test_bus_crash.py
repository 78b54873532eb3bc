"""kill -9 the bus while clients commit with fixed commit ids; restart it on the same port.

Two layouts: ``oribus up`` (bus and shards die together) and an ``oribus bus``
process over two shard processes that stay up (transactions the dead bus was
coordinating are left prepared on them). Each writer commits ``N`` two-shard
commits one after another, each with a commit id fixed in advance, retrying
the SAME id after Unavailable (and after SessionExpired, once reset), so a
commit whose first attempt was applied before the crash must not apply again.

Checked: every writer saw Unavailable and then finished with the same client
object; every acknowledged id is in the history of both its keys exactly once;
no id appears in history that was not acknowledged; each writer's values are
0..N-1 in order, each once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from conftest import keys_on_shard
from processes import bus, shard, up

import oribus
from oribus import Aborted, SessionExpired, Unavailable

WRITERS = 4
COMMITS = 40


@pytest.mark.parametrize("transport", ["auto", "grpc"])
@pytest.mark.parametrize("layout", ["up", "bus-process"])
async def test_kill_bus_clients_reconnect_and_nothing_applies_twice(cluster, tmp_path, layout, transport):
    """``auto``: the clients' calls go over the bus's stream listener, which comes back on
    another port; ``grpc``: what every other client speaks."""
    if layout == "up":
        victim = cluster.add(up(tmp_path, tmp_path / "data", processes=False)).start()
    else:
        shards = [
            cluster.add(shard(tmp_path, i, tmp_path / f"shard-{i}")).start() for i in range(2)
        ]
        for s in shards:
            await asyncio.to_thread(s.wait_serving)
        victim = cluster.add(bus(tmp_path, [s.shard_address for s in shards])).start()
    await asyncio.to_thread(victim.wait_serving)
    addr = victim.address

    acked: dict[int, list[str]] = {w: [] for w in range(WRITERS)}
    seen: Counter[str] = Counter()
    keys = {
        w: (keys_on_shard(0, f"busk/{w}/a")[0], keys_on_shard(1, f"busk/{w}/b")[0])
        for w in range(WRITERS)
    }
    sessions = [oribus.connect(addr, agent=f"writer-{w}", transport=transport) for w in range(WRITERS)]
    crashed = asyncio.Event()

    async def writer(w: int) -> None:
        s = sessions[w]
        ka, kb = keys[w]
        for i in range(COMMITS):
            attempt = 0
            while True:
                cid = f"{layout}-w{w}-c{i}" + (f"-r{attempt}" if attempt else "")
                try:
                    await s.commit({ka: i, kb: i}, commit_id=cid)
                    acked[w].append(cid)
                    break
                except Unavailable:
                    seen["Unavailable"] += 1
                    await asyncio.sleep(0.05)
                except SessionExpired:
                    # its shards restarted with the bus: what it wrote there is no delivery any more
                    seen["SessionExpired"] += 1
                    try:
                        await s.reset_session()
                    except Unavailable:
                        await asyncio.sleep(0.05)
                except Aborted:
                    # this id was resolved as aborted after the crash (never applied): a new id
                    seen["Aborted"] += 1
                    attempt += 1
            if i == COMMITS // 2 and not crashed.is_set():
                await crashed.wait()  # make sure every writer still has work left after the crash

    tasks = [asyncio.create_task(writer(w)) for w in range(WRITERS)]
    try:

        async def halfway() -> bool:
            while sum(map(len, acked.values())) < WRITERS * COMMITS // 4:
                await asyncio.sleep(0.01)
            return True

        await asyncio.wait_for(halfway(), 60)
        await asyncio.to_thread(victim.kill9)
        down_at = time.monotonic()
        crashed.set()
        await asyncio.sleep(0.5)
        victim.start()
        await asyncio.to_thread(victim.wait_serving)
        await asyncio.wait_for(asyncio.gather(*tasks), 90)
        recovered_in = time.monotonic() - down_at
        check = oribus.connect(addr, agent="checker")
        try:
            histories = {k: await check.history(k) for pair in keys.values() for k in pair}
            # the same client objects work after the crash (reads too)
            for w, s in enumerate(sessions):
                assert (await s.get(keys[w][0])).value == COMMITS - 1
                assert s._bus.using == ("stream" if transport == "auto" else "grpc")  # noqa: SLF001
        finally:
            await check.close()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in sessions:
            await s.close()

    assert seen["Unavailable"] >= WRITERS, f"the clients did not see the crash: {dict(seen)}"
    for w in range(WRITERS):
        assert len(acked[w]) == COMMITS
        for k in keys[w]:
            ids = [h.commit_id for h in reversed(histories[k])]
            assert len(ids) == len(set(ids)), f"{k}: an id applied twice: {ids}"
            assert ids == acked[w], f"{k}: history {ids} != acknowledged {acked[w]}"
            assert [h.value for h in reversed(histories[k])] == list(range(COMMITS))
    print(f"\nbus crash ({layout}, {transport}): back in {recovered_in:.1f}s, client errors {dict(seen)}")


async def test_run_applies_its_function_once_when_the_commit_outcome_is_unknown(cluster, tmp_path):
    """The server dies after its commit point, before answering; ``run()`` keeps retrying.

    The commit was applied; the client cannot know. Re-running the function in
    a fresh transaction (a new commit id) after the restart would apply the
    increment a second time: run() has to find out the outcome of the commit id
    it sent (retry it) before it may start over.
    """
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False))
    server.env = {"ORIBUS_FAILPOINTS": "txn.after_decide=kill"}  # dies at its first 2PC decision
    server.start()
    await asyncio.to_thread(server.wait_serving)
    k0, k1 = keys_on_shard(0, "once/a")[0], keys_on_shard(1, "once/b")[0]
    calls = 0

    async def increment(tx: oribus.Transaction) -> None:
        nonlocal calls
        calls += 1
        got = await tx.get_many([k0, k1])
        tx.put(k0, (got[k0].value or 0) + 1)  # two shards: a 2PC commit
        tx.put(k1, (got[k1].value or 0) + 1)

    async with oribus.connect(server.address, agent="counter") as session:
        running = asyncio.create_task(
            session.run(
                increment, policy=oribus.RetryPolicy(retries=200, base_delay=0.05, max_delay=0.2)
            )
        )
        assert await asyncio.to_thread(server.wait_exit, 30) == -9, "the failpoint did not fire"
        server.env = {}
        server.start()
        await asyncio.to_thread(server.wait_serving)
        await asyncio.wait_for(running, 60)
        final = await session.session(agent="reader").get_many([k0, k1])
    # the decision was durable before the kill: run() must learn that its commit id applied
    # (by resending it) instead of running the function again under a new id
    assert calls == 1, f"run() ran the function {calls} times for one committed change"
    assert (final[k0].value, final[k1].value) == (1, 1), (
        f"one run() applied {final[k0].value} increments"
    )
