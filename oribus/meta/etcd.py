"""Cluster metadata in etcd v3 (through ``aetcd``, a maintained asyncio client).

Layout, all under ``/oribus/<cluster>/``::

    config           {"format": 1, "shards": N, "slots": 4096, "owners": [...], "replicas": R}
                     (cluster init; "replicas" absent: 1)
    shards/<id>      {"address": "host:port", "stream": "host:port"}       held by the shard's lease
                     (the gRPC and stream listeners; "stream" absent: none, the bus uses
                     gRPC; the epoch is the key's create revision, or "epoch" when the
                     record has it: a replica group's primary writes its term there)
    groups/<id>/...  replica groups (R > 1): ``oribus.meta.groups``
    buses/<id>       {"address": "host:port", "http": "host:port"}         held by the bus's lease
    auth/...         the cluster's verification keys, access rules and revoked token ids
                     (``oribus auth push`` / ``revoke --etcd``; layout: ``oribus.auth.published``,
                     read and written by ``oribus.meta.auth_store``)

Values are JSON. A claim is one transaction — "if ``shards/<id>`` does not
exist, create it bound to my lease" — so two processes can never both hold
an id; the create's revision (the transaction's header revision) is the
epoch. The lease is kept alive every ``ttl / 3`` seconds. If etcd cannot be
reached the holder keeps serving and logs loudly (nobody else can claim
either: claims need etcd); if etcd answers that the lease is gone, the claim
is lost for good and ``claim.lost`` is set — the shard server then stops.

Watches: ``watch_shards`` reads the prefix, yields it, and re-reads it after
every etcd watch event (and at least every ``poll_seconds``, so a broken watch
stream costs a delay, never a missed change).

Endpoints: ``http://host:port`` (or ``host:port``), comma separated; the first
that answers is used, and a lost connection moves on to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions

from oribus.errors import InvalidRequest, Unavailable
from oribus.meta.cluster_meta import (
    DEFAULT_LEASE_TTL,
    BusRecord,
    ClaimRefused,
    ClusterConfig,
    ClusterMeta,
    ShardClaim,
    ShardRecord,
)

log = logging.getLogger("oribus.meta.etcd")
T = TypeVar("T")

DEFAULT_CLUSTER = "oribus"


def parse_endpoints(urls: str) -> list[tuple[str, int]]:
    out = []
    for raw in urls.split(","):
        raw = raw.strip()
        if not raw:
            continue
        hostport = raw.split("://", 1)[-1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequest(f"etcd endpoint must be [http://]HOST:PORT, not {raw!r}")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise InvalidRequest("no etcd endpoint given")
    return out


def _shard_value(address: str, stream: str) -> bytes:
    """A shard's record; without a stream listener it is what older versions wrote."""
    return json.dumps({"address": address, "stream": stream} if stream else {"address": address}).encode()


class EtcdMeta(ClusterMeta):
    """``EtcdMeta("http://127.0.0.1:2379", cluster="oribus")``; ``await close()`` when done."""

    def __init__(self, endpoints: str, cluster: str = DEFAULT_CLUSTER, *, lease_ttl: int = DEFAULT_LEASE_TTL,
                 timeout: float = 5.0, poll_seconds: float = 2.0) -> None:
        if not cluster or "/" in cluster:
            raise InvalidRequest("a cluster name is non-empty and has no '/'")
        self.endpoints = parse_endpoints(endpoints)
        self.cluster = cluster
        self.prefix = f"/oribus/{cluster}/"
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self._client: aetcd.Client | None = None
        self._next = 0
        self._keepalives: dict[int, asyncio.Task] = {}
        self._leases: dict[int, aetcd.leases.Lease] = {}
        self._bus_lease: aetcd.leases.Lease | None = None
        self._bus_keepalive: asyncio.Task | None = None

    def _key(self, *parts: object) -> bytes:
        return (self.prefix + "/".join(str(p) for p in parts)).encode()

    # ---- connection ------------------------------------------------------------------

    async def _etcd(self) -> aetcd.Client:
        if self._client is not None:
            return self._client
        errors = []
        for i in range(len(self.endpoints)):
            host, port = self.endpoints[(self._next + i) % len(self.endpoints)]
            client = aetcd.Client(host=host, port=port, timeout=self.timeout, connect_wait_timeout=3)
            try:
                await asyncio.wait_for(client.connect(), self.timeout)
                await asyncio.wait_for(client.status(), self.timeout)  # connect() alone proves nothing
            except (aetcd.exceptions.ClientError, OSError, TimeoutError) as e:
                errors.append(f"{host}:{port}: {type(e).__name__} {e}".strip())
                with contextlib.suppress(Exception):
                    await client.close()
                continue
            self._next = (self._next + i) % len(self.endpoints)
            self._client = client
            return client
        raise Unavailable("etcd is unreachable: " + "; ".join(errors), endpoints=len(self.endpoints))

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """One etcd call; a connection failure drops the client so the next call reconnects."""
        client = await self._etcd()
        try:
            return await asyncio.wait_for(fn(client, *args, **kwargs), self.timeout)
        except (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError,
                TimeoutError, OSError) as e:
            await self._drop_client()
            raise Unavailable(f"etcd call failed: {type(e).__name__} {e}") from e

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._next += 1
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    # ---- configuration ------------------------------------------------------------------

    async def init_cluster(self, config: ClusterConfig) -> bool:
        """Create the cluster's configuration. Returns False if it already existed (the same);
        raises InvalidRequest if it exists with another shard count."""
        key = self._key("config")
        value = json.dumps(config.to_dict()).encode()

        async def txn(c: aetcd.Client) -> Any:
            return await c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, value)],
                failure=[c.transactions.get(key)],
            )

        created, responses = await self._call(txn)
        if created:
            return True
        existing = ClusterConfig.from_dict(json.loads(responses[0][0][0]))
        if (existing.shards, existing.slots) != (config.shards, config.slots):
            raise InvalidRequest(
                f"cluster {self.cluster!r} already exists with {existing.shards} shards; it cannot be "
                f"initialised again with {config.shards} (keys would map to other shards)"
            )
        if existing.replicas != config.replicas:
            raise InvalidRequest(
                f"cluster {self.cluster!r} already exists with {existing.replicas} replicas per shard; it "
                f"cannot be initialised again with {config.replicas}"
            )
        return False

    async def config(self) -> ClusterConfig:
        got = await self._call(lambda c: c.get(self._key("config")))
        if got is None:
            raise InvalidRequest(
                f"cluster {self.cluster!r} is not initialised in etcd: run "
                f"`oribus cluster init --etcd ... --shards N` first"
            )
        return ClusterConfig.from_dict(json.loads(got.value))

    # ---- shards ---------------------------------------------------------------------------

    async def shards(self) -> dict[int, ShardRecord]:
        prefix = self._key("shards", "")
        got = await self._call(lambda c: c.get_prefix(prefix))
        out = {}
        for kv in got:
            try:
                sid = int(kv.key[len(prefix):].decode())
                d = json.loads(kv.value)
                epoch = int(d["epoch"]) if "epoch" in d else int(kv.create_revision)
                out[sid] = ShardRecord(sid, d["address"], epoch, str(d.get("stream") or ""))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring malformed shard record %r", kv.key)
        return out

    async def watch_shards(self) -> AsyncIterator[dict[int, ShardRecord]]:
        last: dict[int, ShardRecord] | None = None
        changed = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(self._watch_prefix(self._key("shards", ""), changed))
        try:
            while True:
                try:
                    now: dict[int, ShardRecord] | None = await self.shards()
                except Unavailable as e:
                    log.error("etcd unreachable, keeping the shard map I have: %s", e.message)
                    now = last
                if now is not None and now != last:
                    last = now
                    yield dict(now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.poll_seconds)
                changed.clear()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    async def _watch_prefix(self, prefix: bytes, changed: asyncio.Event) -> None:
        while True:
            try:
                client = await self._etcd()
                watch = await client.watch_prefix(prefix)
                try:
                    async for _event in watch:
                        changed.set()
                finally:
                    with contextlib.suppress(Exception):
                        await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the poll covers the gap; retry the watch
                log.debug("etcd watch broke (%s); polling until it is back", e)
            await asyncio.sleep(self.poll_seconds)

    async def claim_shard(self, shard_id: int, address: str, stream: str = "") -> ShardClaim:
        try:
            lease = await self._call(lambda c: c.lease(self.lease_ttl))
        except Unavailable as e:
            raise ClaimRefused(f"cannot claim shard {shard_id}: {e.message}") from e
        key = self._key("shards", shard_id)
        value = _shard_value(address, stream)

        async def txn(c: aetcd.Client) -> Any:
            return await c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, value, lease=lease)],
                failure=[c.transactions.get(key)],
            )

        try:
            created, responses = await self._call(txn)
        except Unavailable as e:
            raise ClaimRefused(f"cannot claim shard {shard_id}: {e.message}") from e
        if not created:
            with contextlib.suppress(Exception):
                await self._call(lambda c: c.revoke_lease(lease.id))
            holder = json.loads(responses[0][0][0]).get("address", "?")
            raise ClaimRefused(
                f"shard {shard_id} of cluster {self.cluster!r} is already claimed by the server at "
                f"{holder} (epoch {responses[0][0][1].create_revision}); stop it first — two processes "
                "must never serve one shard"
            )
        epoch = int(responses[0].response_put.header.revision)
        claim = ShardClaim(shard_id, epoch)
        self._leases[shard_id] = lease
        self._keepalives[shard_id] = asyncio.get_running_loop().create_task(self._keep(claim, lease))
        log.info("claimed shard %d at %s with epoch %d", shard_id, address, epoch)
        return claim

    async def _keep(self, claim: ShardClaim, lease: aetcd.leases.Lease) -> None:
        async def expired() -> bool:
            claim.reason = (f"the claim on shard {claim.shard_id} (epoch {claim.epoch}) expired in etcd: "
                            "another process may serve it now")
            log.critical(claim.reason)
            claim.lost.set()
            return False  # fenced: the shard stops serving

        await self._refresh(lambda: lease.id, expired,
                            lambda: f"still serving shard {claim.shard_id} on its claim (epoch {claim.epoch})")

    async def _refresh(self, lease_id: Callable[[], int], expired: Callable[[], Awaitable[bool]],
                       holding: Callable[[], str]) -> None:
        """Keep a lease alive; when it ran out, ``expired()`` says whether to go on."""
        period = max(1.0, self.lease_ttl / 3)
        failing_since = None
        while True:
            await asyncio.sleep(period)
            try:
                reply = await self._call(lambda c: c.refresh_lease(lease_id()))
                if (reply is None or reply.TTL <= 0) and not await expired():
                    return
            except Unavailable as e:
                loop_time = asyncio.get_running_loop().time()
                failing_since = failing_since or loop_time
                log.error("etcd unreachable for %.0fs: %s; %s", loop_time - failing_since, holding(), e.message)
                continue
            failing_since = None

    async def update_address(self, claim: ShardClaim, address: str, stream: str = "") -> None:
        lease = self._leases[claim.shard_id]
        key = self._key("shards", claim.shard_id)
        value = _shard_value(address, stream)

        async def txn(c: aetcd.Client) -> Any:  # only while the claim is still ours (same create revision)
            return await c.transaction(
                compare=[c.transactions.create(key) == claim.epoch],
                success=[c.transactions.put(key, value, lease=lease)],
                failure=[],
            )

        ok, _ = await self._call(txn)
        if not ok:
            claim.reason = f"the claim on shard {claim.shard_id} (epoch {claim.epoch}) is gone"
            claim.lost.set()
            raise ClaimRefused(claim.reason)

    async def release(self, claim: ShardClaim) -> None:
        task = self._keepalives.pop(claim.shard_id, None)
        if task is not None:
            task.cancel()
        lease = self._leases.pop(claim.shard_id, None)
        if lease is not None:
            with contextlib.suppress(Exception):
                await self._call(lambda c: c.revoke_lease(lease.id))

    # ---- any part of the prefix (auth data: oribus.meta.auth_store) -------------------------

    async def read_prefix(self, name: str) -> dict[str, bytes]:
        """Every key under ``<prefix><name>`` at one revision, named relative to it."""
        prefix = self._key(name)
        got = await self._call(lambda c: c.get_prefix(prefix))
        return {kv.key[len(prefix):].decode("utf-8", "replace"): bytes(kv.value) for kv in got}

    async def follow_prefix(self, name: str) -> AsyncIterator[dict[str, bytes]]:
        """``read_prefix(name)`` now, then again after every change: after each etcd watch
        event, and at least every ``poll_seconds`` (yielded only when it differs). While etcd
        cannot be reached nothing is yielded (the caller keeps what it has) and it says so."""
        last: dict[str, bytes] | None = None
        changed = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(self._watch_prefix(self._key(name), changed))
        try:
            while True:
                changed.clear()  # before the read: an event during it means read again
                try:
                    now = await self.read_prefix(name)
                except Unavailable as e:
                    log.error("etcd unreachable, keeping the %s I have: %s", name.rstrip("/"), e.message)
                else:
                    if now != last:
                        last = now
                        yield dict(now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.poll_seconds)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    async def write_prefix(self, name: str, puts: dict[str, bytes], deletes: Sequence[str] = ()) -> None:
        """One transaction under ``<prefix><name>``: ``puts`` (relative names -> values) and
        ``deletes`` (relative names), all or nothing."""
        ops_puts = [(self._key(name) + n.encode(), v) for n, v in puts.items()]
        ops_deletes = [self._key(name) + n.encode() for n in deletes]

        async def txn(c: aetcd.Client) -> Any:
            return await c.transaction(
                compare=[],
                success=[*(c.transactions.put(k, v) for k, v in ops_puts),
                         *(c.transactions.delete(k) for k in ops_deletes)],
                failure=[],
            )

        await self._call(txn)

    # ---- buses ----------------------------------------------------------------------------

    async def register_bus(self, record: BusRecord) -> None:
        await self._put_bus(record)
        self._bus_keepalive = asyncio.get_running_loop().create_task(self._keep_bus(record))

    async def _put_bus(self, record: BusRecord) -> None:
        lease = await self._call(lambda c: c.lease(self.lease_ttl))
        value = json.dumps({"address": record.address, "http": record.http}).encode()
        await self._call(lambda c: c.put(self._key("buses", record.bus_id), value, lease=lease))
        self._bus_lease = lease

    async def _keep_bus(self, record: BusRecord) -> None:
        """A bus whose record's lease ran out (paused past the TTL) writes it again: it owns
        nothing exclusive, so unlike a shard it is never fenced."""
        async def expired() -> bool:
            log.warning("the registration of bus %s expired in etcd; registering it again", record.bus_id)
            await self._put_bus(record)
            return True

        def lease_id() -> int:
            assert self._bus_lease is not None  # _put_bus took it before this task started
            return self._bus_lease.id

        await self._refresh(lease_id, expired,
                            lambda: f"cannot refresh the registration of bus {record.bus_id}")

    async def buses(self) -> dict[str, BusRecord]:
        prefix = self._key("buses", "")
        got = await self._call(lambda c: c.get_prefix(prefix))
        out = {}
        for kv in got:
            d = json.loads(kv.value)
            bid = kv.key[len(prefix):].decode()
            out[bid] = BusRecord(bid, d.get("address", ""), d.get("http", ""))
        return out

    async def close(self) -> None:
        for sid in list(self._keepalives):
            self._keepalives.pop(sid).cancel()
        if self._bus_keepalive is not None:
            self._bus_keepalive.cancel()
        lease = self._bus_lease
        if lease is not None:
            with contextlib.suppress(Exception):
                await self._call(lambda c: c.revoke_lease(lease.id))
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None
