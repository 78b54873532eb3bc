"""The child process of the replica group crash test: a group of three members in this process.

Usage::

    python tests/crash/replica_workload.py ROOT JOURNAL SEED [--hits-out FILE]

Members ``ROOT/member-{0,1,2}`` reach each other through a ``DirectNetwork``; the group's
term register (etcd's, in a real group) is the file ``ROOT/term``, replaced atomically and
fsynced before a term is used. The run goes through what replication does to the disks:

1. member 0 is elected (term 1) and takes commits;
2. member 0 is cut off with commits in flight (its divergent tail); member 1 or 2 is elected
   (term 2); the network heals, member 0 is deposed and cuts its tail;
3. commits on the new primary, then a snapshot (tiny segments and snapshot interval);
4. a follower (member 2, or 1 if 2 is primary) loses its directory and restarts as a learner: it installs the snapshot, catches
   up, becomes a voter; more commits.

The parent arms one failpoint through ``ORIBUS_FAILPOINTS`` (``replica.before_truncate=kill@1``,
``wal.after_fsync=kill@40``, ...), so the process SIGKILLs itself there, every member at once.

Journal (one JSON line per event, O_APPEND, one write each)::

    {"ev": "invoke", "id": ID, "key": KEY}        before the commit is sent
    {"ev": "ok", "id": ID, "key": KEY, "value": V} after it is acknowledged
    {"ev": "fail", "id": ID}                       it failed (outcome unknown)
    {"ev": "done"}                                 the run ended and every member closed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
from pathlib import Path

import msgpack

from oribus import failpoints
from oribus.errors import Unavailable
from oribus.messages import ShardTxn
from oribus.shards.config import ShardConfig
from oribus.shards.replica import DirectNetwork, ReplicaMember, ReplicationOptions
from oribus.shards.shard import Shard
from oribus.shards.wal import WalConfig
from oribus.types import SessionRef

REPLICAS = 3
OPTIONS = ReplicationOptions(heartbeat_seconds=0.01, retry_min_seconds=0.002, retry_max_seconds=0.02)
SESSION = SessionRef("worker", "s")


def member_config(root: Path, i: int) -> ShardConfig:
    return ShardConfig(shard_id=0, data_dir=root / f"member-{i}", read_lease_seconds=0.02,
                       clock_skew_seconds=0.0, snapshot_every_records=40, wal=WalConfig(segment_bytes=1024))


def read_term(root: Path) -> int:
    path = root / "term"
    return int(path.read_text()) if path.exists() else 0


def write_term(root: Path, term: int) -> None:
    tmp = root / "term.tmp"
    with open(tmp, "w") as f:
        f.write(str(term))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "term")
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def open_member(root: Path, i: int, net: DirectNetwork) -> ReplicaMember:
    m = await ReplicaMember.open(root / f"member-{i}", 0, i, REPLICAS, config=member_config(root, i),
                                 term_register=read_term(root), options=OPTIONS)
    net.add(m)
    return m


async def elect(root: Path, members: dict[int, ReplicaMember], net: DirectNetwork,
                candidate: int) -> tuple[int, Shard]:
    """§5 of specs/replication.md: a new term in the register, promises, the most complete wins."""
    term = read_term(root) + 1
    write_term(root, term)
    granted = {}
    for i in sorted(members):
        try:
            peer = net.peers(candidate, [i])
            reply = await (members[i].promise(term, candidate) if i == candidate else peer[0].promise(term, candidate))
        except Unavailable:
            continue
        if reply.granted:
            granted[i] = reply.last
    if len(granted) <= REPLICAS // 2:
        raise Unavailable(f"no majority of promises for term {term}: {granted}")
    winner = max(granted, key=lambda i: (granted[i], -i))
    becoming = asyncio.ensure_future(members[winner].become_primary(term, net.peers(winner, list(range(REPLICAS)))))
    done, _ = await asyncio.wait([becoming], timeout=10)
    if not done:
        # what each member looked like when the term's start was still not on a majority
        states = {i: m.status() for i, m in members.items()}
        becoming.cancel()
        await asyncio.gather(becoming, return_exceptions=True)
        raise TimeoutError(f"member {winner} did not become primary of term {term} within 10 s "
                           f"(promises {granted}); members: {states}")
    return winner, becoming.result()


class Journal:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, **event: object) -> None:
        os.write(self.fd, (json.dumps(event) + "\n").encode())


async def commit(shard: Shard, journal: Journal, cid: str, key: str, value: int) -> None:
    journal.write(ev="invoke", id=cid, key=key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            await shard.commit_one_phase(ShardTxn(txn_id=cid, session=SESSION, writes={key: msgpack.packb(value)}))
            journal.write(ev="ok", id=cid, key=key, value=value)
            return
        except Unavailable:
            if loop.time() > deadline:
                journal.write(ev="fail", id=cid)
                raise
            await asyncio.sleep(0.01)  # the new primary's restart grace


async def until(check, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise TimeoutError("the group did not get there")
        await asyncio.sleep(0.005)


async def run(root: Path, journal: Journal, seed: int) -> None:
    rng = random.Random(seed)
    net = DirectNetwork()
    members = {i: await open_member(root, i, net) for i in range(REPLICAS)}
    n = 0

    async def commits(shard: Shard, count: int) -> None:
        nonlocal n
        for _ in range(count):
            await commit(shard, journal, f"s{seed}-{n}", f"k{n}", n)
            n += 1

    _, shard = await elect(root, members, net, 0)
    await commits(shard, rng.randint(10, 20))

    net.isolate(0)
    stuck = []
    for i in range(3):
        journal.write(ev="invoke", id=f"s{seed}-lost{i}", key=f"lost{i}")
        stuck.append(asyncio.ensure_future(shard.commit_one_phase(
            ShardTxn(txn_id=f"s{seed}-lost{i}", session=SESSION, writes={f"lost{i}": msgpack.packb(i)}))))
    await asyncio.sleep(0.05)
    _, shard = await elect(root, members, net, rng.choice([1, 2]))
    net.heal()
    for i, t in enumerate(stuck):
        try:
            await asyncio.wait_for(t, 10)
            journal.write(ev="ok", id=f"s{seed}-lost{i}", key=f"lost{i}", value=i)
        except Unavailable:
            journal.write(ev="fail", id=f"s{seed}-lost{i}")
    await until(lambda: members[0].role == "follower" and members[0].counters["truncated_records"] > 0)
    await commits(shard, rng.randint(20, 40))
    await shard.snapshot()

    lost = next(i for i in (2, 1) if not members[i].is_primary)
    net.remove(lost)
    await members.pop(lost).close()
    shutil.rmtree(root / f"member-{lost}")
    members[lost] = await open_member(root, lost, net)
    await until(lambda: members[lost].voter)
    await commits(shard, rng.randint(10, 20))
    for m in members.values():
        await m.close()
    journal.write(ev="done")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("journal")
    parser.add_argument("seed", type=int)
    parser.add_argument("--hits-out")
    args = parser.parse_args()
    if args.hits_out:
        failpoints.trace()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(root, Journal(Path(args.journal)), args.seed))
    if args.hits_out:
        Path(args.hits_out).write_text(json.dumps(failpoints.hits(), sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
