"""Cluster metadata: the one interface the servers use, whatever holds it.

What a cluster's metadata says::

    ClusterConfig   how many shards, the slot count, and which shard owns each slot
    ShardRecord     a running shard server: its addresses (gRPC, stream) and its epoch
    BusRecord       a running bus: its gRPC and HTTP addresses

Two implementations: ``StaticMeta`` (embedded mode and ``oribus bus --shards``:
a fixed list of addresses, nothing to watch, epochs learnt from the shards
themselves) and ``EtcdMeta`` (cluster mode, ``oribus.meta.etcd``).

Fencing (cluster mode): a shard server *claims* its shard id before it opens
its data — a create-if-absent of ``shards/<id>`` bound to a lease. The etcd
revision of that create is the shard's **epoch**, a fencing token that only
grows: the shard stamps it on every session token it gives out and refuses
requests that name another epoch, and the bus sends the epoch it expects, so
a shard process from an older claim can never take part in a commit meant
for the new one. A second process claiming a held id is refused. A shard that
learns its claim is gone (lease expired) stops serving.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import crc32c

from oribus.meta.slots import SLOTS, StaticSlotMap

# seconds a claim in etcd outlives its holder's last keep-alive: how long a dead shard (or a
# replica group's dead primary) holds its id before another process may take over
DEFAULT_LEASE_TTL = 10


@dataclass(frozen=True)
class ClusterConfig:
    shards: int
    slots: int = SLOTS
    owners: tuple[int, ...] = ()  # slot -> shard id; empty: contiguous ranges (StaticSlotMap)
    replicas: int = 1  # members of each shard's replica group (1, 3 or 5; 1: a single copy)

    def slot_map(self) -> SlotMap:
        return SlotMap(self.owners or tuple(StaticSlotMap(self.shards, self.slots)._owner))

    def to_dict(self) -> dict:
        out = {"format": 1, "shards": self.shards, "slots": self.slots, "owners": list(self.owners)}
        if self.replicas != 1:  # a single copy's config reads as it did before replica groups
            out["replicas"] = self.replicas
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ClusterConfig:
        return cls(int(d["shards"]), int(d.get("slots", SLOTS)), tuple(d.get("owners") or ()),
                   int(d.get("replicas", 1)))


class SlotMap:
    """slot(key) = CRC-32C(key) mod slots; owners[slot] is the shard."""

    def __init__(self, owners: tuple[int, ...]) -> None:
        self.owners = list(owners)
        self.slots = len(owners)
        self.shard_ids = sorted(set(owners))

    def shard_for(self, key: str) -> int:
        return self.owners[crc32c.crc32c(key.encode("utf-8")) % self.slots]


@dataclass(frozen=True)
class ShardRecord:
    shard_id: int
    address: str  # its gRPC listener
    epoch: int  # 0: not known from the metadata (static mode); a replica group's: its primary's term
    stream: str = ""  # its stream listener (oribus.rpc.stream_server); "": none, the bus uses gRPC


def parse_shard_address(entry: str) -> tuple[str, str]:
    """``GRPC_ADDRESS[+STREAM_ADDRESS]`` (an entry of ``oribus bus --shards``) as (gRPC, stream)."""
    grpc_address, _, stream = entry.strip().partition("+")
    return grpc_address.strip(), stream.strip()


@dataclass(frozen=True)
class BusRecord:
    bus_id: str
    address: str
    http: str = ""


@dataclass
class ShardClaim:
    """A held claim on a shard id. ``lost`` is set when the claim is gone for good."""

    shard_id: int
    epoch: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""


class ClaimRefused(Exception):
    """Another process holds the shard id (or the metadata could not be reached)."""


class ClusterMeta(abc.ABC):
    @abc.abstractmethod
    async def config(self) -> ClusterConfig:
        """The cluster's configuration; raises if the cluster was never initialised."""

    @abc.abstractmethod
    async def shards(self) -> dict[int, ShardRecord]:
        """The shard servers registered now."""

    @abc.abstractmethod
    def watch_shards(self) -> AsyncIterator[dict[int, ShardRecord]]:
        """The registered shards now, then again after every change (whole maps)."""

    @abc.abstractmethod
    async def claim_shard(self, shard_id: int, address: str, stream: str = "") -> ShardClaim:
        """Claim ``shard_id`` for this process, served at ``address`` (gRPC) and ``stream``
        ("": no stream listener); ClaimRefused if it is held."""

    @abc.abstractmethod
    async def update_address(self, claim: ShardClaim, address: str, stream: str = "") -> None:
        """Change the addresses of a held claim (its epoch stays)."""

    @abc.abstractmethod
    async def release(self, claim: ShardClaim) -> None:
        """Give the claim up (on a clean stop), so a restart can claim at once."""

    @abc.abstractmethod
    async def register_bus(self, record: BusRecord) -> None:
        """Announce a bus for as long as this process lives."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class StaticMeta(ClusterMeta):
    """A fixed cluster: shard ``i`` at ``addresses[i]``; nothing changes, nothing to claim.

    An address is the shard's gRPC listener, optionally followed by ``+`` and its stream
    listener (``parse_shard_address``): ``10.0.0.5:7801+10.0.0.5:7802``.
    """

    def __init__(self, addresses: list[str]) -> None:
        self._config = ClusterConfig(len(addresses))
        self._shards = {i: ShardRecord(i, *_addresses(a)) for i, a in enumerate(addresses)}

    async def config(self) -> ClusterConfig:
        return self._config

    async def shards(self) -> dict[int, ShardRecord]:
        return dict(self._shards)

    async def watch_shards(self) -> AsyncIterator[dict[int, ShardRecord]]:
        yield dict(self._shards)
        await asyncio.Event().wait()  # never changes

    async def claim_shard(self, shard_id: int, address: str, stream: str = "") -> ShardClaim:
        return ShardClaim(shard_id, 0)

    async def update_address(self, claim: ShardClaim, address: str, stream: str = "") -> None:
        pass

    async def release(self, claim: ShardClaim) -> None:
        pass

    async def register_bus(self, record: BusRecord) -> None:
        pass

    async def close(self) -> None:
        pass


def _addresses(entry: str) -> tuple[str, int, str]:
    grpc_address, stream = parse_shard_address(entry)
    return grpc_address, 0, stream
