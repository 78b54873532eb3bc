"""A whole oribus on one machine: what ``oribus up`` runs.

Two ways to host the shards:

* in-process (default): the embedded engine (no network hop between bus and
  shards) with the client-facing gRPC service in front of it;
* ``processes=True``: each shard is its own ``oribus shard`` process on free
  ports, and the bus reaches them over the stream transport (``shard_transport``
  "grpc": over gRPC) — the cluster layout on one box.

Either way the data directory has the embedded layout (``layout.json`` and
``shard-NNNN/``), so one can switch between the two.

``processes=True, replicas=R`` (3 or 5): each shard is a replica group of ``R`` member
processes (``oribus.hosts.up_groups``: its own layout under ``DATA/groups/``), elected
through etcd — the one given, else a private one this process starts — and restarted when
they die; the bus follows the groups' primaries through etcd as a cluster bus does
(``oribus.meta.directory``). In both, this process holds
the data directory's lock (``DATA/LOCK``); with processes each shard process
holds its own ``shard-NNNN/LOCK``, and dies with this one (``oribus.lifeline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from oribus.auth import Authority
from oribus.bus.bus import Bus
from oribus.bus.guarded import GuardedBus
from oribus.bus.session_journal import SessionJournal
from oribus.bus.sweep import TxnSweep
from oribus.datadir_lock import DataDirLock
from oribus.errors import InvalidRequest, OribusError, Unavailable
from oribus.gateway import GatewayConfig, HttpGateway
from oribus.hosts.auth_follower import AuthFollower
from oribus.hosts.embedded import (
    DEFAULT_SHARDS,
    EmbeddedEngine,
    EngineConfig,
    check_layout,
    stored_shards,
)
from oribus.hosts.exposure import warn_unauthenticated
from oribus.hosts.lifecycle import Teardown, stop_signal_event
from oribus.hosts.shard import stream_listen_address
from oribus.hosts.up_groups import (
    ETCD_DIR,
    GroupSupervisor,
    PrivateEtcd,
    check_groups_layout,
    stored_groups,
    wait_for_voters,
)
from oribus.lifeline import ParentLifeline
from oribus.meta.auth_store import EtcdAuthStore
from oribus.meta.cluster_meta import DEFAULT_LEASE_TTL, ClusterConfig, ShardRecord
from oribus.meta.directory import ShardDirectory
from oribus.meta.etcd import DEFAULT_CLUSTER, EtcdMeta
from oribus.meta.groups import EtcdGroups, check_replicas
from oribus.meta.slots import StaticSlotMap
from oribus.rpc import wire
from oribus.rpc.bus_server import BusServer
from oribus.rpc.replica_client import StreamPeer
from oribus.rpc.shard_client import DEFAULT_TRANSPORT, RemoteShardClient, shard_client
from oribus.tls import TlsConfig, channel_credentials, server_credentials

log = logging.getLogger("oribus.cluster")

SHARD_STOP_SECONDS = 15.0  # a shard process has this long to drain and flush after SIGTERM, then it is killed


def process_shards() -> int:
    """Shard processes of a new data directory under ``up --processes``: one per core."""
    return os.cpu_count() or 2


class UpHost:
    """Bus + N shards on this machine. ``await start()``, ``await stop()``."""

    def __init__(self, data_dir: Path, *, listen: str = wire.DEFAULT_BUS_ADDRESS, shards: int | None = None,
                 processes: bool = False, start_timeout: float = 30.0,
                 http: GatewayConfig | None = None, tls: TlsConfig | None = None,
                 shard_transport: str = DEFAULT_TRANSPORT, stream_listen: str | None = None,
                 authority: Authority | None = None,
                 replicas: int | None = None, etcd: str | None = None, lease_ttl: int = DEFAULT_LEASE_TTL,
                 cluster_name: str = DEFAULT_CLUSTER, **engine_options: Any) -> None:
        groups = stored_groups(Path(data_dir))
        if replicas is None:
            replicas = groups[1] if groups is not None else 1
        check_replicas(replicas)
        if replicas > 1 and not processes:
            raise InvalidRequest("replica groups run as processes: add --processes")
        if shards is None and groups is not None:
            shards = groups[0]
        if shards is None:
            # a new directory: one in-process shard, or one shard process per core
            shards = stored_shards(Path(data_dir)) or (process_shards() if processes else DEFAULT_SHARDS)
        self.config = EngineConfig(data_dir=Path(data_dir), shards=shards, **engine_options)
        self.listen = listen
        # the clients' stream listener: a free port on the host of listen unless told ('off': none)
        self.stream_listen = stream_listen_address(listen, stream_listen, None, None)
        # mutual TLS on every gRPC listener (bus, shard processes) and bus→shard client
        self.tls = tls
        if tls is not None and processes and tls.directory is None:
            raise InvalidRequest("shard processes take their TLS files as a directory: use TlsConfig.from_dir")
        self.http_config = http  # None: no HTTP gateway
        self.authority = authority  # --auth: credentials and access rules on every transport
        self.gateway: HttpGateway | None = None
        self.processes = processes
        self.shard_transport = shard_transport  # with processes: how the bus calls them ("stream" or "grpc")
        self.start_timeout = start_timeout
        self.replicas = replicas  # > 1: every shard is a replica group of this many member processes
        self.etcd = etcd  # the etcd of the groups (None: a private one, started by this process)
        self.lease_ttl = lease_ttl
        self.cluster_name = cluster_name
        # without an etcd, a private one (no etcd binary: refused here, before anything starts)
        self.private_etcd = (PrivateEtcd(Path(data_dir) / ETCD_DIR) if replicas > 1 and etcd is None
                             else None)
        self.groups: GroupSupervisor | None = None
        self.meta: EtcdMeta | None = None
        self.engine: EmbeddedEngine | None = None
        self.server: BusServer | None = None
        self.shard_procs: dict[int, subprocess.Popen] = {}
        self._lifeline: ParentLifeline | None = None  # shard processes stop when its write end closes
        self.shard_addresses: dict[int, str] = {}  # gRPC listeners of the shard processes
        self.shard_streams: dict[int, str] = {}  # their stream listeners
        self._socket_dir: Path | None = None  # where their Unix sockets are
        # what start() started, stopped in reverse by stop(); with processes it holds DATA/LOCK
        # (the engine takes it otherwise)
        self._teardown = Teardown(log)

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
        async with self._teardown.stop_on_error():
            if self.processes and self.replicas > 1:
                bus, sweep = await self._start_groups()
                if self.authority is not None and self.meta is not None:  # cluster mode: etcd's rules once pushed
                    follower = AuthFollower(EtcdAuthStore(self.meta), None, self.authority)
                    self.authority = await follower.start()
                    self._teardown.push("auth follower", follower.stop)
            elif self.processes:
                bus, sweep = await self._start_processes()
            else:
                self.engine = await EmbeddedEngine.open(self.config)
                self._teardown.push("embedded engine", self.engine.close)
                bus, sweep = self.engine.bus, None  # the engine runs its own sweep
            # HTTP first: the gRPC health service says SERVING once the server starts, and
            # what waits for it (process supervisors, tests) may then use the HTTP port too.
            # --auth: one guard for every transport (one record of each session's owner)
            guarded = GuardedBus(bus, self.authority) if self.authority is not None else None
            if self.http_config is not None:
                self.gateway = HttpGateway(bus, replace(self.http_config, history_limit=self.config.history_limit),
                                           guarded=guarded)
                await self.gateway.start()
                self._teardown.push("HTTP gateway", self.gateway.stop)
            self.server = BusServer(bus, self.listen, tls=self.tls, stream_listen=self.stream_listen,
                                    guarded=guarded)
            await self.server.start()
            if self.authority is None:
                warn_unauthenticated([self.server.address, self.server.stream_address,
                                      self.gateway.address if self.gateway is not None else ""])
            self._teardown.push("gRPC server", self.server.stop, graceful=True)
            if sweep is not None:  # in the background: serving does not wait for it
                self._teardown.push_task("transaction sweep", asyncio.create_task(sweep.run_forever()))

    def _socket_directory(self) -> Path:
        """The private directory (mode 0700: this user only) of the shard processes' sockets,
        made once and removed by the teardown after the processes it is pushed before."""
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="oribus-"))
            self._teardown.push("shard sockets' directory",
                                lambda: shutil.rmtree(self._socket_dir or "", ignore_errors=True))
        return self._socket_dir

    def shard_socket(self, shard_id: int) -> str:
        """Where shard ``shard_id``'s process serves the stream transport: a Unix-domain socket
        (same machine: cheaper than TCP over loopback)."""
        return f"unix:{self._socket_directory() / f'shard-{shard_id}.sock'}"

    def retention_flags(self) -> list[str]:
        """What every shard process keeps of each key's versions: this host's own retention."""
        max_age = self.config.history_max_age_seconds
        return ["--history-versions", str(self.config.history_limit),
                *(["--history-max-age", repr(max_age)] if max_age is not None else [])]

    def shard_command(self, shard_id: int, ready_file: Path, listen: str = "127.0.0.1:0",
                      parent_fd: int | None = None) -> list[str]:
        tls = ["--tls-dir", str(self.tls.directory)] if self.tls is not None else []
        allow_empty = ["--allow-empty"] if self.config.unsafe_allow_empty else []
        history = ["--history-store", self.config.history_store, *self.retention_flags()]
        lifeline = ["--parent-fd", str(parent_fd)] if parent_fd is not None else []
        # the bus and every shard process read this machine's one clock: no skew (§5.8)
        leases = ["--read-lease", repr(self.config.read_lease_seconds),
                  "--clock-skew", repr(self.config.clock_skew_seconds)]
        stream = ["--stream-listen", self.shard_socket(shard_id) if self.shard_transport == "stream" else "off"]
        return [
            sys.executable, "-m", "oribus.cli", "shard",
            "--id", str(shard_id),
            "--data-dir", str(self.config.shard_config(shard_id).data_dir),
            "--listen", listen,
            *stream,
            "--ready-file", str(ready_file),
            *tls,
            *allow_empty,
            *history,
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
            self._teardown.push("shard processes' lifeline", self._close_lifeline)
            # the processes stop before their lifeline closes (which would stop them ungracefully)
            self._teardown.push("shard processes", self._stop_shard_processes)
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
        addr, _, stream = ready.read_text().strip().partition("\n")
        self.shard_addresses[shard_id] = addr
        self.shard_streams[shard_id] = stream.strip()
        return addr

    async def _start_processes(self) -> tuple[Bus, TxnSweep]:
        loop = asyncio.get_running_loop()
        # DATA/LOCK only: each shard process locks its own shard-NNNN/ (this process must not)
        dir_lock = await loop.run_in_executor(None, DataDirLock.acquire, self.config.data_dir)
        self._teardown.push("data directory lock", dir_lock.release)
        await loop.run_in_executor(None, check_layout, self.config)
        assert self.config.shards is not None  # check_layout resolved it
        self._socket_directory()  # made before the processes start, so removed after they stop
        for i in range(self.config.shards):
            self.spawn_shard(i)
        shards: dict[int, RemoteShardClient] = {}
        for i in range(self.config.shards):
            address = await self.wait_ready(i)
            client = shard_client(i, address, self.shard_streams[i], transport=self.shard_transport, tls=self.tls)
            self._teardown.push(f"client of shard {i}", client.close)
            shards[i] = client
        slot_map = StaticSlotMap(self.config.shards)
        journal = await SessionJournal.open(self.config.session_journal_dir,
                                            unsafe_no_fsync=self.config.unsafe_no_fsync)
        self._teardown.push("session journal", journal.close)
        bus = Bus(shards, slot_map.shard_for, max_value_bytes=self.config.max_value_bytes,
                  session_journal=journal)
        sweep = TxnSweep(bus, txn_expiry_seconds=self.config.txn_expiry_seconds,
                         interval=self.config.maintenance_interval)
        return bus, sweep

    def member_command(self, shard: int, member: int, directory: Path, etcd_url: str,
                       parent_fd: int | None) -> list[str]:
        """``oribus shard`` for member ``member`` of shard ``shard``'s group."""
        tls = ["--tls-dir", str(self.tls.directory)] if self.tls is not None else []
        lifeline = ["--parent-fd", str(parent_fd)] if parent_fd is not None else []
        stream = f"unix:{self._socket_directory() / f'shard-{shard}-member-{member}.sock'}"
        return [
            sys.executable, "-m", "oribus.cli", "shard", "--id", str(shard), "--member", str(member),
            "--data-dir", str(directory), "--listen", "127.0.0.1:0", "--stream-listen", stream,
            "--etcd", etcd_url, "--cluster", self.cluster_name, "--lease-ttl", str(self.lease_ttl),
            # one machine, one clock: no skew between the members' leases (§5.8)
            "--read-lease", repr(self.config.read_lease_seconds),
            "--clock-skew", repr(self.config.clock_skew_seconds),
            "--history-store", self.config.history_store, *self.retention_flags(),
            *tls, *lifeline,
        ]

    async def _start_groups(self) -> tuple[Bus, TxnSweep]:
        """Replica groups: etcd (given or private), the member processes under supervision,
        and a bus that follows their primaries through etcd."""
        loop = asyncio.get_running_loop()
        dir_lock = await loop.run_in_executor(None, DataDirLock.acquire, self.config.data_dir)
        self._teardown.push("data directory lock", dir_lock.release)
        shards = self.config.shards
        assert shards is not None  # resolved in __init__
        await loop.run_in_executor(None, check_groups_layout, self.config.data_dir, shards, self.replicas)
        url = self.etcd
        if url is None:
            assert self.private_etcd is not None  # __init__ made it
            await self.private_etcd.start()
            self._teardown.push("private etcd", self.private_etcd.stop)
            url = self.private_etcd.url
            print(f"oribus up: no --etcd given: started a private etcd at {url} (data in "
                  f"{self.private_etcd.data_dir}, pid {self.private_etcd.proc.pid if self.private_etcd.proc else 0})",
                  flush=True)
        meta = self.meta = EtcdMeta(url, self.cluster_name, lease_ttl=self.lease_ttl)
        self._teardown.push("cluster metadata", meta.close)
        owners = tuple(StaticSlotMap(shards)._owner)
        await meta.init_cluster(ClusterConfig(shards, owners=owners, replicas=self.replicas))
        self._socket_directory()  # made before the processes start, so removed after they stop
        if self._lifeline is None:
            self._lifeline = ParentLifeline()
            self._teardown.push("member processes' lifeline", self._close_lifeline)
        fd = self._lifeline.child_fd
        etcd_url = url
        self.groups = GroupSupervisor(
            self.config.data_dir, shards, self.replicas,
            lambda shard, member, directory: self.member_command(shard, member, directory, etcd_url, fd),
            pass_fds=(fd,))
        groups = self.groups
        self._teardown.push("member processes", lambda: groups.stop(SHARD_STOP_SECONDS))
        groups.start_all()
        self._teardown.push_task("member supervision", asyncio.create_task(groups.supervise()))
        table: dict = {}

        def client(rec: ShardRecord) -> RemoteShardClient:
            return shard_client(rec.shard_id, rec.address, rec.stream, transport=self.shard_transport,
                                epoch=rec.epoch, tls=self.tls)

        directory = ShardDirectory(meta, table, list(range(shards)), client)
        await directory.start()
        self._teardown.push("shard directory", directory.stop)
        deadline = time.monotonic() + self.start_timeout
        while len(directory.records) < shards:  # every group has elected its first primary
            for (shard, member), proc in groups.procs.items():
                if proc.poll() is not None and proc.returncode in (2, 3):  # a usage error, or refused
                    raise Unavailable(f"shard {shard} member {member} exited with code {proc.returncode}: see "
                                      f"{groups.member_dir(shard, member).parent / f'member-{member}.log'}")
            if time.monotonic() > deadline:
                missing = sorted(set(range(shards)) - set(directory.records))
                raise Unavailable(f"shards {missing} elected no primary within {self.start_timeout}s")
            await asyncio.sleep(0.05)
        learners = await wait_for_voters(lambda: self._not_voters(meta, shards), self.start_timeout)
        if learners:
            print(f"oribus up: still not voters after {self.start_timeout:g}s: {', '.join(learners)}; until they "
                  "are, their group cannot lose another member", flush=True)
        journal = await SessionJournal.open(self.config.session_journal_dir,
                                            unsafe_no_fsync=self.config.unsafe_no_fsync)
        self._teardown.push("session journal", journal.close)
        bus = Bus(table, StaticSlotMap(shards).shard_for, max_value_bytes=self.config.max_value_bytes,
                  session_journal=journal)
        sweep = TxnSweep(bus, txn_expiry_seconds=self.config.txn_expiry_seconds,
                         interval=self.config.maintenance_interval)
        return bus, sweep

    async def _not_voters(self, meta: EtcdMeta, shards: int) -> list[str]:
        """Every group member that does not answer ``status`` as a voter, named."""
        groups = EtcdGroups(meta)
        missing = []
        for shard in range(shards):
            members = await groups.members(shard)
            for member in range(self.replicas):
                record, status = members.get(member), None
                if record is not None and record.stream:
                    peer = StreamPeer(member, record.stream, tls=self.tls, timeout=2.0)
                    try:
                        status = await peer.status()
                    except OribusError:
                        pass  # starting, or restarting: not a voter yet as far as anyone can tell
                    finally:
                        await peer.close()
                if status is None or not status.voter:
                    state = "not answering" if status is None else "a learner, catching up"
                    missing.append(f"shard {shard} member {member} ({state})")
        return missing

    async def _stop_shard_processes(self) -> None:
        """SIGTERM to every shard process (each drains and flushes), then wait for them all;
        one that has not exited within ``SHARD_STOP_SECONDS`` is killed."""
        procs, self.shard_procs = self.shard_procs, {}
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                await asyncio.get_running_loop().run_in_executor(None, proc.wait, SHARD_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _close_lifeline(self) -> None:
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None

    async def stop(self, grace: float | None = None) -> None:
        """Stop what ``start`` started, last started first: the gRPC server (calls in flight get
        ``grace`` seconds), the HTTP gateway, then the shards — flushed and closed in this
        process, or SIGTERM to their processes — and the data directory's lock. Idempotent."""
        await self._teardown.stop(grace)


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
    if cluster.groups is not None:
        mode = f"replica group{'s' if n != 1 else ''} of {cluster.replicas} member processes"
    elif cluster.processes:
        mode = "shard process" if n == 1 else "shard processes"
    else:
        mode = "in-process shard" if n == 1 else "in-process shards"
    http = f", http on {cluster.gateway.url}" if cluster.gateway is not None else ""
    assert cluster.server is not None
    stream = f" (stream {cluster.server.stream_address})" if cluster.server.stream_address else ""
    print(f"oribus up: bus on {cluster.address}{stream}{http}, {n} {mode}, "
          f"data in {cluster.config.data_dir} (pid {os.getpid()})", flush=True)
    if cluster.groups is not None:  # who is where, one JSON line: shard -> its members
        print("oribus up: groups " + json.dumps(cluster.groups.describe()), flush=True)
    await stop.wait()
    print("oribus up: shutting down (draining, flushing)", flush=True)
    await cluster.stop()
