"""No lost update over the network: 16 clients x 100 read-modify-write increments with run().

Against ``oribus up --processes`` (two shard processes). Half of the clients
have their own connection (``oribus.connect``), the other half are sessions
sharing one connection. Each increment is a transaction that reads the
counter and writes it plus one; a lost update would leave the counter below
1600, a double apply above it.
"""

from __future__ import annotations

import asyncio

from conftest import keys_on_shard

import oribus
from oribus import RetryPolicy

CLIENTS = 16
INCREMENTS = 100
# Sixteen writers on one key conflict most of the time: allow plenty of retries
# (each retry re-reads, so it can only succeed on fresh state).
POLICY = RetryPolicy(retries=10_000, base_delay=0.001, max_delay=0.02)


async def increment(tx: oribus.Transaction, key: str) -> int:
    n = (await tx.get(key)).value or 0
    tx.put(key, n + 1)
    return n + 1


async def test_concurrent_increments_end_exactly_at_1600(up_processes):
    addr = up_processes.address
    counter = keys_on_shard(1, "lost-update/counter")[0]  # on the second shard process
    own = [oribus.connect(addr, agent=f"own-{i}") for i in range(CLIENTS // 2)]
    shared = oribus.connect(addr, agent="shared")
    sessions = own + [shared.session(agent=f"shared-{i}") for i in range(CLIENTS // 2)]
    seen: list[list[int]] = [[] for _ in sessions]

    async def client(i: int) -> None:
        for _ in range(INCREMENTS):
            seen[i].append(await sessions[i].run(lambda tx: increment(tx, counter), policy=POLICY))

    try:
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(CLIENTS))), 120)
        reader = oribus.connect(addr, agent="reader")
        try:
            final = await reader.get(counter)
            history = await reader.history(counter)
        finally:
            await reader.close()
    finally:
        for s in (*own, shared):
            await s.close()

    assert final.value == CLIENTS * INCREMENTS
    assert final.version == CLIENTS * INCREMENTS
    # every acknowledged increment wrote a distinct value: 1..1600, each exactly once
    acked = sorted(v for vs in seen for v in vs)
    assert acked == list(range(1, CLIENTS * INCREMENTS + 1))
    # the kept history is a gap-free chain of +1 steps
    values = [h.value for h in reversed(history)]
    assert values == list(range(final.value - len(values) + 1, final.value + 1))
    assert len({h.commit_id for h in history}) == len(history)
