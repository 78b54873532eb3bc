"""A member of a shard's replica group: the body of ``oribus shard`` when the cluster has ``replicas`` > 1.

``specs/replication.md`` §5–§7. The process runs one member (``ReplicaMember``, the data
path) and this role machine (``oribus.hosts.roles``) around it; etcd (``oribus.meta.groups``)
decides who leads. Nobody ever promotes a member by hand.

What a member process does, in order:

1. locks its data directory and binds its listeners: gRPC (health, tools) and the stream
   listener, which serves both the bus's ``oribus.v1.Shard`` (answered only while this
   member is the serving primary) and the group's ``oribus.v1.Replica`` (answered once the
   member is open) — one stream port per process;
2. **JOINING**: takes one etcd lease and claims its member id on it — ``--member``, else the
   id its data directory's MANIFEST names, else the lowest free id — with its stream address;
   reads the term register and opens the member with it as its promised term (a member whose
   promise was on a lost disk still refuses a deposed primary, §7), then reports SERVING;
3. **FOLLOWER**: takes what the primary ships; watches ``groups/<shard>/``. When the primary
   key is absent (the primary's lease expired, or it resigned) and it is a voter, it waits a
   stagger (its member id × ``ELECTION_STAGGER``, so that the lowest ids, preferred on ties,
   usually go first) and, if still absent, becomes a candidate. An ``elect`` call from a
   candidate that found this member the most complete makes it a candidate at once, in that
   candidate's term;
4. **CANDIDATE**: once a majority of voters answer (``_voters_reachable``; too few for a lease TTL:
   it says so in its log, naming the learners and the silent ones), moves the term register by CAS (a failed CAS: another election runs — back
   to following), asks every member for a promise, and ``decide``s: take over (the etcd
   takeover transaction, then ``become_primary``: ``TERM_START`` committed on a majority,
   recovery as a restarted shard, the restart grace but for a brand-new group), defer to the
   most complete member (told by ``elect``), or go back to following;
5. **PRIMARY**: serves the bus's calls, each checked against the **primary lease** — the
   etcd lease counted on this process's monotonic clock from the sending of the last
   keep-alive etcd acknowledged, less the clock-skew bound (``GroupLease.valid``) — and the
   epoch the bus expects (the term). Past the lease it answers ``Unavailable`` to everything
   and steps down. It also steps down when deposed (a member answered with a higher term:
   ``ReplicaMember.on_deposed``) or on shutdown, resigning in etcd so an election starts at
   once.

A lost lease (etcd says so) sends any role back to JOINING: a new lease, the same member id
claimed again. SIGINT/SIGTERM stops the member cleanly (a primary resigns first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oribus.contract import ensure_subscribed
from oribus.datadir_lock import DataDirLock
from oribus.errors import DataCorrupted, InvalidRequest, OribusError, Unavailable
from oribus.hosts.group_stats import collect_group
from oribus.hosts.lifecycle import Teardown, cancel_and_wait
from oribus.hosts.roles import Outcome, Role, RoleMachine, decide, majority
from oribus.messages import Change, WatchRequest
from oribus.meta.cluster_meta import ClaimRefused
from oribus.meta.etcd import EtcdMeta
from oribus.meta.groups import EtcdGroups, GroupLease, MemberClaim
from oribus.rpc import shard_codec, wire
from oribus.rpc.mux_server import GrpcListener, mux_handlers
from oribus.rpc.replica_client import StreamPeer
from oribus.rpc.replica_codec import REPLICA_OPS, REPLICA_SERVICE, MemberStatus
from oribus.rpc.stream_server import StreamListener
from oribus.shards.config import ShardConfig
from oribus.shards.manifest import read_manifest
from oribus.shards.replica import (
    AppendBatch,
    AppendReply,
    PromiseReply,
    ReplicaMember,
    SnapshotChunk,
)
from oribus.shards.replica.primary import ReplicationOptions
from oribus.shards.shard import Shard
from oribus.tls import TlsConfig, server_credentials, server_ssl_context

log = logging.getLogger("oribus.hosts.replica")

ELECTION_STAGGER = 0.15  # seconds per member id a follower waits before it stands (ties go to low ids)
NO_QUORUM_BACKOFF = 0.5  # seconds before a candidate that found no majority stands again
NO_QUORUM_REPORT_SECONDS = 10.0  # how often a member that finds too few voters to stand says so ...
# ... once that has lasted a lease TTL (not while a new group's members are still opening)
SESSION_SWEEP_SECONDS = 5.0  # how often the primary expires idle sessions and leases
PEER_REFRESH_SECONDS = 0.5  # how often a primary reads the members' addresses from etcd
FOLLOWER_TICK = 0.1  # how often a follower looks at its stagger, its lease and an elect call
FOLLOWER_REREAD_SECONDS = 1.0  # how often a follower re-reads the group in etcd without a change


@dataclass
class ReplicaConfig:
    """One member process (``oribus shard --etcd ...`` on a cluster with replicas > 1)."""

    shard: ShardConfig  # the shard's configuration; its data_dir is this member's directory
    listen: str  # gRPC listener, HOST:PORT (port 0: a free one)
    stream_listen: str  # stream listener (the bus's calls and the group's replication)
    advertise: str = ""  # the gRPC address the others reach this one at ("": as bound)
    advertise_stream: str = ""  # the stream address the others reach this one at ("": as bound)
    member: int | None = None  # --member; None: the data directory's, else the lowest free id
    takeover_seconds: float = 0.0  # how long become_primary may take (0: twice the lease TTL)
    options: ReplicationOptions = field(default_factory=ReplicationOptions)
    tls: TlsConfig | None = None
    ready_file: Path | None = None  # gets the gRPC and stream addresses once the member has joined


class _GroupPeers:
    """Every other member of the group as a ``Peer``, at the address its claim in etcd names now.

    A member that restarts on another address is reached there from the next call on; one
    that holds no claim is ``Unavailable``."""

    def __init__(self, me: int, replicas: int, tls: TlsConfig | None) -> None:
        self.me = me
        self.tls = tls
        self.addresses: dict[int, str] = {}
        self.peers = [_BookPeer(self, m) for m in range(replicas) if m != me]
        self._clients: dict[int, StreamPeer] = {}

    def update(self, addresses: dict[int, str]) -> None:
        self.addresses = addresses

    def client(self, member: int) -> StreamPeer:
        address = self.addresses.get(member, "")
        if not address:
            raise Unavailable(f"member {member} holds no claim in etcd")
        peer = self._clients.get(member)
        if peer is None or peer.address != address:
            if peer is not None:
                asyncio.get_running_loop().create_task(peer.close())
            peer = self._clients[member] = StreamPeer(member, address, tls=self.tls)
        return peer

    async def close(self) -> None:
        for peer in self._clients.values():
            await peer.close()
        self._clients.clear()


class _BookPeer:
    """One member of ``_GroupPeers`` (implements ``Peer``)."""

    def __init__(self, book: _GroupPeers, member_id: int) -> None:
        self.book = book
        self.member_id = member_id

    async def append(self, batch: AppendBatch) -> AppendReply:
        return await self.book.client(self.member_id).append(batch)

    async def promise(self, term: int, candidate: int) -> PromiseReply:
        return await self.book.client(self.member_id).promise(term, candidate)

    async def install_snapshot(self, chunk: SnapshotChunk) -> AppendReply:
        return await self.book.client(self.member_id).install_snapshot(chunk)

    async def elect(self, term: int, candidate: int) -> bool:
        return await self.book.client(self.member_id).elect(term, candidate)


def manifest_member(data_dir: Path) -> int | None:
    """The member id the data directory's MANIFEST names (None: none, or unreadable)."""
    try:
        manifest = read_manifest(data_dir)
    except (DataCorrupted, OSError):
        return None
    return getattr(manifest, "member", None) if manifest is not None else None


class ReplicaHost:
    """One member process: ``await start()``, then ``await run(stop)`` until ``stop`` is set."""

    def __init__(self, config: ReplicaConfig, meta: EtcdMeta, *, dir_lock: DataDirLock | None = None) -> None:
        self.config = config
        self.shard_id = config.shard.shard_id
        self.meta = meta
        self.groups = EtcdGroups(meta)
        self.roles = RoleMachine()
        self.replicas = 0  # from the cluster's configuration
        self.skew = config.shard.clock_skew_seconds
        self.member: ReplicaMember | None = None
        self.member_id = -1
        self.lease: GroupLease | None = None
        self.claim: MemberClaim | None = None
        self.peers: _GroupPeers | None = None
        self.primary_member = -1  # the primary as this member last saw it (-1: none)
        self.term = 0  # the term this member serves as primary (0: not primary)
        self.shard: Shard | None = None  # the serving Shard while primary
        self._shard_ops: dict[str, wire.Handler] = {}
        self._deposed = asyncio.Event()
        self._elect_hint: int = 0  # a term a candidate told this member to stand in
        self._dir_lock = dir_lock
        self._grpc: GrpcListener | None = None
        self._stream: StreamListener | None = None
        self._grpc_counters: dict[str, int] = {}
        self._teardown = Teardown(log)
        self.failovers = 0  # times this member became primary
        self.primary_since = 0.0  # wall-clock time it last began serving as primary (0: never)
        self.joined = asyncio.Event()
        self._no_quorum_since = -1.0  # loop time since which too few voters answer it (-1: enough do)
        self._no_quorum_reported = -1.0  # loop time it last said so (-1: not since then)

    # ---- start ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._grpc.address if self._grpc is not None else ""

    @property
    def stream_address(self) -> str:
        return self._stream.address if self._stream is not None else ""

    def advertised(self) -> tuple[str, str]:
        """(gRPC, stream) addresses the others reach this member at."""
        grpc_address = self.config.advertise or self.address
        stream = self.config.advertise_stream
        if not stream:
            bound = self.stream_address
            stream = (f"{self.config.advertise.rsplit(':', 1)[0]}:{bound.rsplit(':', 1)[1]}"
                      if self.config.advertise and not bound.startswith("unix:") else bound)
        return grpc_address, stream

    async def start(self) -> None:
        """Bind the listeners and join the group (JOINING → FOLLOWER)."""
        async with self._teardown.stop_on_error():
            cluster = await self.meta.config()
            if not 0 <= self.shard_id < cluster.shards:
                raise InvalidRequest(f"shard id {self.shard_id} is outside the cluster's 0..{cluster.shards - 1}")
            self.replicas = cluster.replicas
            if self.config.member is not None and not 0 <= self.config.member < self.replicas:
                raise InvalidRequest(f"member id {self.config.member} is outside the group's 0..{self.replicas - 1}")
            if self._dir_lock is None:
                self._dir_lock = DataDirLock.acquire(self.config.shard.data_dir)
                self._teardown.push("data directory lock", self._dir_lock.release)
            await self._listen()
            await self._join()

    async def _listen(self) -> None:
        tls = self.config.tls
        credentials = server_credentials(tls) if tls is not None else None
        context = server_ssl_context(tls) if tls is not None else None
        ops: dict[str, wire.Handler] = {name: self._shard_call(name) for name in shard_codec.SHARD_OPS}
        replica_ops = wire.bind_ops(self, REPLICA_OPS)
        self._stream = StreamListener(self.config.stream_listen, wire.SHARD_SERVICE, ops, watch=self._watch,
                                      ssl=context, more={REPLICA_SERVICE: replica_ops})
        await self._stream.start()
        self._teardown.push("stream listener", self._stream.stop, graceful=True)
        handler = mux_handlers(wire.SHARD_SERVICE, ops, watch=self._watch, counters=self._grpc_counters)
        self._grpc = GrpcListener(self.config.listen, wire.SHARD_SERVICE, handler, credentials=credentials)
        await self._grpc.start(serving=False)
        self._teardown.push("gRPC listener", self._grpc.stop, graceful=True)

    async def _join(self) -> None:
        """JOINING: a lease, the member id, the term register, the member opened."""
        grpc_address, stream = self.advertised()
        self.lease = await self.groups.lease()
        lease = self.lease
        self._teardown.push("etcd lease", lambda: self.groups.revoke(lease))
        wanted = self.config.member if self.config.member is not None else (
            self.member_id if self.member_id >= 0 else manifest_member(self.config.shard.data_dir))
        if wanted is not None:
            if not 0 <= wanted < self.replicas:
                raise InvalidRequest(f"member id {wanted} is outside the group's 0..{self.replicas - 1}")
            self.claim = await self._claim_waiting(wanted, stream, grpc_address)
        else:
            self.claim = await self.groups.claim_free_member(self.shard_id, self.replicas, lease, stream=stream,
                                                             address=grpc_address)
        self.member_id = self.claim.member
        term = await self.groups.term(self.shard_id)
        if self.member is None:
            self.member = await ReplicaMember.open(self.config.shard.data_dir, self.shard_id, self.member_id,
                                                   self.replicas, config=self.config.shard, term_register=term,
                                                   options=self.config.options, dir_lock=self._dir_lock)
            self.member.on_deposed = self._on_deposed
            self._teardown.push(f"member {self.member_id}", self.member.close)
            self.peers = _GroupPeers(self.member_id, self.replicas, self.config.tls)
            self._teardown.push("connections to the other members", self.peers.close)
        else:
            self.member.set_promised_term(term)
        self.roles.move(Role.FOLLOWER)
        log.info("shard %d member %d joined (term register %d, %s, last position %s)", self.shard_id,
                 self.member_id, term, "voter" if self.member.voter else "learner", self.member.last_position)
        if not self.joined.is_set():
            self.joined.set()
            assert self._grpc is not None
            await self._grpc.serving()
            if self.config.ready_file is not None:
                tmp = self.config.ready_file.with_suffix(".tmp")
                tmp.write_text(f"{self.address}\n{self.stream_address}")
                tmp.replace(self.config.ready_file)

    async def _claim_waiting(self, member: int, stream: str, address: str) -> MemberClaim:
        """Claim ``member``; while another lease holds it (a killed process's, until its TTL runs
        out) keep trying for up to twice the TTL."""
        assert self.lease is not None
        deadline = asyncio.get_running_loop().time() + 2 * self.lease.ttl + 1
        while True:
            try:
                return await self.groups.claim_member(self.shard_id, member, self.lease, stream=stream,
                                                      address=address)
            except ClaimRefused:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.25)

    # ---- the role machine -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run the role machine until ``stop`` is set; then stop everything (a primary resigns)."""
        machine = asyncio.get_running_loop().create_task(self._roles())
        stopping = asyncio.get_running_loop().create_task(stop.wait())
        try:
            await asyncio.wait({machine, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if machine.done():
                machine.result()  # a failure of the machine itself ends the process
        finally:
            stopping.cancel()
            await cancel_and_wait(machine)
            await self.stop()

    async def stop(self) -> None:
        if self.roles.role is Role.PRIMARY:
            await self._leave_primary("shutting down")
        if self.claim is not None:
            await self.groups.release_member(self.claim)
        await self._teardown.stop()

    async def _roles(self) -> None:
        while True:
            role = self.roles.role
            try:
                if role is Role.JOINING:
                    await self._rejoin()
                elif role is Role.FOLLOWER:
                    await self._follow()
                elif role is Role.CANDIDATE:
                    await self._stand()
                else:
                    await self._lead()
            except Unavailable as e:  # etcd or a peer could not be reached: try again shortly
                log.warning("shard %d member %d (%s): %s", self.shard_id, self.member_id, role.value, e.message)
                if self.roles.role is Role.CANDIDATE:
                    self.roles.move(Role.FOLLOWER)
                await asyncio.sleep(0.5)

    def _lease_lost(self) -> bool:
        return self.lease is None or self.lease.lost.is_set()

    async def _rejoin(self) -> None:
        """The lease was lost: a new one, the same member id claimed again."""
        log.warning("shard %d member %d lost its etcd lease; joining again", self.shard_id, self.member_id)
        try:
            await self._join()
        except ClaimRefused as e:
            raise ClaimRefused(f"member {self.member_id} of shard {self.shard_id} was taken over: {e}") from e

    async def _follow(self) -> None:
        assert self.member is not None and self.lease is not None
        stagger = ELECTION_STAGGER * self.member_id + random.uniform(0, ELECTION_STAGGER / 2)
        absent_since: float | None = None
        loop = asyncio.get_running_loop()
        read_at = -1.0
        watch = self.groups.watch(self.shard_id, poll_seconds=FOLLOWER_TICK)
        try:
            async for changed in watch:
                if self._lease_lost():
                    self.roles.move(Role.JOINING)
                    return
                if self._elect_hint:
                    self.roles.move(Role.CANDIDATE)
                    return
                now = loop.time()
                # etcd is read on a change, while no primary is known, and every second anyway
                if changed or absent_since is not None or now - read_at >= FOLLOWER_REREAD_SECONDS:
                    read_at = now
                    await self._refresh_peers()
                    primary = await self.groups.primary(self.shard_id)
                    self.primary_member = primary.member if primary is not None else -1
                if self.primary_member >= 0 or not self.member.voter:
                    absent_since = None
                    self._no_quorum_since = self._no_quorum_reported = -1.0
                    continue
                absent_since = absent_since if absent_since is not None else now
                if now - absent_since >= stagger:
                    self.roles.move(Role.CANDIDATE)
                    return
        finally:
            await watch.aclose()  # type: ignore[attr-defined]

    async def _refresh_peers(self) -> None:
        assert self.peers is not None
        members = await self.groups.members(self.shard_id)
        self.peers.update({m: r.stream for m, r in members.items()})

    async def _stand(self) -> None:
        """CANDIDATE: a term, the promises, the decision (§5)."""
        assert self.member is not None and self.lease is not None and self.peers is not None
        hint, self._elect_hint = self._elect_hint, 0
        await self._refresh_peers()
        if not hint and not await self._voters_reachable():
            self.roles.move(Role.FOLLOWER)
            await asyncio.sleep(NO_QUORUM_BACKOFF)
            return
        if hint:
            term = hint if await self.groups.term(self.shard_id) == hint else 0
        else:
            term = await self.groups.next_term(self.shard_id, await self.groups.term(self.shard_id)) or 0
        if not term or await self.groups.primary(self.shard_id) is not None:
            self.roles.move(Role.FOLLOWER)  # another election moved the register, or a primary exists
            return
        own = await self.member.promise(term, self.member_id)
        if not own.granted:
            self.roles.move(Role.FOLLOWER)
            return
        answers = await asyncio.gather(*(self._ask(p.member_id, term) for p in self.peers.peers))
        promises = {m: reply for m, reply in answers if reply is not None}
        decision = decide(self.replicas, self.member_id, own.last, own.voter, term, promises)
        log.info("shard %d member %d, candidate in term %d at %s: %s (promises %s)", self.shard_id,
                 self.member_id, term, own.last, decision,
                 {m: (p.granted, p.voter, p.last) for m, p in promises.items()})
        if decision.outcome is Outcome.TAKE_OVER:
            await self._take_over(term)
            return
        self.roles.move(Role.FOLLOWER)
        if decision.outcome is Outcome.DEFER:
            with contextlib.suppress(OribusError):
                await self.peers.client(decision.to).elect(term, self.member_id)
        elif decision.outcome is Outcome.ABANDON:
            self.member.set_promised_term(decision.newer_term)
        else:
            await asyncio.sleep(NO_QUORUM_BACKOFF)

    async def _voters_reachable(self) -> bool:
        """Whether a majority of voters (this one included) answer now — asked before the term
        register is moved, so that a member alone does not move it again and again. It also
        lets a new group form: its members open as voters only while the register is still 0
        (``ReplicaMember.open``), so the first term is allocated only once a majority of them
        have opened."""
        assert self.peers is not None and self.member is not None

        async def voter(member: int) -> bool | None:
            assert self.peers is not None
            try:
                return (await self.peers.client(member).status()).voter
            except OribusError:
                return None

        ids = [p.member_id for p in self.peers.peers]
        answers = dict(zip(ids, await asyncio.gather(*(voter(m) for m in ids)), strict=True))
        voters = int(self.member.voter) + sum(1 for a in answers.values() if a)
        if voters >= majority(self.replicas):
            self._no_quorum_since = self._no_quorum_reported = -1.0
            return True
        self._report_no_quorum(voters, answers)
        return False

    def _report_no_quorum(self, voters: int, answers: dict[int, bool | None]) -> None:
        """Say why no election starts, once that has lasted a lease TTL and then at most every
        ``NO_QUORUM_REPORT_SECONDS``: a group with too few voters stays without a primary until
        enough of them are back, and a learner becomes a voter only by catching up from a primary
        (§7) — a group that lost a majority of its complete copies waits for them rather than
        electing an incomplete member."""
        assert self.lease is not None
        now = asyncio.get_running_loop().time()
        if self._no_quorum_since < 0:
            self._no_quorum_since = now
        if now - self._no_quorum_since < self.lease.ttl or (
                self._no_quorum_reported >= 0 and now - self._no_quorum_reported < NO_QUORUM_REPORT_SECONDS):
            return
        self._no_quorum_reported = now

        def names(which: list[int]) -> str:
            return ", ".join(map(str, which)) or "none"

        log.warning("shard %d member %d: no primary, and %d of the group's %d members answer as voters (a majority "
                    "is %d; learners: %s; not answering: %s): no election until a majority of voters is back",
                    self.shard_id, self.member_id, voters, self.replicas, majority(self.replicas),
                    names(sorted(m for m, a in answers.items() if a is False)),
                    names(sorted(m for m, a in answers.items() if a is None)))

    async def _ask(self, member: int, term: int) -> tuple[int, PromiseReply | None]:
        assert self.peers is not None
        try:
            return member, await self.peers.client(member).promise(term, self.member_id)
        except OribusError as e:
            log.info("shard %d member %d: no promise from member %d: %s", self.shard_id, self.member_id, member,
                     e.message)
            return member, None

    async def _take_over(self, term: int) -> None:
        assert self.member is not None and self.lease is not None and self.peers is not None
        grpc_address, stream = self.advertised()
        if not await self.groups.take_over(self.shard_id, term, self.member_id, self.lease,
                                           address=grpc_address, stream=stream):
            self.roles.move(Role.FOLLOWER)
            return
        self.roles.move(Role.PRIMARY)
        self.term = term
        self._deposed.clear()
        timeout = self.config.takeover_seconds or 2 * self.lease.ttl
        try:
            shard = await asyncio.wait_for(self.member.become_primary(term, self.peers.peers), timeout)
        except (OribusError, TimeoutError) as e:
            log.error("shard %d member %d could not begin term %d: %s", self.shard_id, self.member_id, term,
                      getattr(e, "message", None) or type(e).__name__)
            await self._leave_primary(f"term {term} did not begin")
            return
        self.shard = shard
        ops = {name: op for name, op in wire.bind_ops(shard, shard_codec.SHARD_OPS).items()}
        ops["stats"] = self._stats
        self._shard_ops = ops
        self.failovers += 1
        self.primary_since = time.time()
        log.warning("shard %d member %d serves as primary of term %d", self.shard_id, self.member_id, term)

    async def _lead(self) -> None:
        """PRIMARY: serve until deposed, the lease runs out, or the member stepped down."""
        assert self.member is not None and self.lease is not None
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + SESSION_SWEEP_SECONDS
        next_peers = loop.time() + PEER_REFRESH_SECONDS
        while True:
            if self._deposed.is_set():
                await self._leave_primary("deposed by a higher term")
                return
            if not self.lease.valid(self.skew):
                ago = self.lease.clock() - self.lease.acked_at
                await self._leave_primary(f"its primary lease ran out (the last keep-alive etcd acknowledged "
                                          f"was sent {ago:.2f}s ago; TTL {self.lease.ttl:g}s)")
                return
            if not self.member.is_primary:
                await self._leave_primary("the member stepped down")
                return
            if loop.time() >= next_sweep and self.shard is not None:
                self.shard.expire_sessions()
                self.shard.expire_leases()
                next_sweep = loop.time() + SESSION_SWEEP_SECONDS
            if loop.time() >= next_peers:  # a member that restarted elsewhere is shipped to there
                next_peers = loop.time() + PEER_REFRESH_SECONDS
                with contextlib.suppress(Unavailable):
                    await self._refresh_peers()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._deposed.wait(), 0.05)

    async def _leave_primary(self, why: str) -> None:
        """Stop serving (every call is Unavailable from now on), step the member down, resign."""
        term = self.term
        log.warning("shard %d member %d steps down from term %d: %s", self.shard_id, self.member_id, term, why)
        self.shard = None
        self._shard_ops = {}
        self.term = 0
        if self.member is not None:
            with contextlib.suppress(Exception):
                await self.member.step_down()
        if not self._lease_lost():
            with contextlib.suppress(Exception):
                await self.groups.resign(self.shard_id, term, self.member_id)
        if self.roles.role is Role.PRIMARY:
            self.roles.move(Role.JOINING if self._lease_lost() else Role.FOLLOWER)

    def _on_deposed(self, term: int) -> None:
        log.warning("shard %d member %d learnt of term %d: deposed", self.shard_id, self.member_id, term)
        self._deposed.set()

    # ---- what the other members call (oribus.v1.Replica) -----------------------------------

    def _open_member(self) -> ReplicaMember:
        if self.member is None:
            raise Unavailable(f"shard {self.shard_id}: this member has not joined its group yet")
        return self.member

    async def append(self, batch: AppendBatch) -> AppendReply:
        return await self._open_member().append(batch)

    async def promise(self, term: int, candidate: int) -> PromiseReply:
        return await self._open_member().promise(term, candidate)

    async def install_snapshot(self, chunk: SnapshotChunk) -> AppendReply:
        return await self._open_member().install_snapshot(chunk)

    async def status(self) -> MemberStatus:
        member = self._open_member()
        return MemberStatus(self.member_id, self.roles.role.value, member.promised_term, member.voter,
                            member.last_position, self.member_id if self.term else self.primary_member,
                            member.commit_lsn, member.applied_lsn)

    async def elect(self, term: int, candidate: int) -> bool:
        """A candidate of ``term`` found this member the most complete of a majority (§5 rule 3)."""
        member = self._open_member()
        if self.roles.role is not Role.FOLLOWER or not member.voter or term < member.promised_term:
            return False
        log.info("shard %d member %d: member %d defers to it in term %d", self.shard_id, self.member_id,
                 candidate, term)
        self._elect_hint = term
        return True

    # ---- what the bus calls (oribus.v1.Shard): only the serving primary answers -------------

    def _serving(self, args: Any) -> dict[str, wire.Handler]:
        """The serving primary's handlers, or Unavailable: not the primary, past the primary
        lease (§6), or the caller expects another epoch (term)."""
        if self.shard is None or not self._shard_ops or self.roles.role is not Role.PRIMARY:
            raise Unavailable(f"shard {self.shard_id} member {self.member_id} is not the serving primary "
                              f"(primary: member {self.primary_member})", shard=self.shard_id)
        if self.lease is None or not self.lease.valid(self.skew):
            raise Unavailable(f"shard {self.shard_id} member {self.member_id}: its primary lease ran out",
                              shard=self.shard_id)
        expected = args.get(shard_codec.FENCE) if isinstance(args, dict) else None
        if expected is not None and expected != self.term:
            raise Unavailable(
                f"shard {self.shard_id} is at epoch {self.term}, the caller expects epoch {expected}: one of the "
                "two has a stale view of the cluster; refusing", shard=self.shard_id, epoch=self.term,
                expected=expected)
        return self._shard_ops

    def _shard_call(self, name: str) -> wire.Handler:
        async def call(args: Any) -> Any:
            return await self._serving(args)[name](args)

        call.__name__ = name
        return call

    async def _stats(self, args: Any) -> Any:
        assert self.shard is not None
        out = await self.shard.stats()
        transport = {"grpc": dict(self._grpc_counters)}
        if self._stream is not None:
            transport["stream"] = dict(self._stream.counters)
        replica = self.member.status() if self.member is not None else {}
        return {**out, "transport": transport,
                "replica": {**replica, "failovers": self.failovers, "primary_since": self.primary_since},
                "group": await collect_group(self)}

    async def _watch(self, req: WatchRequest) -> AsyncIterator[Change]:
        self._serving({})
        assert self.shard is not None
        stream = self.shard.watch(req)
        await ensure_subscribed(stream)
        return stream


async def run_replica_member(config: ReplicaConfig, meta: EtcdMeta, stop: asyncio.Event, *,
                             dir_lock: DataDirLock | None = None,
                             on_ready: Callable[[ReplicaHost], Awaitable[None]] | None = None) -> None:
    """Join the group, run until ``stop`` is set, then stop (the body of ``oribus shard`` for a
    member)."""
    host = ReplicaHost(config, meta, dir_lock=dir_lock)
    await host.start()
    _, stream = host.advertised()
    role = "voter" if host.member is not None and host.member.voter else "learner"
    print(f"oribus shard {host.shard_id} member {host.member_id} ({role}) listening on {host.address} and "
          f"{stream} (stream; a group of {host.replicas}, pid {os.getpid()})", flush=True)
    if on_ready is not None:
        await on_ready(host)
    await host.run(stop)
