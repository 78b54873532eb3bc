"""oribus over the network: ``oribus up`` (bus + in-process shards) or ``oribus up --processes``.

The server is a real ``python -m oribus.cli up`` subprocess on a free
loopback port, with ``--shards`` shards (1, 2 shard processes) and its data in the
run's directory; with ``processes=True`` every shard is its own process and
the bus reaches it over gRPC (2PC between processes). It is started through
``agent_step_network.Server``, which waits until the server both answers and
has installed its signal handlers, and stops the whole process group.
``reset`` stops it and starts a new one on an empty data directory.

Durability: the defaults of ``oribus up`` — WAL group commit, fsync before
a commit is acknowledged; no ``unsafe`` option exists on that command line
(the command is recorded in the results).

The clients: one ``oribus.connect`` for all workers (the SDK multiplexes
every session's calls over one gRPC stream, in batches); one session per
agent index. The step is the embedded one (``OribusClient``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import oribus
from oribus import AsyncSession
from peers.base import Backend, Client
from peers.oribus_embedded import (
    READ_BATCH,
    OribusClient,
    SessionPool,
    fsyncs_of_one_commit,
    populate_bus,
    read_bus_counters,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent_step_network import Server  # noqa: E402 - benchmarks/ is on the path


class OribusServer(Backend):
    peer = False

    def __init__(self, processes: bool = False, shards: int = 1) -> None:
        self.processes = processes
        self.shards = shards
        self.name = "oribus-procs" if processes else "oribus-up"
        self.durable = True
        self.work = Path()
        self.generation = 0
        self.server: Server | None = None
        self.conn: AsyncSession | None = None
        self.pool: SessionPool | None = None
        self.read_batch = READ_BATCH

    async def start(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        await self._run_server()

    async def _run_server(self) -> None:
        self.generation += 1
        self.server = Server(self.work / f"data-{self.generation}", self.shards, self.processes,
                             self.work / "server.log")
        await self.server.start()
        self.conn = oribus.connect(self.server.address, agent="loader")
        self.pool = SessionPool(self.conn)

    async def stop(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
        if self.server is not None:
            code = await self.server.stop()
            if code not in (0, None):
                raise RuntimeError(f"{self.name} exited with {code} on SIGTERM:\n{self.server.log_tail()}")
            self.server = None

    async def reset(self) -> None:
        await self.stop()
        import shutil

        shutil.rmtree(self.work / f"data-{self.generation}", ignore_errors=True)
        await self._run_server()

    async def populate(self, keys: Sequence[str], value_size: int) -> None:
        self.read_batch = await populate_bus(self.conn, keys, value_size)

    async def client(self) -> Client:
        return OribusClient(self.pool)

    async def read_counters(self, keys: Sequence[str]) -> list[int | None]:
        return await read_bus_counters(self.conn, keys, self.read_batch)

    async def describe(self) -> dict:
        return {
            "version": f"oribus {oribus.__version__}",
            "mechanism": "transaction: get_many(reads), put, commit (Conflict = conflict)",
            "durability": {"unsafe_no_fsync": "unsafe" in " ".join(self.server.command()),
                           "wal_fsyncs_for_one_commit": await fsyncs_of_one_commit(self.conn),
                           "fsync": "WAL group commit, fsync before the commit is acknowledged"},
            "shards": self.shards,
            "shard_processes": self.processes,
            "durable": True,
            "command": " ".join(self.server.command()[1:]),
            "client": "oribus.connect (gRPC), one connection multiplexing every worker's sessions",
        }
