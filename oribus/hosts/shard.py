"""The shard process: the body of ``oribus shard``.

Locks the data directory, claims the shard id in the cluster metadata (cluster mode),
serves the shard (``oribus.rpc.shard_server.ShardServer``) until SIGINT/SIGTERM or until
the claim is lost, then stops and releases the claim.

The shard serves gRPC on ``listen`` and the stream transport (what the bus uses by default,
``oribus.rpc.stream_server``) on ``stream_listen``; its claim and its ready file carry both
addresses. Which stream listener, by default (``stream_listen_address``):

* no ``advertise``: one on the host of ``listen``, on a free port, advertised as bound;
* with ``advertise`` (the shard is reached through an address of the network's own, a
  Kubernetes Service, a NAT): one only if ``stream_listen`` or ``advertise_stream`` says
  where, advertised at ``advertise_stream`` (default: the host of ``advertise`` with the
  bound port). Otherwise none: a firewall that lets only the gRPC port through must not
  leave the bus trying a port it cannot reach; the bus then uses gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from oribus.datadir_lock import DataDirLock
from oribus.errors import InvalidRequest
from oribus.hosts.lifecycle import Teardown, stop_signal_event
from oribus.meta.cluster_meta import ClaimRefused, ClusterMeta, ShardClaim
from oribus.rpc.shard_server import ShardServer
from oribus.shards.config import ShardConfig
from oribus.tls import TlsConfig

log = logging.getLogger("oribus.hosts.shard")


NO_STREAM = "off"  # --stream-listen off: serve gRPC only


def stream_listen_address(listen: str, stream_listen: str | None, advertise: str | None,
                          advertise_stream: str | None) -> str | None:
    """Where the stream listener binds (None: no stream listener), by the rules of the module docstring."""
    if stream_listen == NO_STREAM:
        return None
    if stream_listen is not None:
        return stream_listen
    if advertise is not None and advertise_stream is None:
        return None
    port = advertise_stream.rsplit(":", 1)[1] if advertise_stream is not None else "0"
    return f"{listen.rsplit(':', 1)[0]}:{port}"


def advertised_stream(bound: str, advertise: str | None, advertise_stream: str | None) -> str:
    """The stream address a shard announces: ``advertise_stream``, else the host of ``advertise``
    with the bound port, else the bound address ("" without a listener)."""
    if not bound:
        return ""
    if advertise_stream is not None:
        return advertise_stream
    if advertise is not None:
        return f"{advertise.rsplit(':', 1)[0]}:{bound.rsplit(':', 1)[1]}"
    return bound


async def _claim(meta: ClusterMeta, shard_id: int, address: str, stream: str, wait: float) -> ShardClaim:
    deadline = asyncio.get_running_loop().time() + wait
    told = False
    while True:
        try:
            return await meta.claim_shard(shard_id, address, stream)
        except ClaimRefused as e:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            if not told:
                log.warning("%s; waiting up to %.0fs for that claim to expire", e, wait)
                told = True
            await asyncio.sleep(0.25)


class ClaimLost(Exception):
    """This process lost its claim on its shard id and stopped serving it."""


async def run_shard_server(shard_id: int, data_dir: Path, listen: str, *, ready_file: Path | None = None,
                           config: ShardConfig | None = None, tls: TlsConfig | None = None,
                           meta: ClusterMeta | None = None, advertise: str | None = None,
                           claim_wait: float = 0.0, stream_listen: str | None = None,
                           advertise_stream: str | None = None, member: int | None = None) -> None:
    """Run until SIGINT/SIGTERM: the body of ``oribus shard``.

    The data directory is locked first (``<data_dir>/LOCK``): while another live
    process has it open, this one raises ``DataDirLocked`` and touches nothing.

    With ``meta`` (cluster mode) the shard id is claimed BEFORE the data is
    opened — a second process for the same id is refused (ClaimRefused) and
    never touches the WAL — and the claim's revision is the shard's epoch. The
    claim is advertised at ``advertise`` (default: the bound address), with the
    stream listener's address (``advertised_stream``). If the claim is lost the
    server is fenced, stops, and ClaimLost is raised. The ready file gets the
    gRPC address on its first line and the stream address, if any, on the second.

    If the cluster keeps each shard as a replica group (``replicas`` > 1 in its etcd
    configuration), the process is one member of shard ``shard_id``'s group instead
    (``oribus.hosts.replica``): member id ``member``, else the one its data directory names,
    else the lowest free one; it learns its role from etcd.

    ``claim_wait``: how long to keep trying while another claim holds the id —
    after a kill -9 the dead process's lease lives on for up to its TTL, and a
    live duplicate holds it for good; either way nothing is opened meanwhile.
    """
    cfg = config or ShardConfig(shard_id=shard_id, data_dir=data_dir)
    bind_stream = stream_listen_address(listen, stream_listen, advertise, advertise_stream)
    async with Teardown(log) as teardown:  # stops what was started, last first, however this ends
        # The data directory first: a second process on it is refused (DataDirLocked) before it
        # claims the id in etcd or binds a port; held until the shard has stopped.
        dir_lock = DataDirLock.acquire(cfg.data_dir)
        teardown.push("data directory lock", dir_lock.release)
        stop = stop_signal_event()
        claim = None
        claimed_stream = advertise_stream if bind_stream is not None and advertise_stream is not None else ""
        if meta is not None:
            cluster = await meta.config()
            if not 0 <= shard_id < cluster.shards:
                raise InvalidRequest(f"shard id {shard_id} is outside the cluster's 0..{cluster.shards - 1}")
            if cluster.replicas > 1:  # a member of the shard's replica group (oribus.hosts.replica)
                await _run_member(cfg, meta, listen, stop, dir_lock, tls=tls, advertise=advertise,
                                  stream_listen=bind_stream, advertise_stream=advertise_stream,
                                  ready_file=ready_file, member=member)
                return
            if member is not None:
                raise InvalidRequest(f"--member: cluster {getattr(meta, 'cluster', '')!r} keeps one copy of each "
                                     "shard (replicas 1); there are no members")
            claim = await _claim(meta, shard_id, advertise or listen, claimed_stream, claim_wait)
            teardown.push(f"claim on shard {shard_id}", _releaser(meta, claim))
        server = ShardServer(cfg, listen, tls=tls, epoch=claim.epoch if claim is not None and claim.epoch else None,
                             dir_lock=dir_lock, stream_listen=bind_stream)
        await server.start()
        teardown.push("shard server", server.stop, graceful=True)
        stream = advertised_stream(server.stream_address, advertise, advertise_stream)
        if claim is not None and meta is not None and (advertise is None or stream != claimed_stream):
            await meta.update_address(claim, advertise or server.address, stream)  # the bound ports
        # ready (the ready file, the banner, SERVING) once it takes writes: after its restart grace
        ready, stopping = asyncio.ensure_future(server.ready()), asyncio.ensure_future(stop.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopping.cancel()
        if stop.is_set():
            return
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(server.address + (f"\n{stream}" if stream else ""))
            tmp.replace(ready_file)
        epoch = server.shard.epoch if server.shard is not None else 0
        streaming = f" and {server.stream_address} (stream, advertised as {stream})" if stream else ""
        print(f"oribus shard {shard_id} listening on {server.address}{streaming} (epoch {epoch})", flush=True)
        waits = {asyncio.ensure_future(stop.wait())}
        if claim is not None:
            waits.add(asyncio.ensure_future(claim.lost.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if claim is not None and claim.lost.is_set():
            server.fence(claim.reason)
            raise ClaimLost(claim.reason)


async def _run_member(cfg: ShardConfig, meta: ClusterMeta, listen: str, stop: asyncio.Event,
                      dir_lock: DataDirLock, *, tls: TlsConfig | None, advertise: str | None,
                      stream_listen: str | None, advertise_stream: str | None, ready_file: Path | None,
                      member: int | None) -> None:
    from oribus.hosts.replica import ReplicaConfig, run_replica_member
    from oribus.meta.etcd import EtcdMeta

    if not isinstance(meta, EtcdMeta):
        raise InvalidRequest("a replica group's members need etcd (--etcd)")
    if stream_listen is None:
        raise InvalidRequest("a replica group's member needs a stream listener (its members replicate over it): "
                             "give --stream-listen or --advertise-stream")
    config = ReplicaConfig(cfg, listen, stream_listen, advertise=advertise or "",
                           advertise_stream=advertise_stream or "", member=member, tls=tls, ready_file=ready_file)
    await run_replica_member(config, meta, stop, dir_lock=dir_lock)


def _releaser(meta: ClusterMeta, claim: ShardClaim) -> Callable[[], Awaitable[None]]:
    """The claim's stop step: give it up, unless it is already lost (someone else may hold it)."""

    async def release() -> None:
        if not claim.lost.is_set():
            await meta.release(claim)

    return release
