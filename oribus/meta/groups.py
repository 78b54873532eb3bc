"""Replica groups in etcd: terms, member claims and the primary key (``specs/replication.md`` §2, §5, §6).

Layout, beside ``EtcdMeta``'s, under ``/oribus/<cluster>/``::

    config                        {..., "replicas": R}                    (cluster init; 1: no groups)
    groups/<shard>/term           "<t>"          the group's term register: moved only by CAS
    groups/<shard>/members/<r>    {"stream": "host:port", "address": "host:port"}
                                                 held by the member process's lease: one
                                                 process per member id
    groups/<shard>/primary        {"member": r, "term": t}               held by the primary's lease
    groups/<shard>/takeover       {"member": r, "term": t, "at": unix s, "previous": {"member", "term"} | null,
                                   "failovers": n}
                                                 the group's last takeover, kept (no lease)
    shards/<shard>                {"address", "stream", "epoch": t, "member": r}
                                                 held by the same lease: what the buses follow

Values are JSON except the term, a decimal string (so a CAS compares its bytes).

A member process takes ONE lease (``GroupLease``) and binds everything it holds to it:
its member claim, and while it is primary the primary key and the shard record. When the
process dies or stalls past the TTL, etcd drops all of them at once, which is what starts
an election (§5: only when ``primary`` is absent).

- **Term** (§5 rule 1): ``next_term(shard, seen)`` writes ``seen + 1`` if the register
  still holds ``seen`` (absent counts as 0) and no primary key exists; a failed CAS means
  another election started (or ended).
- **Takeover** (§5 rule 4): one transaction that compares the term register with ``t``
  and the absence of both ``primary`` and ``shards/<shard>``, and creates both, bound to
  the lease. At most one member can ever take over in a term, and a newer election that
  moved the register makes an older candidate's takeover fail.
- **Takeover record**: written by the takeover transaction itself, only if it still holds the
  record read just before (compared by mod revision), so it names every takeover's
  predecessor exactly: ``previous`` is the primary of the takeover before (null for the
  group's first term) and ``failovers`` counts the takeovers after the first. What ``oribus
  stats`` shows as the group's last failover and ``/metrics`` as its failover count.
- **Epoch**: the shard record carries ``"epoch": t``. ``EtcdMeta.shards`` reads it as the
  shard's epoch (a record without it is an unreplicated shard's, whose epoch is its create
  revision), so the epoch the bus sends and the sessions' tokens carry is the term, and
  grows with every failover as it grows with every restart today.
- **Primary lease** (§6): ``GroupLease.acked_at`` is the local monotonic time at which the
  last keep-alive that etcd acknowledged was *sent*; etcd's TTL ran from a moment later, so
  ``acked_at + ttl - skew`` is a deadline no earlier than etcd's (``valid_until``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aetcd

from oribus.errors import InvalidRequest, Unavailable
from oribus.meta.cluster_meta import ClaimRefused
from oribus.meta.etcd import EtcdMeta

log = logging.getLogger("oribus.meta.groups")

REPLICA_COUNTS = (1, 3, 5)
MAX_KEEPALIVES_IN_FLIGHT = 3  # keep-alives sent and not yet answered, at most  # a group of R tolerates the loss of (R - 1) // 2 members


def check_replicas(replicas: int) -> int:
    if replicas not in REPLICA_COUNTS:
        raise InvalidRequest(f"replicas must be one of {', '.join(map(str, REPLICA_COUNTS))}, not {replicas}")
    return replicas


@dataclass(frozen=True)
class MemberRecord:
    member: int
    stream: str  # its stream listener: where the other members and the buses reach it
    address: str  # its gRPC listener (health probes, tools)
    revision: int  # the claim's create revision


@dataclass(frozen=True)
class PrimaryRecord:
    member: int
    term: int


@dataclass(frozen=True)
class TakeoverRecord:
    """The group's last takeover (``groups/<shard>/takeover``)."""

    member: int  # the member that became primary
    term: int  # in this term
    at: float  # when, in Unix seconds by the new primary's clock
    previous_member: int | None  # the primary of the takeover before (None: the group's first term)
    previous_term: int | None
    failovers: int  # takeovers after the group's first: its failovers so far

    @property
    def is_failover(self) -> bool:
        """Whether a primary came before this one (the group's first term is no failover)."""
        return self.previous_member is not None

    def next(self, member: int, term: int, at: float) -> TakeoverRecord:
        """The record of the takeover that follows this one."""
        return TakeoverRecord(member, term, at, self.member, self.term, self.failovers + 1)

    def to_json(self) -> bytes:
        previous = (None if self.previous_member is None
                    else {"member": self.previous_member, "term": self.previous_term})
        return json.dumps({"member": self.member, "term": self.term, "at": self.at, "previous": previous,
                           "failovers": self.failovers}).encode()

    @classmethod
    def from_json(cls, value: bytes) -> TakeoverRecord:
        d = _json(value)
        previous = d.get("previous")
        return cls(int(d["member"]), int(d["term"]), float(d["at"]),
                   int(previous["member"]) if previous else None, int(previous["term"]) if previous else None,
                   int(d.get("failovers", 0)))


@dataclass
class GroupLease:
    """A member process's etcd lease, kept alive until ``close``.

    ``acked_at``: monotonic time at which the last keep-alive etcd acknowledged was sent
    (or the lease was granted); ``lost`` is set once etcd says the lease is gone.
    """

    lease: Any  # aetcd.leases.Lease
    ttl: float
    acked_at: float
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    keeper: _KeepAlive | None = None  # the thread that keeps it alive
    clock: Callable[[], float] = time.monotonic

    @property
    def id(self) -> int:
        return int(self.lease.id)

    def valid_until(self, skew: float) -> float:
        """The local monotonic time until which no other member can have taken over (§6)."""
        return self.acked_at + self.ttl - skew

    def valid(self, skew: float) -> bool:
        return not self.lost.is_set() and self.clock() < self.valid_until(skew)


@dataclass
class MemberClaim:
    shard: int
    member: int
    revision: int
    lease: GroupLease


def _json(value: bytes) -> dict:
    d = json.loads(value)
    if not isinstance(d, dict):
        raise ValueError("not a map")
    return d


class EtcdGroups:
    """The replica-group half of the cluster metadata, over ``meta``'s etcd connection."""

    def __init__(self, meta: EtcdMeta) -> None:
        self.meta = meta

    def _key(self, shard: int, *parts: object) -> bytes:
        return self.meta._key("groups", shard, *parts)  # noqa: SLF001 - one prefix rule, EtcdMeta's

    # ---- the lease --------------------------------------------------------------------

    async def lease(self, ttl: int | None = None) -> GroupLease:
        """A new lease of ``ttl`` seconds (default: the meta's), kept alive in the background."""
        ttl = ttl or self.meta.lease_ttl
        sent = time.monotonic()
        lease = await self.meta._call(lambda c: c.lease(ttl))  # noqa: SLF001
        held = GroupLease(lease, float(ttl), sent)
        held.keeper = _KeepAlive(self.meta, held, asyncio.get_running_loop())
        held.keeper.start()
        return held

    async def revoke(self, held: GroupLease) -> None:
        """Give the lease up (a clean stop): everything bound to it goes at once."""
        held.lost.set()
        if held.keeper is not None:
            await held.keeper.stop()
        with contextlib.suppress(Exception):
            await self.meta._call(lambda c: c.revoke_lease(held.id))  # noqa: SLF001

    # ---- the term register ----------------------------------------------------------------

    async def term(self, shard: int) -> int:
        got = await self.meta._call(lambda c: c.get(self._key(shard, "term")))  # noqa: SLF001
        return 0 if got is None else int(got.value)

    async def next_term(self, shard: int, seen: int) -> int | None:
        """Move the register from ``seen`` to ``seen + 1`` if no member is primary; the new
        term, or None if it held something else (another election moved it first) or a
        primary exists."""
        key, primary = self._key(shard, "term"), self._key(shard, "primary")
        new = str(seen + 1).encode()

        async def txn(c: aetcd.Client) -> Any:
            same = (c.transactions.create(key) == 0) if seen == 0 else (c.transactions.value(key) == str(seen))
            # only while nobody is primary: a candidate that saw the key absent a moment ago must
            # not move the register past a primary that took over meanwhile (its followers would
            # adopt the new term at their next start and depose it for nothing)
            return await c.transaction(compare=[same, c.transactions.create(primary) == 0],
                                       success=[c.transactions.put(key, new)], failure=[])

        ok, _ = await self.meta._call(txn)  # noqa: SLF001
        return seen + 1 if ok else None

    # ---- members --------------------------------------------------------------------------

    async def claim_member(self, shard: int, member: int, held: GroupLease, *, stream: str,
                           address: str = "") -> MemberClaim:
        """Claim member id ``member`` of group ``shard`` for this process; ClaimRefused if held."""
        key = self._key(shard, "members", member)
        value = json.dumps({"stream": stream, "address": address}).encode()

        async def txn(c: aetcd.Client) -> Any:
            return await c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, value, lease=held.lease)],
                failure=[c.transactions.get(key)],
            )

        try:
            created, responses = await self.meta._call(txn)  # noqa: SLF001
        except Unavailable as e:
            raise ClaimRefused(f"cannot claim member {member} of shard {shard}: {e.message}") from e
        if not created:
            holder = _json(responses[0][0][0]).get("stream", "?")
            raise ClaimRefused(f"member {member} of shard {shard} is already claimed by the process at {holder}; "
                               "two processes must never be one member")
        revision = int(responses[0].response_put.header.revision)
        log.info("claimed member %d of shard %d (stream %s)", member, shard, stream)
        return MemberClaim(shard, member, revision, held)

    async def claim_free_member(self, shard: int, replicas: int, held: GroupLease, *, stream: str,
                                address: str = "") -> MemberClaim:
        """Claim the lowest member id of ``0 .. replicas - 1`` nobody holds."""
        for member in range(replicas):
            with contextlib.suppress(ClaimRefused):
                return await self.claim_member(shard, member, held, stream=stream, address=address)
        raise ClaimRefused(f"every member id of shard {shard} (0..{replicas - 1}) is claimed by a live process")

    async def update_member(self, claim: MemberClaim, *, stream: str, address: str = "") -> None:
        key = self._key(claim.shard, "members", claim.member)
        value = json.dumps({"stream": stream, "address": address}).encode()

        async def txn(c: aetcd.Client) -> Any:
            return await c.transaction(compare=[c.transactions.create(key) == claim.revision],
                                       success=[c.transactions.put(key, value, lease=claim.lease.lease)],
                                       failure=[])

        ok, _ = await self.meta._call(txn)  # noqa: SLF001
        if not ok:
            raise ClaimRefused(f"the claim on member {claim.member} of shard {claim.shard} is gone")

    async def release_member(self, claim: MemberClaim) -> None:
        key = self._key(claim.shard, "members", claim.member)

        async def txn(c: aetcd.Client) -> Any:
            return await c.transaction(compare=[c.transactions.create(key) == claim.revision],
                                       success=[c.transactions.delete(key)], failure=[])

        with contextlib.suppress(Exception):
            await self.meta._call(txn)  # noqa: SLF001

    async def members(self, shard: int) -> dict[int, MemberRecord]:
        prefix = self._key(shard, "members", "")
        got = await self.meta._call(lambda c: c.get_prefix(prefix))  # noqa: SLF001
        out = {}
        for kv in got:
            try:
                r = int(kv.key[len(prefix):].decode())
                d = _json(kv.value)
                out[r] = MemberRecord(r, str(d.get("stream", "")), str(d.get("address", "")),
                                      int(kv.create_revision))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring malformed member record %r", kv.key)
        return out

    # ---- the primary --------------------------------------------------------------------

    async def primary(self, shard: int) -> PrimaryRecord | None:
        got = await self.meta._call(lambda c: c.get(self._key(shard, "primary")))  # noqa: SLF001
        if got is None:
            return None
        try:
            d = _json(got.value)
            return PrimaryRecord(int(d["member"]), int(d["term"]))
        except (ValueError, KeyError, TypeError):
            log.warning("malformed primary record of shard %d: %r", shard, got.value)
            return None

    async def take_over(self, shard: int, term: int, member: int, held: GroupLease, *, address: str,
                        stream: str) -> bool:
        """§5 rule 4: become shard ``shard``'s primary in ``term``, if the register still holds
        ``term`` and nobody is primary; also claims ``shards/<shard>`` for the buses, with the
        term as its epoch, and writes the takeover record (module docstring). True if this
        member is now the primary."""
        term_key, primary_key = self._key(shard, "term"), self._key(shard, "primary")
        shard_key, takeover_key = self.meta._key("shards", shard), self._key(shard, "takeover")  # noqa: SLF001
        primary = json.dumps({"member": member, "term": term}).encode()
        record = {"address": address, "epoch": term, "member": member}
        if stream:
            record["stream"] = stream
        last, last_revision = await self._takeover(shard)
        takeover = (last.next(member, term, time.time()) if last is not None
                    else TakeoverRecord(member, term, time.time(), None, None, 0))

        async def txn(c: aetcd.Client) -> Any:
            t = c.transactions
            return await c.transaction(
                compare=[t.value(term_key) == str(term), t.create(primary_key) == 0, t.create(shard_key) == 0,
                         t.mod(takeover_key) == last_revision],
                success=[t.put(primary_key, primary, lease=held.lease),
                         t.put(shard_key, json.dumps(record).encode(), lease=held.lease),
                         t.put(takeover_key, takeover.to_json())],
                failure=[],
            )

        ok, _ = await self.meta._call(txn)  # noqa: SLF001
        if ok:
            log.warning("member %d is shard %d's primary in term %d", member, shard, term)
        return bool(ok)

    async def takeover(self, shard: int) -> TakeoverRecord | None:
        """The group's last takeover (None: it never had a primary)."""
        return (await self._takeover(shard))[0]

    async def _takeover(self, shard: int) -> tuple[TakeoverRecord | None, int]:
        """The takeover record and its mod revision (0: absent; a malformed record reads as
        absent, so the next takeover replaces it)."""
        got = await self.meta._call(lambda c: c.get(self._key(shard, "takeover")))  # noqa: SLF001
        if got is None:
            return None, 0
        try:
            return TakeoverRecord.from_json(got.value), int(got.mod_revision)
        except (ValueError, KeyError, TypeError):
            log.warning("malformed takeover record of shard %d: %r", shard, got.value)
            return None, int(got.mod_revision)

    async def resign(self, shard: int, term: int, member: int) -> None:
        """Delete the primary key and the shard record if they are still this member's in
        ``term`` (a clean step-down: an election may start at once)."""
        primary_key, shard_key = self._key(shard, "primary"), self.meta._key("shards", shard)  # noqa: SLF001
        mine = json.dumps({"member": member, "term": term}).encode()

        async def txn(c: aetcd.Client) -> Any:
            t = c.transactions
            return await c.transaction(compare=[t.value(primary_key) == mine],
                                       success=[t.delete(primary_key), t.delete(shard_key)], failure=[])

        with contextlib.suppress(Exception):
            await self.meta._call(txn)  # noqa: SLF001

    async def watch(self, shard: int, poll_seconds: float = 1.0) -> AsyncIterator[bool]:
        """Yields True now, then True after every change under ``groups/<shard>/`` and False
        every ``poll_seconds`` without one (the caller re-reads what it needs now and then
        anyway: a broken watch then costs a delay, never a missed change)."""
        changed = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(
            self.meta._watch_prefix(self._key(shard, ""), changed))  # noqa: SLF001
        try:
            yield True
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), poll_seconds)
                fired = changed.is_set()
                changed.clear()
                yield fired
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher


class _KeepAlive(threading.Thread):
    """Keeps one lease alive from a thread of its own, over an etcd connection of its own.

    A keep-alive every ``ttl / 4``, each in a task of its own (one that etcd answers late does
    not hold back the next; the primary lease counts from the latest one answered). In a
    thread, because a primary under load keeps its event loop busy for long stretches: its
    keep-alives, sent from that loop, went out up to a second late, and a short TTL ran out
    on a primary that was alive and well (``benchmarks/failover.py``). The thread needs only
    the GIL now and then. ``acked_at`` is a float written whole; ``lost`` is set on the
    owner's loop.
    """

    def __init__(self, meta: EtcdMeta, held: GroupLease, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name=f"oribus-lease-{held.id:x}", daemon=True)
        self.endpoints = ",".join(f"{h}:{p}" for h, p in meta.endpoints)
        self.cluster = meta.cluster
        self.timeout = meta.timeout
        self.held = held
        self.owner = loop
        self.stopping = threading.Event()

    def run(self) -> None:
        asyncio.run(self._keep())

    async def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self.join, 5.0)

    def _expired(self) -> None:
        with contextlib.suppress(RuntimeError):  # the owner's loop is closed: nobody to tell
            self.owner.call_soon_threadsafe(self.held.lost.set)

    async def _keep(self) -> None:
        held = self.held
        meta = EtcdMeta(self.endpoints, self.cluster, timeout=self.timeout)
        period = max(0.2, held.ttl / 4)
        in_flight: set[asyncio.Task] = set()
        failing: list[float] = []  # when the keep-alives began failing (empty: they do not)
        done = asyncio.Event()

        async def refresh(sent: float) -> None:
            try:
                reply = await meta._call(lambda c: c.refresh_lease(held.id))  # noqa: SLF001
            except Unavailable as e:
                failing[:] = failing or [sent]
                log.error("etcd unreachable for %.1fs, cannot keep lease %x: %s", sent - failing[0], held.id,
                          e.message)
                return
            failing.clear()
            took = time.monotonic() - sent
            if took > held.ttl / 4:  # what eats the primary lease: say so
                log.warning("etcd answered a keep-alive of lease %x after %.2fs (TTL %gs)", held.id, took, held.ttl)
            if reply is None or reply.TTL <= 0:
                if not done.is_set():
                    log.critical("lease %x expired in etcd: every claim bound to it is gone", held.id)
                done.set()
                self._expired()
                return
            held.acked_at = max(held.acked_at, sent)

        try:
            while not (self.stopping.is_set() or done.is_set()):
                due = time.monotonic() + period
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), period)
                late = time.monotonic() - due
                if late > held.ttl / 4:
                    log.warning("keep-alive of lease %x sent %.2fs late", held.id, late)
                if len(in_flight) < MAX_KEEPALIVES_IN_FLIGHT and not self.stopping.is_set():
                    task = asyncio.get_running_loop().create_task(refresh(time.monotonic()))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
        finally:
            for task in list(in_flight):
                task.cancel()
            with contextlib.suppress(Exception):
                await meta.close()
