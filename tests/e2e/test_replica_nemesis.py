"""Replica groups under a nemesis of their own faults, while list-append clients run; ``oribus check``.

Two shards, each a group of three members, and a bus. One fault at a time, on a random group
(seeded), for ``NEMESIS_SECONDS``:

- ``kill-primary-wipe``: kill -9 of the group's primary **with its data directory deleted**,
  then the member started again (empty: it rejoins as a learner and catches up) — only when
  every member of the group is a complete voter, so that no more than a minority is ever
  lost (two lost disks of three is more than a group survives, by design);
- ``kill-primary``: kill -9 of the primary, restarted on its data;
- ``pause-primary``: SIGSTOP of the primary for longer than its lease, then SIGCONT (a new
  primary took over meanwhile; the old one must acknowledge nothing);
- ``kill-follower``: kill -9 of a follower, restarted a moment later.

The list-append workload spans both shards (two-phase commits between two groups). After the
faults heal, the recorded history and the final state go through the checker: 0 anomalies,
no acknowledged append lost.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time

from nemesis import record_final_once_resolved
from processes import run_cli
from replica_group import LEASE_TTL, ReplicaGroup

import oribus

NEMESIS_SECONDS = float(os.environ.get("ORIBUS_NEMESIS_SECONDS", "20"))
CLIENTS = 4
KEYS = 8


class ReplicaNemesis:
    def __init__(self, group: ReplicaGroup, seed: int) -> None:
        self.group = group
        self.rng = random.Random(seed)
        self.events: list[tuple[float, str, int, int]] = []  # (at, fault, shard, member)
        self._t0 = time.monotonic()

    def _log(self, fault: str, shard: int, member: int) -> None:
        self.events.append((round(time.monotonic() - self._t0, 2), fault, shard, member))

    async def _all_complete(self, shard: int) -> bool:
        statuses = [await self.group.status(m, shard) for m in range(self.group.replicas)]
        if any(s is None or not s.voter for s in statuses):
            return False
        primary = await self.group.primary(shard)
        lead = statuses[primary.member] if primary is not None else None
        return lead is not None and all(s is not None and s.last[1] >= lead.commit_lsn for s in statuses)

    async def run(self, duration: float) -> None:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5))
            shard = self.rng.randrange(self.group.shards)
            procs = self.group.groups[shard]
            primary = await self.group.primary(shard)
            if primary is None:
                continue  # an election is under way: let it finish
            fault = self.rng.choice(["kill-primary-wipe", "kill-primary", "pause-primary", "kill-follower"])
            if fault == "kill-primary-wipe" and not await self._all_complete(shard):
                fault = "kill-primary"
            if fault == "kill-follower":
                member = self.rng.choice([m for m in range(self.group.replicas) if m != primary.member])
            else:
                member = primary.member
            proc = procs[member]
            self._log(fault, shard, member)
            if fault == "pause-primary":
                proc.pause()
                await asyncio.sleep(LEASE_TTL + self.rng.uniform(0.5, 1.5))
                proc.resume()
                continue
            await asyncio.to_thread(proc.kill9)
            if fault == "kill-primary-wipe":
                shutil.rmtree(self.group.data_dir(member, shard), ignore_errors=True)
            await asyncio.sleep(self.rng.uniform(0.2, 1.5))
            proc.start()

    async def heal(self, timeout: float = 60.0) -> None:
        everyone = [p for procs in self.group.groups for p in procs]
        for p in everyone:
            p.resume()
        for p in everyone:
            if not p.running:
                p.start()
        for p in everyone:
            await asyncio.to_thread(p.wait_serving, timeout)
        for shard in range(self.group.shards):
            await self.group.wait_primary(shard=shard, timeout=timeout)


async def test_list_append_across_replica_groups_under_their_faults_is_serializable(cluster, tmp_path, etcd):
    from oribus.checker import Recorder, check
    from oribus.checker.listappend import run_list_append

    group = await ReplicaGroup(cluster, tmp_path, etcd.url, shards=2).start()
    assert group.bus is not None
    recorder = Recorder()
    conns = [oribus.connect(group.bus.address, agent=f"la-{i}") for i in range(CLIENTS)]
    nemesis = ReplicaNemesis(group, seed=31)
    try:
        workload = asyncio.create_task(run_list_append(
            conns, recorder, duration=NEMESIS_SECONDS + 4, keys=KEYS, seed=9, pause_after_failure=0.05))
        await nemesis.run(NEMESIS_SECONDS)
        await nemesis.heal()
        outcomes = await workload
        recorder.dump(tmp_path / "history-before-final.jsonl")
        async with oribus.connect(group.bus.address, agent="final") as reader:
            await record_final_once_resolved(reader, recorder, keys=KEYS)
    finally:
        for c in conns:
            await c.close()
    history = tmp_path / "history.jsonl"
    recorder.dump(history)
    report = check(recorder.events)
    faults = [e[1] for e in nemesis.events]
    print(f"\nlist-append across replica groups: {outcomes}; faults {faults}; "
          f"{report.summary().splitlines()[0]}; history in {history}")
    assert report.ok, report.summary()
    assert len(faults) >= 3, nemesis.events  # a fault is skipped while an election is under way
    assert outcomes["ok"] > 50, outcomes
    r = run_cli("check", str(history), timeout=60 + 2 * NEMESIS_SECONDS)
    assert r.returncode == 0, r.stdout + r.stderr
