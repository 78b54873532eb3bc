"""Seeded random schedules over a replica group of three (DirectPeers, real fsync): commits in
flight while links are cut and healed, members crash, restart, some on an empty directory,
and elections run as etcd would run them, with the old primary often still alive. After
every election the new primary must hold every acknowledged commit (R-1, R-2); at the end,
any two logs that hold a record of the same term at the same LSN are equal up to it (log
matching, R-3) and every member holds every acknowledged commit once it has caught up."""

from __future__ import annotations

import asyncio
import random
import shutil

import pytest
from test_replica_group import Group, log_records, put, values

from oribus.errors import OribusError, Unavailable
from oribus.shards.wal import WalConfig
from oribus.shards.wal.record import TERM_START

# 16 and 28 lose acknowledged commits within a few steps when a primary acknowledges on its own
# fsync instead of a majority's (tried by hand: rules.quorum_lsn returning the primary's own
# durable LSN); a run of seeds 10..40 passes and finds the same with three of them.
SEEDS = (1, 2, 16, 28)
STEPS = 50


async def run_schedule(tmp_path, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    g = Group(tmp_path, snapshot_every_records=25, wal=WalConfig(segment_bytes=1500))
    await g.start_all()
    acknowledged: dict[str, int] = {}
    tasks: set[asyncio.Task] = set()
    down: set[int] = set()
    shard = None
    n = 0

    async def one_commit(target, key: str, value: int) -> None:
        try:
            await asyncio.wait_for(target.commit_one_phase(put(f"c-{key}", key, value)), 2)
        except (OribusError, TimeoutError):
            return  # outcome unknown: may or may not be there later
        acknowledged[key] = value

    async def elect() -> None:
        nonlocal shard
        if rng.random() < 0.5:
            g.net.heal()  # else the election runs with the links as they are: the old primary
        live = [i for i in g.members if g.members[i].voter]  # may be cut off, still appending
        if len(live) < 2:
            return
        try:
            _, new = await g.elect(rng.choice(live), timeout=1.0)
        except (AssertionError, TimeoutError, Unavailable):
            return
        shard = new
        got = await values(new, list(acknowledged))
        assert got == acknowledged, f"seed {seed}: a new primary lacks acknowledged commits: " \
                                    f"{ {k: v for k, v in acknowledged.items() if got.get(k) != v} }"

    try:
        await elect()
        for _ in range(STEPS):
            op = rng.choices(["commit", "cut", "isolate", "heal", "crash", "restart", "elect"],
                             [8, 2, 1, 2, 1, 1, 2])[0]
            if op == "commit" and shard is not None:
                for _ in range(rng.randint(1, 4)):
                    t = asyncio.ensure_future(one_commit(shard, f"k{n}", n))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    n += 1
            elif op == "cut":
                a, b = rng.sample(range(3), 2)
                g.net.cut(a, b)
            elif op == "isolate":  # the primary goes on appending, cut off from every follower
                primary = next((i for i, m in g.members.items() if m.is_primary), None)
                if primary is not None:
                    g.net.isolate(primary)
            elif op == "heal":
                g.net.heal()
            elif op == "crash" and len(down) == 0:
                victim = rng.randrange(3)
                if g.members[victim].is_primary:
                    shard = None
                await g.crash(victim)
                down.add(victim)
            elif op == "restart" and down:
                back = down.pop()
                if rng.random() < 0.5:
                    shutil.rmtree(g.data_dir(back))  # its disk was lost: back as a learner
                await g.start(back)
            elif op == "elect":
                await elect()
            await asyncio.sleep(rng.uniform(0, 0.03))
        g.net.heal()
        for back in sorted(down):
            await g.start(back)
        down.clear()
        if tasks:
            await asyncio.wait(set(tasks), timeout=5)
        for _ in range(5):
            if any(m.is_primary for m in g.members.values()):
                break
            g.net.heal()
            await elect()
        primary = next((m for m in g.members.values() if m.is_primary), None)
        if primary is None:
            # Fail closed: only when the disks of a majority were lost (learners never elect, R-5).
            voters = [m.member_id for m in g.members.values() if m.voter]
            assert len(voters) < 2, f"seed {seed}: no primary with voters {voters}: " \
                                    f"{[m.status() for m in g.members.values()]}"
            return acknowledged
        last = primary.durable_lsn

        def caught_up() -> bool:
            return all(m.durable_lsn >= last and m.voter for m in g.members.values())

        for _ in range(500):
            if caught_up():
                break
            await asyncio.sleep(0.01)
        assert caught_up(), f"seed {seed}: members did not catch up: {[m.status() for m in g.members.values()]}"
    finally:
        g.net.heal()
        for t in list(tasks):
            t.cancel()
        await g.close()

    logs = {i: log_records(g.data_dir(i)) for i in range(3)}
    for a in range(3):
        for b in range(a + 1, 3):
            check_log_matching(logs[a], logs[b], seed)
    return acknowledged


def terms_of(log: list) -> dict[int, int]:
    """LSN -> term for the records of ``log`` from its first TERM_START on."""
    out, term = {}, None
    for lsn, rtype, body in log:
        if rtype == TERM_START:
            term = body["t"]
        if term is not None:
            out[lsn] = term
    return out


def check_log_matching(a: list, b: list, seed: int) -> None:
    ta, tb = terms_of(a), terms_of(b)
    by_lsn_a = {lsn: (rtype, body) for lsn, rtype, body in a}
    by_lsn_b = {lsn: (rtype, body) for lsn, rtype, body in b}
    common = sorted(set(ta) & set(tb))
    agree = [lsn for lsn in common if ta[lsn] == tb[lsn]]
    if not agree:
        return
    top = max(agree)
    for lsn in common:
        if lsn <= top:
            assert by_lsn_a[lsn] == by_lsn_b[lsn], f"seed {seed}: logs differ at LSN {lsn} below LSN {top}, " \
                                                   "where they agree on the term"


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_schedule_keeps_every_acknowledged_commit(tmp_path, seed: int) -> None:
    acknowledged = await run_schedule(tmp_path, seed)
    assert acknowledged, "the schedule acknowledged nothing: it tested nothing"
