"""``python -m oribus.sim``: the soak run — many seeds, random fault schedules, every history checked.

    python -m oribus.sim --seeds 200 --duration 5          # seeds 0..199, 5 virtual seconds each
    python -m oribus.sim --seed 17 --faults 8 -v           # replay one seed (same flags, same run)
    python -m oribus.sim --seeds 100 --replicas 3          # every shard a replica group of 3
    python -m oribus.sim --seeds 40 --replicas 3 --history-store lmdb   # members keep history on disk

Each seed draws its own fault schedule (``random_faults``) and workload
parameters, runs the whole cluster (``simulate``) and checks the history. The
totals are printed at the end; the exit status is 1 if any run found an
anomaly, left a transaction unresolved, or got stuck (a seed whose simulated
loop livelocks or stalls is reported as failing, and the soak goes on). Set ``PYTHONHASHSEED``
to replay a seed in another process exactly (see ``oribus.sim.loop``).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from collections import Counter

from oribus.sim import SimConfig, SimResult, random_faults, simulate
from oribus.sim.disk import DiskConfig
from oribus.sim.loop import SimulationLivelock, SimulationStalled
from oribus.sim.network import ALL_OPS


def config_for(seed: int, duration: float) -> SimConfig:
    """Workload and storage parameters drawn from the seed (so a seed names a whole run)."""
    rng = random.Random(f"oribus-sim/{seed}/config")
    return SimConfig(
        shards=rng.choice((2, 3, 4)),
        list_clients=rng.choice((2, 4, 6)),
        register_clients=rng.choice((0, 1, 2)),
        list_keys=rng.choice((3, 6, 10)),
        duration=duration,
        snapshot_every_records=rng.choice((1 << 40, 1 << 40, 25, 100)),
        disk=DiskConfig(),
    )


def run_seed(seed: int, duration: float, faults: int | None, *, duplicate_all: bool = False,
             no_restart_grace: bool = False, replicas: int = 1, elect_any: bool = False,
             ack_on_local_fsync: bool = False, history_store: str = "memory") -> SimResult:
    rng = random.Random(f"oribus-sim/{seed}/faults")
    config = config_for(seed, duration)
    config.history_store = history_store
    if duplicate_all:
        config.network.duplicate_ops = ALL_OPS
    config.unsafe_no_restart_grace = no_restart_grace
    config.replicas = replicas
    config.unsafe_elect_any = elect_any
    config.unsafe_ack_on_local_fsync = ack_on_local_fsync
    count = rng.randint(0, max(1, int(duration * 3))) if faults is None else faults
    return simulate(seed, config, random_faults(rng, config, count))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oribus.sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20, help="how many seeds to run (default 20)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--seed", type=int, help="run this one seed only")
    p.add_argument("--duration", type=float, default=3.0, help="virtual seconds of workload per seed (default 3)")
    p.add_argument("--faults", type=int, help="faults per seed (default: random, about 3 per virtual second)")
    p.add_argument("--max-wall", type=float, help="stop starting new seeds after this many wall-clock seconds")
    p.add_argument("--duplicate-all", action="store_true",
                   help="also duplicate reads, forgets and resets (see network.AT_MOST_ONCE_OPS)")
    p.add_argument("--unsafe-no-restart-grace", action="store_true",
                   help="BROKEN on purpose: restarted shards take writes at once, though they lost the read "
                        "leases they had granted (some seeds should then fail)")
    p.add_argument("--replicas", type=int, default=1, choices=(1, 3, 5),
                   help="members per shard: 3 or 5 makes every shard a replica group (oribus.sim.group)")
    p.add_argument("--history-store", choices=("memory", "lmdb"), default="memory",
                   help="where shards keep older versions: lmdb is the simulated on-disk engine "
                        "(oribus.sim.history; with --replicas, each member's own, shipped at catch-up)")
    p.add_argument("--unsafe-elect-any", action="store_true",
                   help="BROKEN on purpose (with --replicas): a candidate takes over though another member "
                        "holds a later log position")
    p.add_argument("--unsafe-ack-on-local-fsync", action="store_true",
                   help="BROKEN on purpose (with --replicas): a primary acknowledges once its own fsync returns")
    p.add_argument("-v", "--verbose", action="store_true", help="print every run's summary")
    args = p.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") is None:
        # Fix string hashing so that a seed printed here replays in any other process
        # (see oribus.sim.loop): start over with PYTHONHASHSEED=0.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, "-m", "oribus.sim", *(sys.argv[1:] if argv is None else argv)], env)
    logging.basicConfig(level=logging.ERROR)  # the engine logs expected trouble (crashes) as warnings

    seeds = [args.seed] if args.seed is not None else range(args.first_seed, args.first_seed + args.seeds)
    started = time.monotonic()
    totals = {"runs": 0, "transactions": 0, "committed_checked": 0, "faults": 0, "crashes": 0,
              "reader_crashes": 0, "bus_crashes": 0, "lost_records": 0, "messages": 0, "lost": 0, "duplicated": 0,
              "virtual_seconds": 0.0, "primaries": 0, "member_crashes": 0, "disk_losses": 0,
              "lost_acknowledged": 0, "engine_installs": 0, "snapshot_chunks": 0, "catchups_cut": 0,
              "history_versions_lost": 0}
    kinds: Counter[str] = Counter()
    failed: list[int] = []
    for seed in seeds:
        if args.max_wall is not None and time.monotonic() - started > args.max_wall:
            break
        try:
            result = run_seed(seed, args.duration, args.faults, duplicate_all=args.duplicate_all,
                              no_restart_grace=args.unsafe_no_restart_grace, replicas=args.replicas,
                              elect_any=args.unsafe_elect_any, ack_on_local_fsync=args.unsafe_ack_on_local_fsync,
                              history_store=args.history_store)
        except (SimulationLivelock, SimulationStalled) as e:  # a liveness bug: this seed fails, the soak goes on
            totals["runs"] += 1
            print(f"seed {seed}: {type(e).__name__}: {e}", flush=True)
            failed.append(seed)
            continue
        totals["runs"] += 1
        totals["lost_acknowledged"] += len(result.lost_acknowledged)
        kinds.update(result.counters["faults_by_kind"])
        for k in totals:
            if k not in ("runs", "lost_acknowledged"):
                totals[k] += result.counters.get(k, 0)
        if args.verbose or not result.ok:
            print(result.summary(), flush=True)
            if not result.ok:
                print("  faults: " + "; ".join(f.describe() for f in result.faults), flush=True)
        if not result.ok:
            failed.append(seed)
    wall = time.monotonic() - started
    print(
        f"oribus.sim: {totals['runs']} runs, {totals['transactions']} transactions "
        f"({totals['committed_checked']} committed and checked), {totals['faults']} faults injected "
        f"({totals['crashes']} shard crashes, {totals['reader_crashes']} of them while a commit in flight "
        f"relied on the shard's read lease, {totals['bus_crashes']} bus crashes, {totals['lost_records']} "
        f"unsynced WAL records lost), {totals['messages']} messages ({totals['lost']} lost, "
        f"{totals['duplicated']} duplicated), {totals['virtual_seconds']:.0f} virtual s in {wall:.1f} s; "
        f"{len(failed)} failing seeds{': ' + ', '.join(map(str, failed)) if failed else ''}"
    )
    print(f"faults by kind: {dict(sorted(kinds.items()))}")
    if args.replicas > 1:
        print(f"replica groups of {args.replicas}: {totals['primaries']} primaries elected (first ones included), "
              f"{totals['member_crashes']} member crashes, {totals['disk_losses']} disks lost, "
              f"{totals['lost_acknowledged']} acknowledged commits lost")
        if args.history_store != "memory":
            print(f"history on the members' disks ({args.history_store}): {totals['engine_installs']} catch-ups "
                  f"installed an engine copy, {totals['catchups_cut']} catch-ups cut mid-transfer and started "
                  f"over, {totals['snapshot_chunks']} catch-up chunks delivered, {totals['history_versions_lost']} "
                  f"unsynced engine records lost by crashes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
