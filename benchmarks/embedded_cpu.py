"""CPU per committed agent-step of the embedded engine: a fixed number of steps, one process.

The agent-step of ``agent_step.py`` (32 workers, each a session; read 3 of 1000 keys with one
``get_many``, write one of them, commit; a refused step is counted and not retried), fsync on,
uvloop, run for ``--steps`` committed steps; prints the process's CPU time per committed step
(``time.process_time``: robust to other work on the machine, unlike the rate, which it prints
too). ``--profile`` runs it under cProfile and prints the top functions by own time.

Usage::

    .venv/bin/python benchmarks/embedded_cpu.py [--steps 20000] [--runs 3] [--profile] [--history-store memory lmdb]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time

import uvloop

import oribus
from oribus import Conflict

KEYS = 1000
WORKERS = 32


async def run(steps: int, profile: bool, history_store: str = "memory") -> tuple[float, float, int]:
    d = tempfile.mkdtemp(prefix="oribus-cpu-")
    bus = await oribus.open_local(d, agent="loader", history_store=history_store)
    try:
        keys = [f"k/{i}" for i in range(KEYS)]
        for i in range(0, KEYS, 100):
            await bus.commit({k: {"n": 0} for k in keys[i:i + 100]})
        done = conflicts = 0

        async def worker(n: int) -> None:
            nonlocal done, conflicts
            session = bus.session(agent=f"agent-{n}")
            rng = random.Random(n)
            while done < steps:
                chosen = rng.sample(keys, 3)
                tx = session.transaction()
                try:
                    items = await tx.get_many(chosen)
                    tx.put(chosen[0], {"n": items[chosen[0]].value["n"] + 1, "by": session.agent})
                    await tx.commit()
                    done += 1
                except Conflict:
                    conflicts += 1

        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
        await asyncio.gather(*(worker(i) for i in range(WORKERS)))
        if profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        return cpu / done * 1e6, done / wall, conflicts
    finally:
        await bus.close()
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--history-store", nargs="+", default=["memory"], choices=("memory", "lmdb"),
                    help="where older versions live; several: runs alternate between them")
    args = ap.parse_args()
    for _ in range(args.runs):
        for store in args.history_store:
            cpu, rate, conflicts = uvloop.run(run(args.steps, args.profile, store))
            print(f"{store:6} {args.steps} steps, {conflicts} conflicts: {cpu:.1f} us CPU per step, "
                  f"{rate:,.0f} steps/s")


if __name__ == "__main__":
    main()
