"""``oribus demo``: a small fleet of agents sharing state on the embedded engine.

It shows, in order: write skew refused (two agents, crossed reads and writes:
exactly one commits); a fleet of agents updating shared counters through
retried transactions with no lost update; a restart that keeps every
acknowledged commit while the sessions that read before it fail closed; and
a rollback with the key's history.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import oribus


def _say(title: str) -> None:
    print(f"\n== {title}")


async def run_demo(data_dir: Path, *, shards: int = 2, fresh: bool = True, agents: int = 8, steps: int = 50) -> int:
    if fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    print(f"oribus demo: embedded engine, {shards} shards, data in {data_dir}")

    async with oribus.open_local(data_dir, shards=shards, agent="planner") as bus:
        _say("1. write skew is refused")
        await bus.commit({"team/plan": {"steps": ["draft"]}, "team/budget": 100})
        reviewer = bus.session(agent="reviewer")
        await bus.get_many(["team/plan", "team/budget"])
        await reviewer.get_many(["team/plan", "team/budget"])
        await bus.commit({"team/plan": {"steps": ["draft", "build"]}})
        print("planner read plan+budget, wrote plan: committed")
        try:
            await reviewer.commit({"team/budget": 80})
            print("reviewer committed too: WRITE SKEW (this must not happen)")
            return 1
        except oribus.Conflict as e:
            for s in e.stale:
                print(f"reviewer refused: {s.key} read at v{s.version}, now v{s.current} ({s.reason})")

        _say(f"2. {agents} agents x {steps} transactions on shared counters")
        await bus.commit({f"fleet/counter/{i}": 0 for i in range(4)})
        retries = 0

        async def agent(n: int) -> None:
            nonlocal retries
            me = bus.session(agent=f"worker-{n}")

            async def step(tx: oribus.Transaction, key: str) -> None:
                nonlocal retries
                retries += 1
                item = await tx.get(key)
                tx.put(key, item.value + 1)

            for i in range(steps):
                key = f"fleet/counter/{(n + i) % 4}"
                await me.run(lambda tx, key=key: step(tx, key))
                retries -= 1

        t0 = time.perf_counter()
        await asyncio.gather(*(agent(n) for n in range(agents)))
        dt = time.perf_counter() - t0
        counters = await bus.get_many([f"fleet/counter/{i}" for i in range(4)])
        total = sum(i.value for i in counters.values())
        print(f"{agents * steps} transactions in {dt:.2f}s ({agents * steps / dt:.0f}/s, fsync on), "
              f"{retries} retried after a conflict")
        print(f"sum of counters = {total} (expected {agents * steps}): "
              + ("no lost update" if total == agents * steps else "LOST UPDATES"))
        if total != agents * steps:
            return 1
        await bus.get("team/plan")
        before = bus.session_ref
        before_tokens = dict(bus._tokens)  # the client-side state a surviving client keeps

    _say("3. restart: acknowledged commits survive, old sessions fail closed")
    async with oribus.open_local(data_dir, shards=shards, agent="planner") as bus:
        counters = await bus.get_many([f"fleet/counter/{i}" for i in range(4)])
        print(f"after reopen, sum of counters = {sum(i.value for i in counters.values())}")
        old = bus.session(agent=before.agent, session_id=before.session_id)
        old._tokens.update(before_tokens)
        try:
            await old.commit({"team/plan": {"steps": ["rewrite"]}})
            print("a session whose reads were lost committed: NOT fail closed")
            return 1
        except oribus.SessionExpired as e:
            print(f"pre-restart session refused: SessionExpired ({e.message[:70]}...)")

        _say("4. rollback and history")
        await bus.get("team/plan")
        await bus.commit({"team/plan": {"steps": ["oops"]}})
        hist = await bus.history("team/plan", limit=5)
        for v in hist:
            print(f"  v{v.version} by {v.agent}: {v.value}")
        new = await bus.rollback({"team/plan": hist[1].version})
        item = await bus.get("team/plan")
        print(f"rolled back to v{hist[1].version}'s value as v{new['team/plan']}: {item.value}")
    print("\ndemo finished: every check passed")
    return 0
