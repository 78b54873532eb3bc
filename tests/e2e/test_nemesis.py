"""Real processes under a nemesis: an etcd-registered cluster (3 shards, 1 bus) while clients run.

The nemesis kill -9s and restarts, or SIGSTOPs and SIGCONTs, shard and bus
processes at random (seeded) while clients run the agent-step workload (read 3
keys, write one of them with its counter + 1 and a new key recording the step,
often on another shard, commit only if all 3 are unchanged) and the list-append workload (recorded as a history for the
checker). Then every fault heals and the final state is checked:

- agent-step: every kept version of every key holds the counter ``version - 1``
  (a stale commit would repeat or skip a counter: a lost update), every
  acknowledged commit id is in its key's history exactly once, no refused id
  is, and ids whose outcome the client could not know appear at most once;
  every acknowledgement named the new versions of both keys it wrote;
- list-append: ``oribus.checker.check`` over the recorded history and the
  final state (serializability cycles, atomicity, durability, idempotency,
  version order, and ``incomplete-result``: an acknowledged commit that named
  the new versions of only some of the keys it wrote) finds nothing.

Bounded here (``NEMESIS_SECONDS``); ``make soak`` runs the same for longer.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter

from nemesis import Nemesis, record_final_once_resolved
from processes import cluster_bus, cluster_shard, run_cli

import oribus
from oribus import Conflict, OribusError, SessionExpired

SHARDS = 3
KEYS = 48
CLIENTS = 6
NEMESIS_SECONDS = float(os.environ.get("ORIBUS_NEMESIS_SECONDS", "20"))


async def start_cluster(cluster, tmp_path, etcd):
    assert run_cli("cluster", "init", "--etcd", etcd.url, "--shards", str(SHARDS)).returncode == 0
    shards = [cluster.add(cluster_shard(tmp_path, etcd.url, i)).start() for i in range(SHARDS)]
    for s in shards:
        await asyncio.to_thread(s.wait_serving)
    bus = cluster.add(cluster_bus(tmp_path, etcd.url, http=False)).start()
    await asyncio.to_thread(bus.wait_serving)
    return shards, bus


class AgentStep:
    """The agent-step clients and what they were told."""

    def __init__(self, address: str, keys: list[str], seed: int) -> None:
        self.address = address
        self.keys = keys
        self.seed = seed
        self.acked_ids: dict[str, str] = {}  # acknowledged commit id -> the key it wrote
        self.refused: set[str] = set()
        self.unknown: set[str] = set()
        self.unreported: list[str] = []  # acknowledged commits whose answer lacked a written key
        self.outcomes: Counter[str] = Counter()
        self.stop = asyncio.Event()

    async def client(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        async with oribus.connect(self.address, agent=f"step-{n}") as s:
            steps = 0
            while not self.stop.is_set():
                steps += 1
                picks = rng.sample(self.keys, 3)
                record = f"nem-step/{n}/{steps}"
                tx = s.transaction()
                try:
                    items = await tx.get_many(picks)
                    counter = items[picks[0]].value["n"] + 1
                    tx.put(picks[0], {"n": counter})
                    tx.put(record, {"key": picks[0], "n": counter})
                    versions = await tx.commit()
                except Conflict:
                    self.refused.add(tx.commit_id)
                    self.outcomes["conflict"] += 1
                    continue
                except SessionExpired:
                    self.refused.add(tx.commit_id)  # refused before anything was applied
                    self.outcomes["session_expired"] += 1
                    await _quietly(s.reset_session())
                    continue
                except OribusError as e:
                    self.unknown.add(tx.commit_id)  # Unavailable mid-commit: may or may not be applied
                    self.outcomes[type(e).__name__] += 1
                    await asyncio.sleep(0.1)
                    continue
                self.acked_ids[tx.commit_id] = picks[0]
                if picks[0] not in versions or record not in versions:
                    self.unreported.append(f"{tx.commit_id} wrote {picks[0]} and {record}, "
                                           f"acknowledged with {versions}")
                self.outcomes["ok"] += 1

    async def audit(self, populate_ids: set[str]) -> list[str]:
        problems = []
        async with oribus.connect(self.address, agent="auditor") as s:
            seen: Counter[str] = Counter()
            for k in self.keys:
                history = await s.history(k)
                current = history[0].version
                assert len(history) == current, f"{k}: history truncated; raise the limit or lower the load"
                for depth, e in enumerate(history):
                    if e.version != current - depth:
                        problems.append(f"{k}: versions not consecutive at {e.version}")
                    if not isinstance(e.value, dict) or e.value.get("n") != e.version - 1:
                        problems.append(f"{k}: version {e.version} holds {e.value!r}: a lost update")
                    seen[e.commit_id] += 1
                    if e.commit_id in self.refused:
                        problems.append(f"{k}: refused commit {e.commit_id} is in the history")
                    elif (e.commit_id not in self.acked_ids and e.commit_id not in self.unknown
                          and e.commit_id not in populate_ids):
                        problems.append(f"{k}: version {e.version} by unknown commit {e.commit_id}")
            for cid, key in self.acked_ids.items():
                if seen[cid] != 1:
                    problems.append(f"acknowledged commit {cid} on {key} appears {seen[cid]} times")
            problems += [f"commit {cid} applied {n} times" for cid, n in seen.items() if n > 1]
        return problems


async def _quietly(coro) -> None:
    try:
        await coro
    except OribusError:
        pass


async def test_agent_step_under_kills_and_pauses(cluster, tmp_path, etcd):
    shards, bus = await start_cluster(cluster, tmp_path, etcd)
    keys = [f"nem/k{i}" for i in range(KEYS)]
    async with oribus.connect(bus.address, agent="loader") as loader:
        populate_ids = set()
        for k in keys:
            tx = loader.transaction()
            tx.put(k, {"n": 0})
            await tx.commit()
            populate_ids.add(tx.commit_id)
    work = AgentStep(bus.address, keys, seed=7)
    clients = [asyncio.create_task(work.client(n)) for n in range(CLIENTS)]
    nemesis = Nemesis({s.name: s for s in [*shards, bus]}, seed=11, max_down=2.5)
    try:
        await nemesis.run(NEMESIS_SECONDS)
        await nemesis.heal()
        await asyncio.sleep(3)  # clients commit again on the healed cluster
    finally:
        work.stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
    problems = await work.audit(populate_ids)
    kills = sum(1 for e in nemesis.events if e.fault == "kill")
    pauses = sum(1 for e in nemesis.events if e.fault == "pause")
    print(f"\nnemesis: {kills} kills, {pauses} pauses in {NEMESIS_SECONDS:.0f}s; client outcomes "
          f"{dict(work.outcomes)}; {len(work.acked_ids)} acknowledged, {len(work.unknown)} unknown")
    assert problems == [], "\n".join(problems[:20])
    assert work.unreported == [], work.unreported[:20]
    assert nemesis.faults >= 3, nemesis.events
    assert work.outcomes["ok"] > 50, work.outcomes
    assert sum(v for k, v in work.outcomes.items() if k not in ("ok", "conflict")) > 0, (
        "the clients never noticed a fault")


async def test_list_append_under_kills_and_pauses_is_serializable(cluster, tmp_path, etcd):
    from oribus.checker import Recorder, check
    from oribus.checker.listappend import run_list_append

    shards, bus = await start_cluster(cluster, tmp_path, etcd)
    recorder = Recorder()
    conns = [oribus.connect(bus.address, agent=f"la-{i}") for i in range(CLIENTS)]
    nemesis = Nemesis({s.name: s for s in [*shards, bus]}, seed=23, max_down=2.5)
    try:
        workload = asyncio.create_task(run_list_append(
            conns, recorder, duration=NEMESIS_SECONDS + 4, keys=12, seed=5, pause_after_failure=0.05))
        await nemesis.run(NEMESIS_SECONDS)
        await nemesis.heal()
        outcomes = await workload
        recorder.dump(tmp_path / "history-before-final.jsonl")  # checkable even if the final read fails
        async with oribus.connect(bus.address, agent="final") as reader:
            # A transaction whose coordinator died mid-2PC keeps its keys locked until the
            # bus's recovery sweep resolves it through the primary (after the prepared-txn
            # expiry): reads of those keys answer Unavailable meanwhile.
            await record_final_once_resolved(reader, recorder, keys=12)
    finally:
        for c in conns:
            await c.close()
    history = tmp_path / "history.jsonl"
    recorder.dump(history)
    report = check(recorder.events)
    print(f"\nlist-append under nemesis: {outcomes}, {nemesis.faults} faults; "
          f"{report.summary().splitlines()[0]}; history in {history}")
    assert report.ok, report.summary()
    assert outcomes["ok"] > 50 and nemesis.faults >= 3
    assert outcomes["info"] + outcomes["fail"] > 0, "the clients never noticed a fault"
    # the command line agrees (a 30-minute soak's history is hundreds of MB: reading and
    # checking it takes minutes, so the bound grows with the run)
    r = run_cli("check", str(history), timeout=60 + 2 * NEMESIS_SECONDS)
    assert r.returncode == 0, r.stdout + r.stderr
