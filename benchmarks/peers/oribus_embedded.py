"""oribus embedded: ``oribus.open_local`` in the harness's own process and event loop.

No server process and no network hop: the engine (bus + ``shards`` shards,
1 by default, as ``open_local`` creates) runs on the event loop the clients run on, so its CPU is shared
with them, as it would be inside an agent runtime. ``reset`` closes the
engine and opens a new one on an empty data directory.

Durability: the engine's defaults — every commit's WAL record is fsynced
(group commit) before the commit is acknowledged; ``unsafe_no_fsync`` stays
False and is read back from the engine's configuration.

The step: ``tx = session.transaction()``, ``tx.get_many(reads)`` (one call),
``tx.put`` per written key, ``tx.commit()``; ``Conflict`` (``Aborted``
included) is a conflict. A session per agent (``bus.session(agent=...)``),
shared by the workers; ``touch`` makes a session live with a session-scope
read, so the live-sessions sweep measures real delivery-log entries.

``unsafe_blind_write`` reads outside the transaction and commits blind
writes: the audit must then find lost updates (for the harness's own test).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import oribus
from oribus import AsyncSession, Conflict
from peers.base import Backend, Client, Outcome, padding

POPULATE_BATCH = 1000  # keys per commit ...
BATCH_BYTES = 8 << 20  # ... and per audit read, at most this much value data (gRPC messages are bounded)
POPULATE_IN_FLIGHT = 4
READ_BATCH = 10000  # keys per audit read (the bus's limit per request)
AUDIT_KEYS_PER_SESSION = 50000  # deliveries per auditor session (below the per-session limit)


class OribusClient(Client):
    """A worker on an oribus bus (embedded or remote): sessions come from ``sessions``."""

    def __init__(self, sessions: SessionPool, unsafe_blind_write: bool = False) -> None:
        self.sessions = sessions
        self.unsafe_blind_write = unsafe_blind_write

    async def step(self, read_keys: Sequence[str], write_keys: Sequence[str], session: int) -> Outcome:
        s = self.sessions.get(session)
        tx = s.transaction()
        if self.unsafe_blind_write:
            items = await s.get_many(read_keys)  # not the transaction's read: its writes are blind
            await asyncio.sleep(0)
        else:
            items = await tx.get_many(read_keys)
        seen = {k: items[k].value["n"] for k in read_keys}
        written = {}
        for k in write_keys:
            written[k] = seen[k] + 1
            tx.put(k, {"n": written[k], "pad": items[k].value["pad"]})
        sent = time.perf_counter()
        try:
            await tx.commit()
        except Conflict:  # Aborted included: nothing applied
            return Outcome(False, seen, {}, sent)
        return Outcome(True, seen, written, sent)

    async def read(self, keys: Sequence[str], session: int) -> dict[str, int]:
        items = await self.sessions.get(session).transaction().get_many(keys)
        return {k: items[k].value["n"] for k in keys}

    async def touch(self, session: int, key: str) -> None:
        await self.sessions.get(session).get(key)


class SessionPool:
    """One ``AsyncSession`` per agent index, made on first use from ``root``."""

    def __init__(self, root: AsyncSession) -> None:
        self.root = root
        self.sessions: dict[int, AsyncSession] = {}

    def get(self, index: int) -> AsyncSession:
        s = self.sessions.get(index)
        if s is None:
            s = self.sessions[index] = self.root.session(agent=f"agent-{index}")
        return s


def keys_per_batch(limit: int, value_size: int) -> int:
    return max(1, min(limit, BATCH_BYTES // (value_size + 64)))


async def populate_bus(bus: AsyncSession, keys: Sequence[str], value_size: int) -> int:
    """Write every key; returns the keys per read batch the audit should use."""
    value: dict[str, Any] = {"n": 0, "pad": padding(value_size)}
    sem = asyncio.Semaphore(POPULATE_IN_FLIGHT)
    per = keys_per_batch(POPULATE_BATCH, value_size)

    async def commit(start: int) -> None:
        # A session of its own per batch, reset afterwards: a session's own commits count as
        # its reads, so one loader session would re-validate (and keep a delivery for) every
        # key it wrote before, making the load quadratic in the number of keys.
        async with sem:
            loader = bus.session(agent=f"loader-{start}")
            await loader.commit(dict.fromkeys(keys[start:start + per], value))
            await loader.reset_session()

    await asyncio.gather(*(commit(i) for i in range(0, len(keys), per)))
    return keys_per_batch(READ_BATCH, value_size)


async def read_bus_counters(bus: AsyncSession, keys: Sequence[str], per_read: int) -> list[int | None]:
    out: list[int | None] = []
    for start in range(0, len(keys), AUDIT_KEYS_PER_SESSION):
        auditor = bus.session(agent=f"auditor-{start}")
        part = keys[start:start + AUDIT_KEYS_PER_SESSION]
        for i in range(0, len(part), per_read):
            chunk = part[i:i + per_read]
            items = await auditor.get_many(chunk)
            for k in chunk:
                v = items[k].value
                out.append(v["n"] if isinstance(v, dict) else None)
    return out


async def fsyncs_of_one_commit(bus: AsyncSession) -> int:
    """WAL fsyncs (all shards) that one probe commit caused: durability read back, not assumed."""

    def fsyncs(stats: dict) -> int:
        return sum(int((s.get("wal") or {}).get("fsyncs", 0)) for s in stats["shards"])

    before = fsyncs(await bus.stats())
    await bus.session(agent="probe").commit({"bench/probe": 1})
    return fsyncs(await bus.stats()) - before


MECHANISM = "transaction: get_many(reads), put, commit (Conflict = conflict)"
FSYNC = "WAL group commit, fsync before the commit is acknowledged"


class OribusBackend(Backend):
    """What every oribus row shares: a bus session (``bus``) opened per generation on a
    fresh data directory, populated, audited and driven through the same client; the
    rows differ in ``_open`` / ``_close`` (in this process, or a server to connect to)."""

    peer = False

    def __init__(self, name: str, shards: int) -> None:
        self.name = name
        self.shards = shards
        self.durable = True
        self.work = Path()
        self.generation = 0
        self.bus: AsyncSession | None = None
        self.pool: SessionPool | None = None
        self.read_batch = READ_BATCH

    @property
    def data_dir(self) -> Path:
        return self.work / f"data-{self.generation}"

    async def _open(self) -> AsyncSession:
        raise NotImplementedError

    async def _close(self) -> None:
        """After the session is closed: stop whatever served it."""

    async def start(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        await self._next_generation()

    async def _next_generation(self) -> None:
        self.generation += 1
        self.bus = await self._open()
        self.pool = SessionPool(self.bus)

    async def stop(self) -> None:
        if self.bus is not None:
            await self.bus.close()
            self.bus = None
        await self._close()

    async def reset(self) -> None:
        await self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        await self._next_generation()

    async def populate(self, keys: Sequence[str], value_size: int) -> None:
        self.read_batch = await populate_bus(self.bus, keys, value_size)

    async def client(self) -> Client:
        return OribusClient(self.pool)

    async def read_counters(self, keys: Sequence[str]) -> list[int | None]:
        return await read_bus_counters(self.bus, keys, self.read_batch)

    async def _durability(self, unsafe_no_fsync: bool) -> dict:
        return {"unsafe_no_fsync": unsafe_no_fsync,
                "wal_fsyncs_for_one_commit": await fsyncs_of_one_commit(self.bus), "fsync": FSYNC}


class OribusEmbedded(OribusBackend):
    def __init__(self, shards: int = 1, *, unsafe_blind_write: bool = False) -> None:
        super().__init__("oribus-embedded" + ("-blind" if unsafe_blind_write else ""), shards)
        self.unsafe_blind_write = unsafe_blind_write

    async def _open(self) -> AsyncSession:
        return await oribus.open_local(self.data_dir, shards=self.shards, agent="loader")

    async def client(self) -> Client:
        return OribusClient(self.pool, self.unsafe_blind_write)

    async def describe(self) -> dict:
        engine = self.bus._owner  # noqa: SLF001 - the engine behind open_local, for its config
        cfg = engine.config
        return {
            "version": f"oribus {oribus.__version__}",
            "mechanism": MECHANISM + (" -- BLIND WRITES (broken on purpose)" if self.unsafe_blind_write else ""),
            "durability": await self._durability(cfg.unsafe_no_fsync),
            "shards": cfg.shards,
            "durable": not cfg.unsafe_no_fsync,
            "client": "in-process (open_local), engine on the clients' event loop",
        }
