"""The simulated etcd of replica groups: a term register and a primary key per group.

What the cluster layer keeps in etcd for a replica group (``specs/replication.md`` §5), and
nothing more, on the virtual clock::

    groups/<shard>/term      an integer, moved only by compare-and-set (one value per election)
    groups/<shard>/primary   {member, term}, bound to the primary's lease; created only by a
                             transaction that compares term = t and that the key is absent

A lease lives ``ttl`` virtual seconds from its grant or its last keep-alive; when it expires
the key bound to it is deleted (at that moment: a timer), as etcd deletes it. Watchers hear
of every change of a primary key (``watch``); the harness delivers that to the bus after a
delay, as a watch stream would.

etcd itself never fails here (it is a replicated service of its own); what fails is the way
to it: a member cut from etcd (``SimNetwork.reachable(name, "etcd")``) gets ``Unavailable``
from every call (``oribus.sim.group``), so its keep-alives stop and its lease runs out.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PrimaryKey:
    """The value of ``groups/<shard>/primary``."""

    member: int
    term: int
    lease: int


class SimEtcd:
    """Term registers, primary keys and leases (module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ttl: float) -> None:
        self.loop = loop
        self.ttl = ttl
        self.terms: dict[int, int] = {}
        self.primaries: dict[int, PrimaryKey] = {}
        self.leases: dict[int, float] = {}  # lease id -> virtual time it expires
        self._ids = itertools.count(1)
        self.watchers: list[Callable[[int, PrimaryKey | None], None]] = []
        self.counters = {"elections": 0, "cas_failed": 0, "takeovers": 0, "leases_expired": 0}

    # ---- the term register ----------------------------------------------------------

    def term(self, shard: int) -> int:
        return self.terms.get(shard, 0)

    def cas_term(self, shard: int, expected: int, new: int) -> bool:
        """Set the term register to ``new`` if it holds ``expected``."""
        if self.term(shard) != expected:
            self.counters["cas_failed"] += 1
            return False
        self.terms[shard] = new
        self.counters["elections"] += 1
        return True

    # ---- leases ---------------------------------------------------------------------

    def grant(self) -> int:
        lease = next(self._ids)
        self._extend(lease)
        return lease

    def keep_alive(self, lease: int) -> bool:
        """Extend ``lease`` by ``ttl``; False if it has expired already (it stays expired)."""
        if lease not in self.leases:
            return False
        self._extend(lease)
        return True

    def revoke(self, lease: int) -> None:
        if self.leases.pop(lease, None) is not None:
            self._drop_keys(lease)

    def _extend(self, lease: int) -> None:
        expires = self.loop.time() + self.ttl
        self.leases[lease] = expires
        self.loop.call_at(expires, self._expire, lease)

    def _expire(self, lease: int) -> None:
        expires = self.leases.get(lease)
        if expires is not None and expires <= self.loop.time():
            del self.leases[lease]
            self.counters["leases_expired"] += 1
            self._drop_keys(lease)

    def _drop_keys(self, lease: int) -> None:
        for shard, key in sorted(self.primaries.items()):
            if key.lease == lease:
                del self.primaries[shard]
                self._notify(shard, None)

    # ---- the primary key -------------------------------------------------------------

    def primary(self, shard: int) -> PrimaryKey | None:
        return self.primaries.get(shard)

    def create_primary(self, shard: int, member: int, term: int, lease: int) -> bool:
        """The takeover transaction: the term register still holds ``term``, no primary key
        exists, and ``lease`` is alive; then the key is created, bound to it."""
        if self.term(shard) != term or shard in self.primaries or lease not in self.leases:
            return False
        key = self.primaries[shard] = PrimaryKey(member, term, lease)
        self.counters["takeovers"] += 1
        self._notify(shard, key)
        return True

    def watch(self, callback: Callable[[int, PrimaryKey | None], None]) -> None:
        self.watchers.append(callback)

    def _notify(self, shard: int, key: PrimaryKey | None) -> None:
        for callback in self.watchers:
            callback(shard, key)
