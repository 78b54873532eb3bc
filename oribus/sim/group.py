"""Replica groups in the simulation: every shard kept by ``replicas`` ``ReplicaMember`` processes.

With ``SimConfig.replicas`` above 1, shard ``s`` is a group of members ``shard-s.0`` ...
``shard-s.<R-1>``, each a simulated process running the real ``ReplicaMember``
(``oribus.shards.replica``) on a data directory of its own::

    bus ──(GroupShardClient: to the primary the bus last heard of)──▶ shard-0.1 (primary)
                                                                        │ AppendBatch, promises,
                                               shard-0.0 ◀──SimPeer─────┤ snapshots: SimNetwork
                                               shard-0.2 ◀──────────────┘ messages (table=None)

The disk
    Real files (a temporary directory, in memory where ``/dev/shm`` exists), written by the real
    ``Wal``, whose flushes run on virtual time (``VirtualFlusher``: one flush at a time, each
    write + fsync taking a seeded latency and happening at its end). So a file only ever holds
    what an fsync made durable, and a crash — the process's tasks cancelled, its WAL dropped
    without a flush — loses exactly what was not fsynced. Snapshots and the MANIFEST are
    durable when written, as the real ones. **Disk loss** is the whole directory deleted: the
    member reopens (``ReplicaMember.open`` with the etcd term register) as a learner.
    With ``history_store="lmdb"`` the member's on-disk history store is a ``SimHistory`` on
    its node (``MemberNode.history``, ``oribus.sim.history``), which its follower core and the
    Shard it serves open (``SimReplicaMember._new_core``, ``SimReplicaShard.open_history``): a
    crash keeps what the engine synced, a lost disk takes it all. A catch-up from a snapshot
    carries the primary's copy of it in the real catch-up frame, in ``SnapshotChunk``s of
    ``SimConfig.snapshot_chunk_bytes`` (faults cut it mid-transfer: ``catchups_cut``), and the
    learner installs it in place of its own (``SimMemberFiles.replace_history``).

Elections
    Driven here as the cluster layer drives them over etcd (``specs/replication.md`` §5,
    ``oribus.sim.etcd``): each member's ``drive`` task watches ``groups/<s>/primary``; when it
    is absent, a voter waits a seeded jitter, moves the term register by CAS, asks every member
    for a promise (itself directly, the others through the network), and with grants from a
    majority picks the highest last position (ties: the lowest id). The winner (told through
    the network if it is not the candidate) creates the primary key bound to its own lease —
    a transaction that compares the term — and calls ``become_primary``. The primary keeps its
    lease alive every ``ttl / 4``; its **primary lease** runs from the moment it sent the last
    keep-alive that etcd acknowledged, for ``ttl`` less the clock-skew bound; past it (a pause,
    a cut from etcd) the member steps down, and the server in front of it (``MemberServer``)
    answers ``Unavailable`` to every bus call, checked when the call is handled. That check is
    the cluster layer's (the shard layer does not know the lease): here it is, in the harness.

The bus
    follows the primary key through a watch that delivers each change after a seeded delay
    (``watch_delay``), and sends its calls to the member it last heard of — which may be a
    deposed primary for a while: fencing is the members' job (promises refuse the old term).
    A failover is, to the bus, a restart of the shard with a new epoch (the term).

The model's assumption, which the fault scheduler keeps: at most a minority of a group's
members lack their data at once (a lost disk counts until the member is a voter again).
Lose a majority of disks and acknowledged commits are gone, replication or not.
"""

from __future__ import annotations

import asyncio
import collections
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from oribus.bus.coordinator import Coordinator
from oribus.delivery_log import DeliveryLog
from oribus.errors import InvalidRequest, OribusError, Unavailable
from oribus.rpc import shard_codec
from oribus.shards.config import ShardConfig
from oribus.shards.participant import Participant
from oribus.shards.replica import (
    AppendBatch,
    AppendReply,
    PromiseReply,
    ReplicaMember,
    ReplicaShard,
    ReplicatedWal,
    ReplicationOptions,
    SnapshotChunk,
)
from oribus.shards.replica.files import MemberFiles
from oribus.shards.replica.member import PRIMARY, STARTING
from oribus.shards.store import VersionedStore
from oribus.shards.wal import Wal
from oribus.shards.wal.writer import FlushThread, _settle
from oribus.sim.etcd import PrimaryKey, SimEtcd
from oribus.sim.history import SimHistory
from oribus.sim.loop import Process
from oribus.sim.network import Endpoint, SimNetwork, SimShardClient

if TYPE_CHECKING:
    from oribus.sim.harness import SimCluster

ETCD = "etcd"  # the network name of etcd (cuts and partitions reach it by this name)


class VirtualFlusher(FlushThread):
    """A WAL's flushes on virtual time, in place of its flush thread (module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, latency: Callable[[], float]) -> None:
        # no thread: jobs run as loop callbacks, one at a time, in order
        self._loop = loop
        self._latency = latency
        self._queue: collections.deque[tuple[Callable[[], None], asyncio.Future[None]]] = collections.deque()
        self._busy = False
        self.killed = False

    def submit(self, fn: Callable[[], None]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._queue.append((fn, fut))
        if not self._busy:
            self._next()
        return fut

    def _next(self) -> None:
        if self._queue and not self.killed:
            self._busy = True
            self._loop.call_later(self._latency(), self._run)

    def _run(self) -> None:
        self._busy = False
        if self.killed or not self._queue:
            return
        fn, fut = self._queue.popleft()
        error: BaseException | None = None
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiters, as the thread does
            error = e
        _settle(fut, error)
        self._next()

    def stop(self, wait: bool = True) -> None:
        """Nothing to stop: the jobs still queued run (as the thread runs them before it ends)."""

    def kill(self) -> None:
        """The process died: the flush in progress and those queued never happen."""
        self.killed = True
        self._queue.clear()


class SimReplicaShard(ReplicaShard):
    """The primary's Shard on the simulated clocks (the member knows them)."""

    def __init__(self, config: ShardConfig, epoch: int, member: ReplicaMember, rwal: ReplicatedWal) -> None:
        assert isinstance(member, SimReplicaMember)
        self.clock = member.groups.clock
        self.wall_clock = member.groups.wall_clock_of(member.groups.name(member.shard_id, member.member_id))
        groups = member.groups
        self.open_history = lambda _config: groups.history_of(member)  # the member's SimHistory
        super().__init__(config, epoch, member, rwal)


class SimMemberFiles(MemberFiles):
    """A member's real files, whose WAL flushes run on virtual time (``VirtualFlusher``).
    ``SimGroups`` makes a subclass of it per run that names itself."""

    groups: ClassVar[SimGroups]

    def open_wal(self, *, replay_from_lsn: int, on_record: Callable[[int, int, Any], None],
                 require_lsn: int) -> Wal:
        wal = super().open_wal(replay_from_lsn=replay_from_lsn, on_record=on_record, require_lsn=require_lsn)
        self.groups.adopt_wal(self.config.data_dir, wal)
        return wal

    def replace_history(self, incoming: Path | None) -> None:
        """A catch-up's engine copy (``SimHistory.copy_file``, received into ``history_spill``
        and fsynced by ``CatchupReceiver``) replaces the member's ``SimHistory`` whole, durably;
        None: the engine is emptied (the snapshot's histories fill it)."""
        node = self.groups.node_of(self.config.data_dir)
        if incoming is None:
            node.history.install(None)
            self.groups.counters["engine_emptied"] += 1
            self.groups.trace("engine-emptied", node.name)
            return
        copy = SimHistory.decode(incoming.read_bytes())
        incoming.unlink()
        node.history.install(copy)
        self.groups.counters["engine_installs"] += 1
        self.groups.trace("engine-installed", node.name, sum(len(v) for v in copy._state.values()))


class SimReplicaMember(ReplicaMember):
    """The real ``ReplicaMember`` on ``SimMemberFiles``, its Shard on the simulated clocks.
    ``SimGroups`` makes a subclass of it per run that names itself."""

    groups: ClassVar[SimGroups]
    shard_class = SimReplicaShard
    crashed = False  # set when its process is killed: its leftovers no longer reach the disk

    def _new_core(self) -> Participant:
        cfg = self.config
        name = self.groups.name(self.shard_id, self.member_id)
        # as ReplicaMember._new_core: the follower's engine (history_store="lmdb") is the
        # member's SimHistory, on its simulated disk
        self._close_history()
        self._history = self.groups.history_of(self) if cfg.history_store != "memory" else None
        return Participant(cfg.shard_id, 0, VersionedStore(cfg.history_limit, self._history),
                           DeliveryLog(cfg.delivery_log, clock=self.groups.clock), max_resolved=cfg.max_resolved_txns,
                           clock=self.groups.clock, wall_clock=self.groups.wall_clock_of(name))


class SimPeer:
    """Another member as a member reaches it: a ``Peer`` over the simulated network."""

    def __init__(self, groups: SimGroups, shard: int, source: int, target: int) -> None:
        self.groups = groups
        self.src = groups.name(shard, source)
        self.endpoint = groups.nodes[shard][target].endpoint
        self.member_id = target

    async def append(self, batch: AppendBatch) -> AppendReply:
        reply: AppendReply = await self.groups.network.call(self.src, self.endpoint, None, "append", batch)
        return reply

    async def promise(self, term: int, candidate: int) -> PromiseReply:
        reply: PromiseReply = await self.groups.network.call(self.src, self.endpoint, None, "promise", term, candidate)
        return reply

    async def install_snapshot(self, chunk: SnapshotChunk) -> AppendReply:
        reply: AppendReply = await self.groups.network.call(self.src, self.endpoint, None, "install_snapshot", chunk)
        return reply


class MemberServer:
    """What a member process serves: the member's side of the replication protocol, the
    harness's election message, and — only while it is the primary within its primary
    lease — the shard's operations (``ShardService``), forwarded to its Shard."""

    def __init__(self, node: MemberNode, member: ReplicaMember) -> None:
        self.node = node
        self.member = member

    async def append(self, batch: AppendBatch) -> AppendReply:
        return await self.member.append(batch)

    async def promise(self, term: int, candidate: int) -> PromiseReply:
        return await self.member.promise(term, candidate)

    async def install_snapshot(self, chunk: SnapshotChunk) -> AppendReply:
        node, counters = self.node, self.node.groups.counters
        counters["snapshot_chunks"] += 1
        if chunk.offset == 0 and node.catchup_from is not None:
            counters["catchups_cut"] += 1  # the last one never reached its end: lost, refused or crashed
        reply = await self.member.install_snapshot(chunk)
        node.catchup_from = None if chunk.done else (chunk.primary, chunk.lsn)
        return reply

    async def take_over(self, term: int) -> None:
        """A candidate of ``term`` found this member the most complete: take over (§5 step 3)."""
        self.node.spawn_takeover(term)

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op not in shard_codec.SHARD_OPS:
            raise AttributeError(op)
        node = self.node

        async def forward(*args: Any) -> Any:
            shard = node.serving()
            if shard is None:
                raise Unavailable(f"{node.name} is not the primary of shard {node.shard}", shard=node.shard)
            return await getattr(shard, op)(*args)

        return forward


@dataclass(eq=False)
class MemberNode:
    """One member slot of a group: its directory, endpoint and current process (module docstring)."""

    groups: SimGroups
    shard: int
    member_id: int
    data_dir: Path
    endpoint: Endpoint
    rng: random.Random  # the member's election jitter and disk latencies
    member: ReplicaMember | None = None
    process: Process | None = None
    wals: list[Wal] = field(default_factory=list)  # the WALs of the running incarnation
    lease: int | None = None  # the etcd lease its primary key is bound to
    lease_until: float = 0.0  # the primary lease, on its own clock
    data_lost: bool = False  # its disk was lost and it is not a voter again yet
    # its on-disk history store (history_store="lmdb"), on its simulated disk: rolled back to
    # what was synced by a crash, a new empty one when the disk is lost (oribus.sim.history)
    history: SimHistory = field(default_factory=SimHistory)
    catchup_from: tuple[int, int] | None = None  # a catch-up begun and not finished: (primary, LSN)
    taking_over: bool = False
    seen_term: int = 0  # the term register when this member last saw it move ...
    seen_since: float = 0.0  # ... and when

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.alive

    def serving(self) -> ReplicaShard | None:
        """The Shard, while this member is the primary within its primary lease."""
        m = self.member
        if m is None or m.role != PRIMARY or m.shard is None or self.lease is None:
            return None
        if self.groups.clock() >= self.lease_until:
            return None
        return m.shard

    def spawn_takeover(self, term: int) -> None:
        if self.process is not None and not self.taking_over:
            self.process.spawn(self._take_over(term))

    # ---- the election driver: what the cluster layer does over etcd ----------------------

    async def drive(self) -> None:
        g = self.groups
        step = g.ttl / 4
        while True:
            await g.network._unfrozen(self.name)
            m = self.member
            assert m is not None
            if self.lease is not None:
                await self._keep_alive(m)
            elif m.role in (PRIMARY, STARTING):
                await m.step_down()
            elif m.voter:
                if self.data_lost:
                    self.data_lost = False
                    g.trace("voter-again", self.name)
                if await self._no_primary() and not self.taking_over:
                    await asyncio.sleep(self.rng.uniform(0, g.ttl / 2))
                    await g.network._unfrozen(self.name)
                    if await self._no_primary():
                        await self._elect(m)
            await asyncio.sleep(step)

    async def _no_primary(self) -> bool:
        """Is it time for an election? No primary key, and no election started (the term
        register moved) within the last ``ttl / 2``: a candidate seen moving it is given
        time to finish (a failed CAS watches the election that won it, §5 step 1)."""
        g = self.groups
        try:
            key = await g.etcd_call(self.name, g.etcd.primary, self.shard)
            term = await g.etcd_call(self.name, g.etcd.term, self.shard)
        except Unavailable:
            return False
        now = g.clock()
        if term != self.seen_term:
            self.seen_term, self.seen_since = term, now
        return key is None and now - self.seen_since >= g.ttl / 2

    async def _keep_alive(self, m: ReplicaMember) -> None:
        g = self.groups
        assert self.lease is not None
        sent = g.clock()
        try:
            alive = await g.etcd_call(self.name, g.etcd.keep_alive, self.lease)
        except Unavailable:
            alive = None
        if alive:
            self.lease_until = sent + g.ttl - g.config.clock_skew_seconds
        deposed = m.role not in (PRIMARY, STARTING) and not self.taking_over
        if alive is False or g.clock() >= self.lease_until or deposed:
            await self._resign(m, "deposed" if deposed else "lease lost")

    async def _resign(self, m: ReplicaMember, why: str) -> None:
        g = self.groups
        lease, self.lease = self.lease, None
        self.lease_until = 0.0
        g.trace("step-down", self.name, why)
        if lease is not None:
            try:
                await g.etcd_call(self.name, g.etcd.revoke, lease)
            except Unavailable:
                pass  # it expires on its own
        await m.step_down()

    async def _elect(self, m: ReplicaMember) -> None:
        """One election (§5 steps 1-3), as candidate."""
        g = self.groups
        try:
            seen = await g.etcd_call(self.name, g.etcd.term, self.shard)
            term = seen + 1
            if not await g.etcd_call(self.name, g.etcd.cas_term, self.shard, seen, term):
                return
        except Unavailable:
            return
        g.trace("election", self.name, term)

        async def ask(i: int) -> tuple[int, PromiseReply | None]:
            # a member that does not answer within ttl / 2 is counted out (down or cut off)
            try:
                if i == self.member_id:
                    return i, await m.promise(term, self.member_id)
                peer = SimPeer(g, self.shard, self.member_id, i)
                return i, await asyncio.wait_for(peer.promise(term, self.member_id), g.ttl / 2)
            except (OribusError, TimeoutError):
                return i, None

        replies = await asyncio.gather(*(ask(i) for i in range(g.replicas)))
        granted = {i: r.last for i, r in replies if r is not None and r.granted}
        if len(granted) < g.replicas // 2 + 1:
            g.trace("election-lost", self.name, term, sorted(granted))
            return
        winner = max(granted, key=lambda i: (granted[i], -i))
        if g.config.unsafe_elect_any and self.member_id in granted:
            winner = self.member_id  # BROKEN on purpose: the candidate takes over, complete or not
        g.trace("elected", self.shard, winner, term, sorted(granted.items()))
        if winner == self.member_id:
            await self._take_over(term)
        else:
            try:
                await g.network.call(self.name, g.nodes[self.shard][winner].endpoint, None, "take_over", term)
            except OribusError:
                pass  # the next election will do

    async def _take_over(self, term: int) -> None:
        """§5 step 4 and 5: the primary key bound to a new lease, then ``become_primary``."""
        g = self.groups
        m = self.member
        if m is None or self.taking_over or self.lease is not None or not m.voter:
            return
        self.taking_over = True
        try:
            sent = g.clock()
            try:
                lease = await g.etcd_call(self.name, g.etcd.grant)
                created = await g.etcd_call(self.name, g.etcd.create_primary, self.shard, self.member_id, term, lease)
            except Unavailable:
                return
            if not created:
                await g.etcd_call(self.name, g.etcd.revoke, lease)
                return
            self.lease, self.lease_until = lease, sent + g.ttl - g.config.clock_skew_seconds
            peers = [SimPeer(g, self.shard, self.member_id, i) for i in range(g.replicas) if i != self.member_id]
            try:
                shard = await asyncio.wait_for(m.become_primary(term, peers), 4 * g.ttl)
            except (Unavailable, InvalidRequest, TimeoutError) as e:
                g.trace("takeover-failed", self.name, term, type(e).__name__)
                if self.lease is not None:
                    await self._resign(m, "takeover failed")
                return
            shard.resolver = Coordinator(g.shard_clients(self.name), g.cluster.slot_map.shard_for).recover
            g.counters["primaries"] += 1
            g.trace("primary", self.name, term, m.last_position)
        finally:
            self.taking_over = False


class GroupShardClient(SimShardClient):
    """Shard ``shard_id`` as a process reaches it: the member it last heard is the primary."""

    def __init__(self, groups: SimGroups, src: str, shard_id: int) -> None:
        super().__init__(groups.network, src, shard_id, groups.nodes[shard_id][0].endpoint)
        self.groups = groups

    async def _call(self, op: str, *params: Any) -> Any:
        primary = self.groups.view.get(self.shard_id)
        if primary is None:
            await asyncio.sleep(self.network._delay())
            raise Unavailable(f"shard {self.shard_id} has no primary now", shard=self.shard_id)
        endpoint = self.groups.nodes[self.shard_id][primary].endpoint
        return await self.network.call(self.src, endpoint, shard_codec.SHARD_OPS, op, *params)


class SimGroups:
    """Every replica group of a ``SimCluster``: members, etcd, the bus's view of the primaries."""

    def __init__(self, cluster: SimCluster, root: Path) -> None:
        self.cluster = cluster
        self.config = cluster.config
        self.replicas = cluster.config.replicas
        self.ttl = cluster.config.lease_ttl_seconds
        loop = cluster.loop
        assert loop is not None
        self.loop = loop
        self.clock = loop.time
        self.network: SimNetwork = cluster.network
        self.root = root
        self.etcd = SimEtcd(loop, self.ttl)
        self.etcd_rng = random.Random(f"oribus-sim/{cluster.seed}/etcd")
        self.view: dict[int, int | None] = {}  # shard -> the member the bus believes primary
        self._view_term: dict[int, int] = {}
        files: type[SimMemberFiles] = type("SimMemberFiles", (SimMemberFiles,), {"groups": self})
        self.member_class: type[SimReplicaMember] = type("SimReplicaMember", (SimReplicaMember,),
                                                         {"groups": self, "files_class": files})
        self.options = ReplicationOptions(heartbeat_seconds=0.05, retry_min_seconds=0.01, retry_max_seconds=0.2,
                                          snapshot_chunk_bytes=cluster.config.snapshot_chunk_bytes,
                                          unsafe_ack_on_local_fsync=cluster.config.unsafe_ack_on_local_fsync)
        self.counters = {"primaries": 0, "member_crashes": 0, "disk_losses": 0, "disk_losses_skipped": 0,
                         "primary_partitions": 0, "primary_pauses": 0, "learner_starts": 0,
                         "snapshot_chunks": 0, "catchups_cut": 0, "engine_installs": 0, "engine_emptied": 0,
                         "history_versions_lost": 0}
        self.nodes: dict[int, dict[int, MemberNode]] = {
            s: {r: MemberNode(self, s, r, root / f"shard-{s}" / f"member-{r}", Endpoint(self.name(s, r)),
                              random.Random(f"oribus-sim/{cluster.seed}/member/{s}.{r}"), history=self.new_history())
                for r in range(self.replicas)}
            for s in range(self.config.shards)
        }
        self._by_dir = {n.data_dir: n for nodes in self.nodes.values() for n in nodes.values()}
        self.etcd.watch(self._watched)

    @staticmethod
    def name(shard: int, member: int) -> str:
        return f"shard-{shard}.{member}"

    def trace(self, kind: str, *details: Any) -> None:
        self.cluster.trace(kind, *details)

    def wall_clock_of(self, name: str) -> Callable[[], float]:
        return self.cluster.wall_clock_of(name)

    def shard_clients(self, src: str) -> dict[int, SimShardClient]:
        return {s: GroupShardClient(self, src, s) for s in self.nodes}

    async def etcd_call(self, src: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A call to etcd from process ``src``: a round trip on the network, or ``Unavailable``."""
        delay = self.etcd_rng.uniform(0.0005, 0.003)
        if not self.network.reachable(src, ETCD):
            await asyncio.sleep(0.05)
            raise Unavailable(f"etcd is unreachable from {src}")
        await asyncio.sleep(delay / 2)
        result = fn(*args)
        await asyncio.sleep(delay / 2)
        if not self.network.reachable(src, ETCD):
            raise Unavailable(f"the answer of etcd to {src} was lost")
        return result

    def _watched(self, shard: int, key: PrimaryKey | None) -> None:
        """A change of a primary key reaches the bus's watch after a delay, in order."""
        self.trace("etcd-primary", shard, None if key is None else (key.member, key.term))
        delay = self.etcd_rng.uniform(0.0, self.config.watch_delay_seconds)
        seq = self._view_term[shard] = self._view_term.get(shard, 0) + 1

        def deliver() -> None:
            if not self.network.reachable("bus", ETCD):  # the watch stalls while the bus is cut from etcd
                self.loop.call_later(0.01, deliver)
            elif self._view_term.get(shard) == seq:  # not overtaken by a later change
                self.view[shard] = None if key is None else key.member

        self.loop.call_later(delay, deliver)

    def node_of(self, data_dir: Path) -> MemberNode:
        return self._by_dir[Path(data_dir)]

    def new_history(self) -> SimHistory:
        """An empty engine on a member's disk (a new disk, or one that was lost)."""
        disk = self.config.disk
        return SimHistory(unsafe_sync_does_nothing=disk.unsafe_history_sync_does_nothing,
                          unsafe_empty_catchup_copy=disk.unsafe_history_empty_catchup_copy)

    def history_of(self, member: ReplicaMember) -> SimHistory:
        """The on-disk history store ``member`` opens: its node's, unless that incarnation was
        killed (what its cancelled tasks still do then goes to an engine on no disk)."""
        if getattr(member, "crashed", False):
            return SimHistory()
        return self.nodes[member.shard_id][member.member_id].history

    def adopt_wal(self, data_dir: Path, wal: Wal) -> None:
        node = self._by_dir[Path(data_dir)]
        lo, hi = self.config.disk.fsync_seconds
        wal._flusher = VirtualFlusher(self.loop, lambda: node.rng.uniform(lo, hi))
        node.wals = [w for w in node.wals if w is not wal] + [wal]

    # ---- members: start, crash, lose a disk ----------------------------------------------

    async def start_member(self, shard: int, member: int) -> None:
        node = self.nodes[shard][member]
        if node.process is not None:
            return
        process = Process(self.loop, node.name)
        node.process = process
        cfg = self.cluster.shard_config(shard)
        cfg.data_dir = node.data_dir
        term = self.etcd.term(shard)
        m = await self.member_class.open(node.data_dir, shard, member, self.replicas, config=cfg,
                                         term_register=term, options=self.options)
        if not m.voter:
            self.counters["learner_starts"] += 1
        node.member = m
        node.endpoint.process, node.endpoint.target = process, MemberServer(node, m)
        process.spawn(node.drive())
        process.spawn(self._upkeep(node))
        self.trace("start", node.name, term, m.voter, m.last_position)

    async def _upkeep(self, node: MemberNode) -> None:
        while True:
            await asyncio.sleep(self.config.recovery_interval)
            shard = node.serving()
            if shard is not None:
                shard.expire_sessions()
                shard.expire_leases()

    def crash_member(self, shard: int, member: int, *, lose_disk: bool = False) -> bool:
        """Kill a member now; with ``lose_disk`` its whole directory is gone too. False if it
        was down already (its disk is then lost all the same)."""
        node = self.nodes[shard][member]
        m, process = node.member, node.process
        if lose_disk:
            node.data_lost = True
            self.counters["disk_losses"] += 1
        if process is None or m is None:
            if lose_disk:
                shutil.rmtree(node.data_dir, ignore_errors=True)
                node.history = self.new_history()
            return False
        node.process = node.member = None
        node.endpoint.process = node.endpoint.target = None
        node.lease, node.lease_until, node.taking_over = None, 0.0, False
        killed = process.kill()
        if m.shard is not None:
            m.shard._closed = True
        lost = 0
        for wal in node.wals:
            if not wal._closed and wal._failed is None:
                lost += wal.last_lsn - wal.durable_lsn  # appended, never fsynced: gone with the process
            flusher = wal._flusher
            if isinstance(flusher, VirtualFlusher):
                flusher.kill()
            wal._failed = Unavailable(f"{node.name} crashed")
            wal._release()
        node.wals = []
        # its engine keeps what was synced; the dead incarnation's object leaves the disk
        if isinstance(m, SimReplicaMember):
            m.crashed = True
        history_lost = node.history.crash()
        self.counters["history_versions_lost"] += history_lost
        node.history = self.new_history() if lose_disk else node.history.reopened()
        lock = m._dir_lock
        if lock is not None:
            lock.release()
        self.network.server_died(node.endpoint)
        self.counters["member_crashes"] += 1
        self.cluster.counters["lost_records"] += lost
        if lose_disk:
            shutil.rmtree(node.data_dir, ignore_errors=True)
        self.trace("crash", node.name, "disk lost" if lose_disk else "", lost, killed)
        return True

    def lacking_data(self, shard: int) -> int:
        """Members of the group whose disk was lost and who are not voters again yet."""
        return sum(1 for n in self.nodes[shard].values() if n.data_lost)

    def primary(self, shard: int) -> MemberNode | None:
        """The member serving as primary now (None: none does)."""
        for node in self.nodes[shard].values():
            if node.serving() is not None:
                return node
        return None

    async def exposed_primary(self, shard: int, mode: int, patience: float = 0.5) -> int | None:
        """The primary of ``shard`` (its member id; None: there is none), once a crash of it
        is most telling, waiting at most ``patience``: ``mode`` 1, its log holds fsynced records
        no follower has acknowledged (a tail only it has: never acknowledged, so lost or cut
        when it returns); 2, a record is committed that some follower lacks (the election
        must pick the member that has it). Any other ``mode``: at once."""
        end = self.loop.time() + patience
        while mode in (1, 2) and self.loop.time() < end:
            node = self.primary(shard)
            rwal = node.member.rwal if node is not None and node.member is not None else None
            if node is not None and rwal is not None and rwal.followers:
                matches = [f.match_lsn for f in rwal.followers]
                if (mode == 1 and rwal.durable_lsn > max(matches)) or (mode == 2 and rwal.commit_lsn > min(matches)):
                    self.trace("exposed", node.name, mode, rwal.durable_lsn, rwal.commit_lsn, matches)
                    return node.member_id
            await asyncio.sleep(0.0001)
        key = self.etcd.primary(shard)
        return key.member if key is not None else None

    def followers(self, shard: int) -> list[MemberNode]:
        key = self.etcd.primary(shard)
        return [n for r, n in self.nodes[shard].items() if key is None or r != key.member]

    async def start_all(self) -> None:
        for s, nodes in self.nodes.items():
            for r in nodes:
                await self.start_member(s, r)
            self.view.setdefault(s, None)

    async def wait_for_primaries(self, limit: float) -> bool:
        """Until every group has a primary serving and the bus knows it (False: not within ``limit``)."""
        end = self.loop.time() + limit
        while self.loop.time() < end:
            if all(self.primary(s) is not None and self.view.get(s) == self.primary(s).member_id  # type: ignore[union-attr]
                   for s in self.nodes):
                return True
            await asyncio.sleep(0.01)
        return False
