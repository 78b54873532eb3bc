"""oribus over the network: ``oribus up`` (bus + in-process shards) or ``oribus up --processes``
(``replicas=3``: ``--replicas 3``, every shard a group of three member processes whose
commits wait for a majority's fsync; ``history_store="lmdb"``: ``--history-store lmdb``, the
kept versions on disk instead of in memory).

The server is a real ``python -m oribus.cli up`` subprocess on a free
loopback port, with ``--shards`` shards (1, 2 shard processes) and its data in the
run's directory; with ``processes=True`` every shard is its own process and
the bus reaches it over the stream transport (2PC between processes). It is started through
``agent_step_network.Server``, which waits until the server both answers and
has installed its signal handlers, and stops the whole process group.
``reset`` stops it and starts a new one on an empty data directory.

Durability: the defaults of ``oribus up`` — WAL group commit, fsync before
a commit is acknowledged; no ``unsafe`` option exists on that command line
(the command is recorded in the results).

The clients: one ``oribus.connect`` for all workers (the SDK multiplexes
every session's calls over one connection, in batches: the bus's stream
transport, which the SDK switches to by default, or with ``transport="grpc"``
(the ``-grpc`` rows) one gRPC stream); one session per agent index. The step
is the embedded one (``OribusClient``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import oribus
from oribus import AsyncSession
from peers.oribus_embedded import MECHANISM, OribusBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent_step_network import Server  # noqa: E402 - benchmarks/ is on the path


class OribusServer(OribusBackend):
    def __init__(self, processes: bool = False, shards: int = 1, transport: str = "auto", replicas: int = 1,
                 history_store: str | None = None) -> None:
        name = ("oribus-procs" if processes else "oribus-up") + (f"-r{replicas}" if replicas > 1 else "")
        name += f"-{history_store}" if history_store else ""
        super().__init__(name if transport == "auto" else f"{name}-{transport}", shards)
        self.processes = processes
        self.replicas = replicas
        self.history_store = history_store
        self.transport = transport
        self.server: Server | None = None

    async def _open(self) -> AsyncSession:
        self.server = Server(self.data_dir, self.shards, self.processes, self.work / "server.log",
                             replicas=self.replicas, history_store=self.history_store)
        await self.server.start()
        return oribus.connect(self.server.address, agent="loader", transport=self.transport)

    async def _close(self) -> None:
        if self.server is not None:
            code = await self.server.stop()
            if code not in (0, None):
                raise RuntimeError(f"{self.name} exited with {code} on SIGTERM:\n{self.server.log_tail()}")
            self.server = None

    def _transport_used(self) -> str:
        """What the SDK's calls went over ("stream" or "grpc"), as the client reports it."""
        remote = getattr(self.bus, "_bus", None)
        return str(getattr(remote, "using", self.transport))

    async def describe(self) -> dict:
        return {
            "version": f"oribus {oribus.__version__}",
            "mechanism": MECHANISM,
            "durability": await self._durability("unsafe" in " ".join(self.server.command())),
            "shards": self.shards,
            "shard_processes": self.processes,
            "replicas": self.replicas,
            "durable": True,
            "command": " ".join(self.server.command()[1:]),
            "client": f"oribus.connect ({self._transport_used()}), one connection multiplexing every worker's "
                      "sessions",
        }
