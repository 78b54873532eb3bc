"""A bus process in front of shard servers: the body of ``oribus bus``.

The shards come from the cluster metadata: a fixed list of addresses
(``StaticMeta``, ``--shards``) or etcd (``EtcdMeta``, ``--etcd``), followed by a
``ShardDirectory`` so a restarted or moved shard is picked up with its new
epoch. The bus calls a shard over its stream listener when its record has one
(``--shard-transport stream``, the default), else over gRPC. The bus's own state (the session journal of HTTP agents) lives in
``data_dir``. With etcd the bus announces itself under ``buses/`` for as long
as it runs, and under ``--auth`` takes its access rules from the cluster's etcd when they
are published there (``AuthFollower``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

from oribus.auth import Authority
from oribus.bus.bus import Bus
from oribus.bus.guarded import GuardedBus
from oribus.bus.session_journal import SessionJournal
from oribus.bus.sweep import TxnSweep
from oribus.gateway import GatewayConfig, HttpGateway
from oribus.hosts.auth_follower import AuthFollower
from oribus.hosts.exposure import warn_unauthenticated
from oribus.hosts.lifecycle import Teardown, stop_signal_event
from oribus.hosts.shard import stream_listen_address
from oribus.meta.cluster_meta import BusRecord, ClusterMeta, ShardRecord
from oribus.meta.directory import ShardDirectory
from oribus.rpc.bus_server import BusServer
from oribus.rpc.shard_client import DEFAULT_TRANSPORT, RemoteShardClient, shard_client
from oribus.tls import TlsConfig

log = logging.getLogger("oribus.hosts.bus")


class BusHost:
    """``await start()`` / ``await stop()``: the bus, its gRPC service and its HTTP gateway."""

    def __init__(self, meta: ClusterMeta, data_dir: Path, listen: str, *, http: GatewayConfig | None = None,
                 tls: TlsConfig | None = None, ready_wait: float = 10.0,
                 advertise: str | None = None, advertise_http: str | None = None,
                 shard_transport: str = DEFAULT_TRANSPORT, stream_listen: str | None = None,
                 advertise_stream: str | None = None, authority: Authority | None = None,
                 auth_follower: AuthFollower | None = None) -> None:
        self.meta = meta
        self.authority = authority  # --auth: credentials and access rules on every transport
        # --auth with --etcd: the authority comes from (and follows) the cluster's etcd
        self.auth_follower = auth_follower
        self.data_dir = Path(data_dir)
        self.listen = listen
        self.http = http
        self.tls = tls
        self.ready_wait = ready_wait
        self.advertise = advertise  # the addresses announced in the metadata (default: the bound ones)
        self.advertise_http = advertise_http
        self.shard_transport = shard_transport  # "stream" (where a shard has a stream listener) or "grpc"
        # the clients' stream listener (oribus.hosts.shard.stream_listen_address: a free port on the
        # host of listen, or none behind an advertised address unless told where)
        self.stream_listen = stream_listen_address(listen, stream_listen, advertise, advertise_stream)
        self.advertise_stream = advertise_stream
        self.bus: Bus | None = None
        self.server: BusServer | None = None
        self.gateway: HttpGateway | None = None
        self.directory: ShardDirectory | None = None
        self._teardown = Teardown(log)  # what start() started, stopped in reverse by stop()

    def _client(self, rec: ShardRecord) -> RemoteShardClient:
        return shard_client(rec.shard_id, rec.address, rec.stream, transport=self.shard_transport,
                            epoch=rec.epoch, tls=self.tls)

    async def start(self) -> None:
        """Open the journal, follow the shards, serve HTTP and gRPC, announce the bus; on
        failure, stop whatever was started."""
        async with self._teardown.stop_on_error():
            config = await self.meta.config()
            slot_map = config.slot_map()
            if self.auth_follower is not None:
                self.authority = await self.auth_follower.start()
                self._teardown.push("auth follower", self.auth_follower.stop)
            journal = await SessionJournal.open(self.data_dir / "sessions")
            self._teardown.push("session journal", journal.close)
            shards: dict = {}
            self.directory = ShardDirectory(self.meta, shards, list(range(config.shards)), self._client)
            await self.directory.start(wait=self.ready_wait)
            self._teardown.push("shard directory", self.directory.stop)
            self.bus = Bus(shards, slot_map.shard_for, session_journal=journal)
            # HTTP first: the gRPC health service says SERVING once the server starts, and
            # what waits for it (process supervisors, tests) may then use the HTTP port too.
            # --auth: one guard for every transport (one record of each session's owner)
            guarded = GuardedBus(self.bus, self.authority) if self.authority is not None else None
            if self.http is not None:
                self.gateway = HttpGateway(self.bus, self.http, guarded=guarded)
                await self.gateway.start()
                self._teardown.push("HTTP gateway", self.gateway.stop)
            self.server = BusServer(self.bus, self.listen, tls=self.tls, stream_listen=self.stream_listen,
                                    advertise_stream=self.advertise_stream, guarded=guarded)
            await self.server.start()
            if self.authority is None:
                warn_unauthenticated([self.server.address, self.server.stream_address,
                                      self.gateway.address if self.gateway is not None else ""])
            self._teardown.push("gRPC server", self.server.stop, graceful=True)
            # resolves transactions whose coordinator died; in the background: serving does not wait
            self._teardown.push_task("transaction sweep", asyncio.create_task(TxnSweep(self.bus).run_forever()))
            host = socket.gethostname()
            http = self.advertise_http or (self.gateway.address if self.gateway else "")
            # the record lives as long as the metadata's connection (ClusterMeta.close ends it)
            await self.meta.register_bus(BusRecord(f"{host}-{self.server.port}",
                                                   self.advertise or self.server.address, http))

    async def stop(self, grace: float | None = None) -> None:
        """Stop what ``start`` started, last started first. Idempotent."""
        await self._teardown.stop(grace)


async def run_bus(meta: ClusterMeta, data_dir: Path, listen: str, *, http: GatewayConfig | None,
                  tls: TlsConfig | None = None, advertise: str | None = None,
                  advertise_http: str | None = None, shard_transport: str = DEFAULT_TRANSPORT,
                  stream_listen: str | None = None, advertise_stream: str | None = None,
                  authority: Authority | None = None, auth_follower: AuthFollower | None = None) -> None:
    stop = stop_signal_event()
    bus = BusHost(meta, data_dir, listen, http=http, tls=tls, advertise=advertise,
                  advertise_http=advertise_http, shard_transport=shard_transport,
                  stream_listen=stream_listen, advertise_stream=advertise_stream, authority=authority,
                  auth_follower=auth_follower)
    async with Teardown(log) as teardown:
        teardown.push("cluster metadata", meta.close)  # with etcd: the bus's record goes with it
        teardown.push("bus", bus.stop)  # stops what a failed start left too
        await bus.start()
        where = f", http on {bus.gateway.url}" if bus.gateway is not None else ""
        assert bus.server is not None and bus.directory is not None
        stream = f" (stream {bus.server.stream_address})" if bus.server.stream_address else ""
        print(f"oribus bus listening on {bus.server.address}{stream}{where} over "
              f"{len(bus.directory.shards)} shards", flush=True)
        await stop.wait()
