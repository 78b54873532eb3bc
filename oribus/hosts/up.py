"""A whole oribus on one machine: what ``oribus up`` runs.

Two ways to host the shards:

* in-process (default): the embedded engine (no network hop between bus and
  shards) with the client-facing gRPC service in front of it;
* ``processes=True``: each shard is its own ``oribus shard`` process on a free
  port, and the bus reaches them over gRPC — the cluster layout on one box.

Either way the data directory has the embedded layout (``layout.json`` and
``shard-NNNN/``), so one can switch between the two. In both, this process holds
the data directory's lock (``DATA/LOCK``); with processes each shard process
holds its own ``shard-NNNN/LOCK``, and dies with this one (``oribus.lifeline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from oribus.bus.bus import Bus
from oribus.bus.session_journal import SessionJournal
from oribus.bus.sweep import TxnSweep
from oribus.datadir_lock import DataDirLock
from oribus.errors import InvalidRequest, Unavailable
from oribus.gateway import GatewayConfig, HttpGateway
from oribus.hosts.embedded import (
    DEFAULT_SHARDS,
    EmbeddedEngine,
    EngineConfig,
    check_layout,
    stored_shards,
)
from oribus.hosts.lifecycle import stop_signal_event
from oribus.lifeline import ParentLifeline
from oribus.meta.slots import StaticSlotMap
from oribus.rpc.bus_server import BusServer
from oribus.rpc.shard_client import GrpcShardClient
from oribus.tls import TlsConfig, channel_credentials, server_credentials

log = logging.getLogger("oribus.cluster")


def process_shards() -> int:
    """Shard processes of a new data directory under ``up --processes``: one per core."""
    return os.cpu_count() or 2


class UpHost:
    """Bus + N shards on this machine. ``await start()``, ``await stop()``."""

    def __init__(self, data_dir: Path, *, listen: str = "127.0.0.1:7700", shards: int | None = None,
                 processes: bool = False, start_timeout: float = 30.0,
                 http: GatewayConfig | None = None, tls: TlsConfig | None = None, **engine_options) -> None:
        if shards is None:
            # a new directory: one in-process shard, or one shard process per core
            shards = stored_shards(Path(data_dir)) or (process_shards() if processes else DEFAULT_SHARDS)
        self.config = EngineConfig(data_dir=Path(data_dir), shards=shards, **engine_options)
        self.listen = listen
        # mutual TLS on every gRPC listener (bus, shard processes) and bus→shard client
        self.tls = tls
        if tls is not None and processes and tls.directory is None:
            raise InvalidRequest("shard processes take their TLS files as a directory: use TlsConfig.from_dir")
        self.http_config = http  # None: no HTTP gateway
        self.gateway: HttpGateway | None = None
        self._journal: SessionJournal | None = None
        self.processes = processes
        self.start_timeout = start_timeout
        self.engine: EmbeddedEngine | None = None
        self.server: BusServer | None = None
        self.shard_procs: dict[int, subprocess.Popen] = {}
        self._dir_lock: DataDirLock | None = None  # DATA/LOCK with processes (the engine takes it otherwise)
        self._lifeline: ParentLifeline | None = None  # shard processes stop when its write end closes
        self.shard_addresses: dict[int, str] = {}
        self._clients: list[GrpcShardClient] = []

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    async def start(self) -> None:
        """Start the shards and the bus; on failure, stop whatever was started (no orphan shards)."""
        if self.tls is not None:  # bad TLS files: refuse before starting anything, naming the file
            server_credentials(self.tls)
            if self.processes:
                channel_credentials(self.tls)
        try:
            if self.processes:
                bus, sweep = await self._start_processes()
            else:
                self.engine = await EmbeddedEngine.open(self.config)
                bus, sweep = self.engine.bus, None  # the engine runs its own sweep
            # HTTP first: the gRPC health service says SERVING once the server starts, and
            # what waits for it (process supervisors, tests) may then use the HTTP port too.
            if self.http_config is not None:
                self.gateway = HttpGateway(bus, replace(self.http_config, history_limit=self.config.history_limit))
                await self.gateway.start()
            self.server = BusServer(bus, self.listen, sweep=sweep, tls=self.tls)
            await self.server.start()
        except BaseException:
            await self.stop()
            raise

    def shard_command(self, shard_id: int, ready_file: Path, listen: str = "127.0.0.1:0",
                      parent_fd: int | None = None) -> list[str]:
        tls = ["--tls-dir", str(self.tls.directory)] if self.tls is not None else []
        allow_empty = ["--allow-empty"] if self.config.unsafe_allow_empty else []
        lifeline = ["--parent-fd", str(parent_fd)] if parent_fd is not None else []
        # the bus and every shard process read this machine's one clock: no skew (§5.8)
        leases = ["--read-lease", repr(self.config.read_lease_seconds),
                  "--clock-skew", repr(self.config.clock_skew_seconds)]
        return [
            sys.executable, "-m", "oribus.cli", "shard",
            "--id", str(shard_id),
            "--data-dir", str(self.config.shard_config(shard_id).data_dir),
            "--listen", listen,
            "--ready-file", str(ready_file),
            *tls,
            *allow_empty,
            *leases,
            *lifeline,
        ]

    def spawn_shard(self, shard_id: int, listen: str = "127.0.0.1:0") -> subprocess.Popen:
        """Start shard ``shard_id``'s process; it dies with this one (``oribus.lifeline``).

        Call it from a thread that lives as long as the shard should (the event loop's):
        the kernel's parent-death signal fires when the thread that forked the child ends.
        """
        ready = self.config.data_dir / f".shard-{shard_id}.addr"
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        if self._lifeline is None:
            self._lifeline = ParentLifeline()
        fd = self._lifeline.child_fd
        proc = subprocess.Popen(self.shard_command(shard_id, ready, listen, parent_fd=fd),
                                stdout=subprocess.DEVNULL, pass_fds=(fd,))
        self.shard_procs[shard_id] = proc
        return proc

    async def wait_ready(self, shard_id: int) -> str:
        ready = self.config.data_dir / f".shard-{shard_id}.addr"
        deadline = time.monotonic() + self.start_timeout
        proc = self.shard_procs[shard_id]
        while not ready.exists():
            if proc.poll() is not None:
                raise Unavailable(f"shard {shard_id} process exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise Unavailable(f"shard {shard_id} did not start within {self.start_timeout}s")
            await asyncio.sleep(0.05)
        addr = ready.read_text().strip()
        self.shard_addresses[shard_id] = addr
        return addr

    async def _start_processes(self) -> tuple[Bus, TxnSweep]:
        loop = asyncio.get_running_loop()
        # DATA/LOCK only: each shard process locks its own shard-NNNN/ (this process must not)
        self._dir_lock = await loop.run_in_executor(None, DataDirLock.acquire, self.config.data_dir)
        await loop.run_in_executor(None, check_layout, self.config)
        for i in range(self.config.shards):
            self.spawn_shard(i)
        shards = {}
        for i in range(self.config.shards):
            client = GrpcShardClient(i, await self.wait_ready(i), tls=self.tls)
            self._clients.append(client)
            shards[i] = client
        slot_map = StaticSlotMap(self.config.shards)
        self._journal = await SessionJournal.open(self.config.session_journal_dir,
                                                  unsafe_no_fsync=self.config.unsafe_no_fsync)
        bus = Bus(shards, slot_map.shard_for, max_value_bytes=self.config.max_value_bytes,
                  session_journal=self._journal)
        sweep = TxnSweep(bus, txn_expiry_seconds=self.config.txn_expiry_seconds,
                            interval=self.config.maintenance_interval)
        return bus, sweep

    async def stop(self) -> None:
        """Drain the bus, flush and close the shards (SIGTERM to shard processes). Idempotent."""
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
        for c in self._clients:
            await c.close()
        self._clients.clear()
        if self.engine is not None:
            await self.engine.close()
            self.engine = None
        if self._journal is not None:
            await self._journal.close()
            self._journal = None
        for proc in self.shard_procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.shard_procs.values():
            try:
                await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.shard_procs.clear()
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        if self._dir_lock is not None:
            self._dir_lock.release()
            self._dir_lock = None


async def run_until_signalled(cluster: UpHost) -> None:
    stop = stop_signal_event()
    starting = asyncio.get_running_loop().create_task(cluster.start())
    stopping = asyncio.get_running_loop().create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal during start-up: let the start finish, then stop cleanly
        with contextlib.suppress(Exception):
            await starting
        await cluster.stop()
        return
    stopping.cancel()
    starting.result()  # a failed start raises here (it already stopped what it started)
    n = cluster.config.shards
    if cluster.processes:
        mode = "shard process" if n == 1 else "shard processes"
    else:
        mode = "in-process shard" if n == 1 else "in-process shards"
    http = f", http on {cluster.gateway.url}" if cluster.gateway is not None else ""
    print(f"oribus up: bus on {cluster.address}{http}, {n} {mode}, "
          f"data in {cluster.config.data_dir} (pid {os.getpid()})", flush=True)
    await stop.wait()
    print("oribus up: shutting down (draining, flushing)", flush=True)
    await cluster.stop()
