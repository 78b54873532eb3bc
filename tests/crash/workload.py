"""The child process of the crash tests: a seeded workload on the embedded engine.

Usage::

    python tests/crash/workload.py DATA_DIR JOURNAL SEED SHARDS [--hits-out FILE]

It opens ``oribus.open_local(DATA_DIR, shards=SHARDS, ...)`` with tiny
snapshot and segment sizes, so snapshots and segment rollovers happen many
times during the run, and runs a deterministic mix of commits from a few
concurrent workers: single-key puts, multi-key commits spread over several
shards (two-phase commits), transactions with reads, session-scope
read-modify-writes, deletes and rollbacks. The parent arms one failpoint
through ``ORIBUS_FAILPOINTS`` (e.g. ``txn.after_decide=kill@7``), so the
process SIGKILLs itself at an exact place; run unarmed it exits 0.

Journal
-------
Every commit has an id known before it is sent (``s{seed}-w{worker}-{op}``)
and every value it writes embeds that id (``{"c": commit_id, "n": op}``).
One JSON line per event is appended to JOURNAL, which is opened with
O_APPEND and written with a single ``os.write`` per line: a SIGKILL cannot
take back what the page cache already holds, so the journal is exactly what
the process did up to the kill::

    {"ev": "invoke", "id": ID, "kind": KIND, "keys": [...], "rollback": {key: version}, "t": TIME}
        written before the commit is sent; "keys" are every key it writes, "t" the
        wall clock then (no commit of it can be older)
    {"ev": "ok", "id": ID, "versions": {key: version}, "session": [agent, session_id],
     "tokens": {shard: [epoch, incarnation]}}
        written after the commit is acknowledged
    {"ev": "fail", "id": ID, "code": ERROR_CODE, "definite": bool}
        the commit was refused; "definite" is False only when its outcome is
        unknown (Unavailable), True when it certainly wrote nothing
    {"ev": "read_fail", "id": ID, "code": ERROR_CODE}
        the reads before a commit failed, so it was never sent (no invoke)
    {"ev": "done"}
        the workload ended and the engine was closed cleanly

The parent may run the workload again on the same directory and journal
with another seed (new commit ids): the journal then holds both runs.

With ``--hits-out FILE`` the run also counts every failpoint hit and writes
the counts as JSON to FILE at the end; the parent uses a calibration run to
spread the armed hit counts over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import oribus
from oribus import failpoints
from oribus.meta.slots import StaticSlotMap

HISTORY_STORE_ENV = "ORIBUS_CRASH_HISTORY_STORE"  # the workload's and the checker's history_store
# Seconds: the workload's shards drop versions older than this in the background (the age
# rule's compaction, which test_history_crash_points.py kills); unset: no age limit.
HISTORY_MAX_AGE_ENV = "ORIBUS_CRASH_HISTORY_MAX_AGE"

# Engine settings shared with the checker, which must reopen the data
# directory exactly as the workload opened it.
ENGINE_OPTIONS: dict[str, Any] = {
    "snapshot_every_records": 40,  # a snapshot every 40 WAL records per shard
    "segment_bytes": 4096,  # a new WAL segment every ~4 KiB
    # where older versions live (test_history_crash_points.py sweeps "lmdb")
    "history_store": os.environ.get(HISTORY_STORE_ENV, "memory"),
}
if os.environ.get(HISTORY_MAX_AGE_ENV):
    ENGINE_OPTIONS["history_max_age"] = float(os.environ[HISTORY_MAX_AGE_ENV])
    # a step every 5 ms: many compactions in a run of a second or so
    ENGINE_OPTIONS["shard_overrides"] = {"history_compaction_interval": 0.005}

KEYS = [f"crash/k{i:02d}" for i in range(24)]
WORKERS = 4
OPS_PER_WORKER = 40

# Share of each kind of operation (they add up to 100).
MIX = (
    ("put", 28),  # one key, blind write: a one-phase commit
    ("multi", 26),  # 2..4 keys on different shards: a two-phase commit
    ("txn", 18),  # a transaction that reads keys, then writes
    ("rmw", 8),  # session scope: read keys, then commit writes to some of them
    ("delete", 10),  # delete one or two keys
    ("rollback", 10),  # roll one or two keys back to a version in their history
)


class Journal:
    """Appends one JSON line per event with a single write (survives SIGKILL)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def event(self, ev: str, **fields: Any) -> None:
        line = json.dumps({"ev": ev, **fields}, separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())

    def close(self) -> None:
        os.close(self._fd)


def session_tokens(session: oribus.AsyncSession) -> dict[str, list[int]]:
    """The per-shard tokens this session presents at its next commit.

    Not part of the public API: they are journaled so that the checker can
    act as a client that outlived the crash and present them to the
    restarted engine, which must answer SessionExpired.
    """
    return {str(shard): list(token) for shard, token in session._tokens.items()}


class Worker:
    """One agent of the workload, with a session per style so one style's reads never stale another's.

    ``blind`` never reads (multi-key writes, deletes, rollbacks), ``tx``
    runs transactions (transaction scope), ``rmw`` reads in session scope
    and forgets its reads after each attempt; each put uses a fresh session.
    """

    def __init__(self, index: int, seed: int, root: oribus.AsyncSession, journal: Journal,
                 slot_map: StaticSlotMap) -> None:
        self.index = index
        self.seed = seed
        self.rng = random.Random(f"{seed}/{index}")
        self.journal = journal
        self.slot_map = slot_map
        agent = f"worker-{index}"
        self.blind = root.session(agent=agent, session_id=f"{seed}-{index}-blind")
        self.tx = root.session(agent=agent, session_id=f"{seed}-{index}-tx")
        self.rmw = root.session(agent=agent, session_id=f"{seed}-{index}-rmw")

    def commit_id(self, op: int) -> str:
        return f"s{self.seed}-w{self.index}-{op:03d}"

    def spread_keys(self, count: int) -> list[str]:
        """``count`` keys on as many different shards as possible (a multi-shard commit)."""
        by_shard: dict[int, list[str]] = {}
        for k in KEYS:
            by_shard.setdefault(self.slot_map.shard_for(k), []).append(k)
        shards = list(by_shard)
        self.rng.shuffle(shards)
        chosen: list[str] = []
        while len(chosen) < count:
            for s in shards:
                free = [k for k in by_shard[s] if k not in chosen]
                if free and len(chosen) < count:
                    chosen.append(self.rng.choice(free))
        return sorted(chosen)

    async def run(self) -> None:
        kinds = [k for k, _ in MIX]
        weights = [w for _, w in MIX]
        for op in range(OPS_PER_WORKER):
            kind = self.rng.choices(kinds, weights)[0]
            await getattr(self, f"op_{kind}")(op, self.commit_id(op))
            if self.rng.random() < 0.3:
                await asyncio.sleep(0)  # let the other workers interleave differently

    async def attempt(
        self,
        session: oribus.AsyncSession,
        cid: str,
        kind: str,
        keys: list[str],
        send: Callable[[], Awaitable[dict[str, int]]],
        rollback: dict[str, int] | None = None,
    ) -> None:
        """Journal the invocation, run ``send()`` and journal its outcome."""
        self.journal.event("invoke", id=cid, kind=kind, keys=sorted(keys), rollback=rollback or {},
                           t=time.time())
        try:
            versions = await send()
        except oribus.OribusError as e:
            definite = not isinstance(e, oribus.Unavailable)
            self.journal.event("fail", id=cid, code=e.code, definite=definite)
            return
        self.journal.event(
            "ok", id=cid, versions=versions, session=list(session.session_ref), tokens=session_tokens(session)
        )

    async def blind_attempt(
        self,
        cid: str,
        kind: str,
        keys: list[str],
        send: Callable[[], Awaitable[dict[str, int]]],
        rollback: dict[str, int] | None = None,
    ) -> None:
        """``attempt`` on the blind session, which then forgets the keys it wrote.

        A successful commit records the new versions as deliveries to the
        session (its own writes are what it last saw), so without ``forget``
        its next write would depend on them and fail once another worker
        overwrote one.
        """
        await self.attempt(self.blind, cid, kind, keys, send, rollback)
        await self.blind.forget(keys)

    async def op_put(self, op: int, cid: str) -> None:
        # A fresh session per put: it has no tokens on other shards, so the
        # commit stays on the key's own shard (a one-phase commit).
        key = self.rng.choice(KEYS)
        once = self.blind.session(session_id=cid)

        async def send() -> dict[str, int]:
            return await once.commit({key: {"c": cid, "n": op}}, commit_id=cid)

        await self.attempt(once, cid, "put", [key], send)

    async def op_multi(self, op: int, cid: str) -> None:
        keys = self.spread_keys(self.rng.randint(2, 4))

        async def send() -> dict[str, int]:
            return await self.blind.commit({k: {"c": cid, "n": op, "part": i} for i, k in enumerate(keys)},
                                           commit_id=cid)

        await self.blind_attempt(cid, "multi", keys, send)

    async def op_delete(self, op: int, cid: str) -> None:
        keys = self.spread_keys(self.rng.randint(1, 2))

        async def send() -> dict[str, int]:
            return await self.blind.commit({k: oribus.DELETE for k in keys}, commit_id=cid)

        await self.blind_attempt(cid, "delete", keys, send)

    async def op_rollback(self, op: int, cid: str) -> None:
        keys = self.spread_keys(self.rng.randint(1, 2))
        targets: dict[str, int] = {}
        for k in keys:
            history = await self.blind.history(k)  # not a delivery: the session stays blind
            targets[k] = self.rng.choice([0, *(v.version for v in history)])

        async def send() -> dict[str, int]:
            return await self.blind.rollback(targets, commit_id=cid)

        await self.blind_attempt(cid, "rollback", keys, send, rollback=targets)

    async def op_txn(self, op: int, cid: str) -> None:
        reads = self.spread_keys(self.rng.randint(1, 3))
        writes = set(self.rng.sample(reads, self.rng.randint(1, len(reads))))
        writes.update(self.spread_keys(self.rng.randint(0, 2)))
        tx = self.tx.transaction()
        tx.commit_id = cid
        try:
            seen = await tx.get_many(reads)
        except oribus.OribusError as e:  # e.g. a read that waited too long on a lock
            self.journal.event("read_fail", id=cid, code=e.code)
            return
        total = sum(i.value.get("n", 0) for i in seen.values() if isinstance(i.value, dict))
        for k in sorted(writes):
            tx.put(k, {"c": cid, "n": op, "sum": total})
        await self.attempt(self.tx, cid, "txn", sorted(writes), tx.commit)

    async def op_rmw(self, op: int, cid: str) -> None:
        reads = self.spread_keys(self.rng.randint(1, 3))
        try:
            await self.rmw.get_many(reads)
        except oribus.OribusError as e:
            self.journal.event("read_fail", id=cid, code=e.code)
            return
        writes = sorted(self.rng.sample(reads, self.rng.randint(1, len(reads))))

        async def send() -> dict[str, int]:
            return await self.rmw.commit({k: {"c": cid, "n": op} for k in writes}, commit_id=cid)

        await self.attempt(self.rmw, cid, "rmw", writes, send)
        # Session scope keeps every read until forgotten; drop them so the next
        # attempt depends only on what it reads itself.
        await self.rmw.forget(reads)


async def run_workload(data_dir: Path, journal_path: str, seed: int, shards: int) -> None:
    journal = Journal(journal_path)
    try:
        async with oribus.open_local(data_dir, shards=shards, agent="workload", **ENGINE_OPTIONS) as root:
            slot_map = StaticSlotMap(shards)
            workers = [Worker(i, seed, root, journal, slot_map) for i in range(WORKERS)]
            await asyncio.gather(*(w.run() for w in workers))
        journal.event("done")
    finally:
        journal.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("journal")
    parser.add_argument("seed", type=int)
    parser.add_argument("shards", type=int)
    parser.add_argument("--hits-out", help="write every failpoint's hit count as JSON to this file")
    args = parser.parse_args(argv)
    if args.hits_out:
        failpoints.trace()
    asyncio.run(run_workload(args.data_dir, args.journal, args.seed, args.shards))
    if args.hits_out:
        Path(args.hits_out).write_text(json.dumps(failpoints.hits(), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
