"""A whole oribus cluster in one process, on the simulated network, with a fault scheduler.

``SimCluster`` runs the real code of every server, only its surroundings are
simulated (``loop.py``: virtual time and processes; ``disk.py``: the WAL and
snapshots in memory; ``network.py``: messages)::

    client-0 ─┐                      ┌─▶ shard-0 process: Shard (SimDisk), session upkeep
    client-1 ─┼─▶ bus process ───────┼─▶ shard-1 process: ...
    ...       │   Bus, Coordinator,  └─▶ ...            (a shard resolving a transaction
              ┘   TxnSweep sweep                          reaches the others the same way)

Every arrow is a ``SimNetwork`` message: the clients are ``AsyncSession``
objects over a ``SimBusClient`` (as over ``oribus.connect``), the bus reaches
its shards through ``SimShardClient`` (the third ``ShardService``).

The faults (``Fault.kind``) are listed in ``oribus.sim.faults``; ``SimConfig`` is in
``oribus.sim.config``, the register clients in ``oribus.sim.workload``.

Time also expires leases on its own: a prepared transaction whose coordinator
vanished is resolved by the bus's recovery sweep after ``txn_expiry_seconds``,
and a session idle for ``session_ttl_seconds`` expires on every shard.

``simulate(seed, config, faults)`` runs one complete, checked run: the
list-append workload (``oribus.checker.run_list_append``, transaction scope)
plus register clients that roll back, write in session scope and forget;
the fault schedule; then it heals everything, restarts what is down, waits
until no transaction is left prepared, reads the final state and histories
(``record_final``) and checks the recorded history (``oribus.checker.check``),
and that every acknowledged commit was told the new version of every key it wrote.
The same seed and schedule give the same run (see ``loop.py``), so every
failure replays: ``SimResult.trace_hash`` fingerprints it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import oribus.client.session as client_session
from oribus.bus.bus import Bus
from oribus.bus.coordinator import Coordinator
from oribus.bus.sweep import TxnSweep
from oribus.checker import Recorder, Report, check, record_final, run_list_append
from oribus.checker.history import APPEND, READ
from oribus.checker.listappend import workload_keys
from oribus.client.session import AsyncSession
from oribus.delivery_log import DeliveryLogConfig
from oribus.errors import OribusError, Unavailable
from oribus.meta.slots import StaticSlotMap
from oribus.shards.config import ShardConfig
from oribus.shards.shard import Shard
from oribus.sim.config import SimConfig
from oribus.sim.disk import SimDisk
from oribus.sim.faults import REPLICA_FAULT_KINDS, Fault
from oribus.sim.group import ETCD, SimGroups
from oribus.sim.loop import Process, SimLoop, run
from oribus.sim.network import Endpoint, SimBusClient, SimNetwork, SimShardClient
from oribus.sim.workload import register_client

WALL_CLOCK_ORIGIN = 1_700_000_000.0  # virtual "unix time" at virtual second 0 (commit stamps)
_COMMIT_POINTS = frozenset({"commit_one_phase", "decide"})  # the calls that reach a commit point


class SimShard(Shard):
    """The real ``Shard``, on the simulated clock and disk: only its seams differ."""

    def __init__(self, config: ShardConfig, epoch: int, disk: SimDisk, clock: Callable[[], float],
                 wall_clock: Callable[[], float]) -> None:
        # set before Shard.__init__: the participant and the delivery log take the clock there
        self.clock = clock
        self.wall_clock = wall_clock
        self.open_wal = disk.open_wal
        self.load_snapshot_file = disk.load_snapshot
        self.write_snapshot_file = disk.write_snapshot
        self.read_manifest_file = disk.read_manifest
        self.write_manifest_file = disk.write_manifest
        self.open_history = lambda _config: disk.history
        super().__init__(config, epoch)


class _ClientConnection(SimBusClient):
    """A client's connection to the bus.

    * While the client is paused (a slow agent) its calls wait.
    * After a call fails with Unavailable, the next one waits a jittered reconnect backoff
      (as a gRPC channel does), so clients do not spin through failing transactions
      while the bus is down or cut off.
    """

    paused_until = 0.0
    retry_at = 0.0
    backoff = (0.02, 0.1)  # seconds, uniform

    async def _call(self, op: str, *params: Any) -> Any:
        loop = asyncio.get_running_loop()
        while loop.time() < max(self.paused_until, self.retry_at):
            await asyncio.sleep(max(self.paused_until, self.retry_at) - loop.time())
        try:
            return await super()._call(op, *params)
        except Unavailable:
            self.retry_at = loop.time() + self.network.rng.uniform(*self.backoff)
            raise


class _SimSession(AsyncSession):
    """An SDK session whose ``reset_session`` keeps trying while the bus cannot be reached.

    The workloads reset a session after SessionExpired; a client that cannot reach the
    bus just tries again later (faults always end), rather than abandoning the run.
    """

    async def reset_session(self) -> None:
        while True:
            try:
                return await super().reset_session()
            except Unavailable:
                await asyncio.sleep(0.05)


class SimCluster:
    """A bus and ``config.shards`` shards in simulated processes (see the module docstring).

    Use inside ``oribus.sim.loop.run`` (a ``SimLoop``)::

        cluster = SimCluster(seed=7)
        await cluster.start()
        session = cluster.session(0)
        cluster.crash_shard(1)
        await cluster.restart_shard(1)
    """

    def __init__(self, seed: int, config: SimConfig | None = None) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.slot_map = StaticSlotMap(self.config.shards)
        self.events: list[tuple] = []  # the trace: (virtual time, kind, *details)
        self.counters = {"faults": 0, "crashes": 0, "reader_crashes": 0, "bus_crashes": 0, "lost_records": 0,
                         "resets": 0}
        self._epoch = 0
        self._windows: dict[str, list[float]] = {"loss": [], "duplicate": []}
        self._clients: dict[int, _ClientConnection] = {}
        self.loop: SimLoop | None = None
        # Each process's wall clock is off by a fixed amount within ±ε/2 (read leases'
        # deadlines are compared across processes, PROTOCOL.md §5.8): often at the edges.
        rng = random.Random(f"oribus-sim/{seed}/clocks")
        half = self.config.clock_skew_seconds / 2
        self.clock_offsets = {name: rng.choice((-half, half, rng.uniform(-half, half)))
                              for name in ["bus", *(f"shard-{i}" for i in range(self.config.shards))]}
        self.groups: SimGroups | None = None  # replica groups (config.replicas > 1)
        self._root: Path | None = None  # their data directories
        if self.config.replicas > 1:
            self.clock_offsets.update({SimGroups.name(i, r): rng.choice((-half, half, rng.uniform(-half, half)))
                                       for i in range(self.config.shards) for r in range(self.config.replicas)})

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if not isinstance(loop, SimLoop):
            raise RuntimeError("SimCluster runs on a SimLoop (oribus.sim.loop.run)")
        self.loop = loop
        cfg = self.config
        self.network = SimNetwork(
            loop, random.Random(f"oribus-sim/{self.seed}/network"), replace(cfg.network), self.trace
        )
        self.disks = {
            i: SimDisk(f"shard-{i}", random.Random(f"oribus-sim/{self.seed}/disk/{i}"), cfg.disk)
            for i in range(cfg.shards)
        }
        self.shard_endpoints = {i: Endpoint(f"shard-{i}") for i in range(cfg.shards)}
        self.bus_endpoint = Endpoint("bus")
        if cfg.replicas > 1:
            # every group elects its first primary (no restart grace: no primary served before)
            shm = Path("/dev/shm")
            self._root = Path(tempfile.mkdtemp(prefix="oribus-sim-", dir=shm if shm.is_dir() else None))
            self.groups = SimGroups(self, self._root)
            await self.groups.start_all()
            self.restart_bus()
            if not await self.groups.wait_for_primaries(60.0):
                raise RuntimeError("the replica groups elected no primary")
            return
        for i in range(cfg.shards):
            await self.restart_shard(i)
        self.restart_bus()
        # A shard takes no write during its restart grace after any start, the first one too
        # (PROTOCOL.md §5.8): the cluster is ready for clients once that is over.
        if not cfg.unsafe_no_restart_grace:
            await asyncio.sleep(cfg.read_lease_seconds + 2 * cfg.clock_skew_seconds)

    def trace(self, kind: str, *details: Any) -> None:
        now = self.loop.time() if self.loop is not None else 0.0
        self.events.append((round(now, 9), kind, *details))

    @property
    def trace_hash(self) -> str:
        """A fingerprint of the run: equal for two runs iff they did the same things at the same times."""
        h = hashlib.sha256()
        for ev in self.events:
            h.update(repr(ev).encode())
            h.update(b"\n")
        return h.hexdigest()[:16]

    def shard_config(self, shard_id: int) -> ShardConfig:
        cfg = self.config
        return ShardConfig(
            shard_id=shard_id,
            data_dir=Path(f"/simulated/shard-{shard_id}"),  # never touched: the SimDisk serves it
            history_limit=cfg.history_limit,
            history_max_age_seconds=cfg.history_max_age,
            history_compaction_interval=0.05,
            history_store=cfg.history_store,
            snapshot_every_records=cfg.snapshot_every_records,
            delivery_log=DeliveryLogConfig(ttl_seconds=cfg.session_ttl_seconds),
            read_wait_seconds=cfg.read_wait_seconds,
            lock_wait_seconds=cfg.lock_wait_seconds,
            txn_expiry_seconds=cfg.txn_expiry_seconds,
            read_lease_seconds=cfg.read_lease_seconds,
            clock_skew_seconds=cfg.clock_skew_seconds,
            restart_grace=not cfg.unsafe_no_restart_grace,
            unsafe_disable_validation=cfg.unsafe_disable_validation,
        )

    def shard(self, shard_id: int) -> Shard | None:
        """The running shard object (None while it is down); of a replica group, its primary's."""
        if self.groups is not None:
            node = self.groups.primary(shard_id)
            return node.serving() if node is not None else None
        return self.shard_endpoints[shard_id].target

    def close(self) -> None:
        """Remove the replica groups' data directories (the end of a run)."""
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    # ---- shards -----------------------------------------------------------------------

    async def restart_shard(self, shard_id: int) -> None:
        """Start shard ``shard_id`` (again): a new process and epoch, recovered from its SimDisk.
        Of a replica group: start every member that is down."""
        if self.groups is not None:
            for r in range(self.config.replicas):
                await self.groups.start_member(shard_id, r)
            return
        ep = self.shard_endpoints[shard_id]
        if ep.process is not None:
            return
        assert self.loop is not None
        self._epoch += 1
        name = f"shard-{shard_id}"
        process = Process(self.loop, name)
        shard = SimShard(self.shard_config(shard_id), self._epoch, self.disks[shard_id], self.loop.time,
                         self.wall_clock_of(name))
        shard._recover()  # what Shard.open does (it would pick a wall-clock epoch)
        if self.config.shard_resolver:
            peers = {j: SimShardClient(self.network, name, j, self.shard_endpoints[j]) for j in self.shard_endpoints}
            shard.resolver = Coordinator(peers, self.slot_map.shard_for).recover
        ep.process, ep.target = process, shard
        process.spawn(self._shard_upkeep(shard))
        if shard.compaction is not None:  # the age rule's compaction, on the virtual clocks
            process.spawn(shard.compact_forever())
        self.trace("start", name, self._epoch, shard.counters["replayed_records"], len(shard.core.prepared))

    async def _shard_upkeep(self, shard: SimShard) -> None:
        # as ShardServer._sweep: expire idle sessions now and then (reads also expire lazily)
        while True:
            await asyncio.sleep(self.config.recovery_interval)
            shard.expire_sessions()
            shard.expire_leases()

    def crash_shard(self, shard_id: int, keep_in_flight: int = 0) -> None:
        """Kill shard ``shard_id`` now: unsynced WAL records are lost (see ``SimDisk.crash``).
        Of a replica group: its primary (what etcd names), which loses what it did not fsync."""
        if self.groups is not None:
            key = self.groups.etcd.primary(shard_id)
            if key is not None and self.groups.crash_member(shard_id, key.member):
                self.counters["crashes"] += 1
            return
        ep = self.shard_endpoints[shard_id]
        process, shard = ep.process, ep.target
        if process is None:
            return
        lost = self.disks[shard_id].crash(keep_in_flight)
        shard._closed = True  # anything of it still referenced refuses to serve
        ep.process = ep.target = None
        killed = process.kill()
        self.network.server_died(ep)
        self.counters["crashes"] += 1
        self.counters["lost_records"] += lost
        self.trace("crash", ep.name, lost, killed)

    # ---- the bus ------------------------------------------------------------------------

    def restart_bus(self) -> None:
        """Start the bus (again): a new process, an empty session table, a recovery sweep."""
        ep = self.bus_endpoint
        if ep.process is not None:
            return
        assert self.loop is not None
        process = Process(self.loop, "bus")
        shards: dict[int, SimShardClient] = (
            self.groups.shard_clients("bus") if self.groups is not None else
            {i: SimShardClient(self.network, "bus", i, self.shard_endpoints[i]) for i in self.shard_endpoints})
        # commits stamped, and read leases' deadlines taken, on the bus's (skewed) virtual wall clock
        bus = Bus(shards, self.slot_map.shard_for, clock=self.wall_clock_of("bus"), monotonic=self.loop.time)
        sweep = TxnSweep(bus, txn_expiry_seconds=self.config.txn_expiry_seconds,
                            interval=self.config.recovery_interval)
        ep.process, ep.target = process, bus
        process.spawn(sweep.run_forever())
        self.trace("start", "bus")

    def crash_bus(self) -> None:
        ep = self.bus_endpoint
        process = ep.process
        if process is None:
            return
        ep.process = ep.target = None
        killed = process.kill()
        self.network.server_died(ep)
        self.counters["bus_crashes"] += 1
        self.trace("crash", "bus", 0, killed)

    def wall_clock(self) -> float:
        assert self.loop is not None
        return WALL_CLOCK_ORIGIN + self.loop.time()

    def wall_clock_of(self, name: str) -> Callable[[], float]:
        """The wall clock of process ``name``: virtual time, off by its fixed offset."""
        offset = self.clock_offsets[name]
        loop = self.loop
        assert loop is not None
        return lambda: WALL_CLOCK_ORIGIN + loop.time() + offset

    # ---- clients --------------------------------------------------------------------------

    def session(self, index: int, agent: str | None = None) -> AsyncSession:
        """A new SDK session of client ``index`` (its own connection to the bus)."""
        client = self._clients.get(index)
        if client is None:
            client = self._clients[index] = _ClientConnection(self.network, f"client-{index}", self.bus_endpoint)
        return _SimSession(client, agent or f"agent-{index}", f"s{index}")

    # ---- faults ---------------------------------------------------------------------------

    def _set_rates(self) -> None:
        base = self.config.network  # the network runs on a copy of it
        self.network.config.loss = max([base.loss, *self._windows["loss"]])
        self.network.config.duplicate = max([base.duplicate, *self._windows["duplicate"]])

    async def inject(self, fault: Fault, origin: float) -> None:
        """Apply ``fault`` at ``origin + fault.at``, undo it ``fault.duration`` later."""
        assert self.loop is not None
        await asyncio.sleep(max(0.0, origin + fault.at - self.loop.time()))
        cfg = self.config
        shard_id = fault.target % cfg.shards
        self.counters["faults"] += 1
        self.trace("fault", fault.kind, fault.target, fault.duration, fault.amount)
        try:
            if fault.kind in REPLICA_FAULT_KINDS:
                if self.groups is not None:
                    await self._inject_replica_fault(fault, shard_id)
            elif fault.kind == "crash":
                self.crash_shard(shard_id, int(fault.amount))
                await asyncio.sleep(fault.duration)
            elif fault.kind == "crash_reader":
                # a read-only participant dies while a commit relying on its lease is on its way
                # to its writer, and the network holds that commit back (PROTOCOL.md §5.8)
                commits = await self._lease_relied_on(shard_id)
                if commits:
                    self.counters["reader_crashes"] += 1
                    self.crash_shard(shard_id)
                    for call_id in commits:
                        self.network.hold(call_id, fault.amount)
                    self.trace("hold", commits, fault.amount)
                    await asyncio.sleep(fault.duration)
            elif fault.kind == "crash_bus":
                self.crash_bus()
                await asyncio.sleep(fault.duration)
            elif fault.kind in ("partition", "partition_bus"):
                name = "bus" if fault.kind == "partition_bus" else self._shard_name(shard_id)
                self.network.isolate(name)
                try:
                    await asyncio.sleep(fault.duration)
                finally:
                    self.network.heal(name)
            elif fault.kind == "slow":
                name = self._shard_name(shard_id)
                self.network.slow[name] = max(self.network.slow.get(name, 0.0), fault.amount)
                try:
                    await asyncio.sleep(fault.duration)
                finally:
                    self.network.slow.pop(name, None)
            elif fault.kind in ("loss", "duplicate"):
                window = self._windows[fault.kind]
                window.append(fault.amount)
                self._set_rates()
                try:
                    await asyncio.sleep(fault.duration)
                finally:
                    window.remove(fault.amount)
                    self._set_rates()
            elif fault.kind == "reset":
                ep = self._shard_endpoint(shard_id)
                end = self.loop.time() + fault.duration
                while True:
                    self.network.reset(ep)
                    self.counters["resets"] += 1
                    gap = self.network.rng.uniform(0.002, 0.05)
                    if self.loop.time() + gap > end:
                        break
                    await asyncio.sleep(gap)
            elif fault.kind == "pause" and self._clients:
                indices = sorted(self._clients)
                client = self._clients[indices[fault.target % len(indices)]]
                client.paused_until = max(client.paused_until, self.loop.time() + fault.duration)
        finally:
            if fault.kind in ("crash", "crash_reader", "kill_primary", "kill_follower", "disk_loss"):
                await self.restart_shard(shard_id)
            elif fault.kind == "crash_bus":
                self.restart_bus()
            self.trace("fault-end", fault.kind, fault.target)

    def _shard_name(self, shard_id: int) -> str:
        """The network name of shard ``shard_id``: of a replica group, its primary's (etcd's key)."""
        if self.groups is not None:
            key = self.groups.etcd.primary(shard_id)
            return SimGroups.name(shard_id, key.member if key is not None else 0)
        return f"shard-{shard_id}"

    def _shard_endpoint(self, shard_id: int) -> Endpoint:
        if self.groups is not None:
            key = self.groups.etcd.primary(shard_id)
            return self.groups.nodes[shard_id][key.member if key is not None else 0].endpoint
        return self.shard_endpoints[shard_id]

    async def _inject_replica_fault(self, fault: Fault, shard_id: int) -> None:
        """The faults of replica groups (``oribus.sim.faults``)."""
        groups = self.groups
        assert groups is not None and self.loop is not None
        key = groups.etcd.primary(shard_id)
        primary = key.member if key is not None else None
        followers = [n.member_id for n in groups.followers(shard_id)]
        pick = int(fault.amount)
        if fault.kind == "kill_primary":
            primary = await groups.exposed_primary(shard_id, pick)
            if primary is not None:
                groups.crash_member(shard_id, primary)
        elif fault.kind == "kill_follower":
            groups.crash_member(shard_id, followers[pick % len(followers)])
        elif fault.kind == "disk_loss":
            # the model's assumption: never a majority's data at once (a minority at most)
            if groups.lacking_data(shard_id) >= (self.config.replicas - 1) // 2:
                groups.counters["disk_losses_skipped"] += 1
                self.trace("disk-loss-skipped", shard_id)
                return
            if pick == 0:
                primary = await groups.exposed_primary(shard_id, 2)
            victim = primary if pick == 0 and primary is not None else followers[pick % len(followers)]
            groups.crash_member(shard_id, victim, lose_disk=True)
        elif fault.kind in ("partition_primary", "partition_follower"):
            if primary is None:
                return
            name = SimGroups.name(shard_id, primary)
            if fault.kind == "partition_follower":
                others = [SimGroups.name(shard_id, followers[pick % len(followers)])]
            else:
                others = [SimGroups.name(shard_id, r) for r in followers] + ([ETCD] if fault.amount >= 0.5 else [])
            groups.counters["primary_partitions"] += 1
            for other in others:
                self.network.cut(name, other)
            try:
                await asyncio.sleep(fault.duration)
            finally:
                for other in others:
                    self.network.cuts -= {(name, other), (other, name)}
            return
        elif fault.kind == "stale_bus":
            self.network.cut("bus", ETCD)
            try:
                await asyncio.sleep(fault.duration)
            finally:
                self.network.cuts -= {("bus", ETCD), (ETCD, "bus")}
            return
        elif fault.kind == "pause_primary":
            if primary is None:
                return
            name = SimGroups.name(shard_id, primary)
            groups.counters["primary_pauses"] += 1
            self.network.freeze(name)
            try:
                await asyncio.sleep(fault.duration)
            finally:
                self.network.thaw(name)
            return
        await asyncio.sleep(fault.duration)

    async def _lease_relied_on(self, shard_id: int, patience: float = 0.5) -> list[int]:
        """Wait (at most ``patience`` virtual seconds) until shard ``shard_id`` holds a read lease
        of a transaction whose commit point is on its way to another shard (a one-phase commit
        or a decision in flight); returns those calls' ids (none if that did not come in time)."""
        assert self.loop is not None
        others = [self._shard_endpoint(i) for i in self.shard_endpoints if i != shard_id]
        until = self.loop.time() + patience
        while self.loop.time() < until:
            shard = self.shard(shard_id)
            if shard is not None:
                calls = [c for t in shard.core.leases for ep in others for c in ep.in_flight(t, _COMMIT_POINTS)]
                if calls:
                    return calls
            await asyncio.sleep(0.0001)
        return []

    async def heal_all(self) -> None:
        """End every fault: reconnect, restore the base rates, restart what is down, unpause."""
        self.network.heal()
        for name in list(self.network.frozen):
            self.network.thaw(name)
        self.network.slow.clear()
        for w in self._windows.values():
            w.clear()
        self._set_rates()
        for i in self.shard_endpoints:
            await self.restart_shard(i)
        self.restart_bus()
        for client in self._clients.values():
            client.paused_until = 0.0
        self.trace("healed")

    def unsettled(self) -> list[str]:
        """Transactions some shard still holds prepared, and decisions not yet released."""
        out = []
        for i in self.shard_endpoints:
            shard = self.shard(i)
            if shard is None:
                out.append(f"shard {i} is down")
                continue
            out += [f"{t} prepared on shard {i}" for t in shard.core.prepared]
            out += [f"{t} unreleased on shard {i}" for t in shard.core.decisions]
        return sorted(out)

    async def settle(self, rounds: int = 40) -> list[str]:
        """Let in-flight work finish and the recovery sweep resolve everything.

        Returns what is still unsettled after ``rounds`` sweeps (empty: settled).
        """
        cfg = self.config
        # every call in flight has had time to time out, and every prepared one to expire
        await asyncio.sleep(cfg.network.call_timeout + cfg.txn_expiry_seconds)
        if self.groups is not None:
            await self.groups.wait_for_primaries(20 * cfg.lease_ttl_seconds)
        left = self.unsettled()
        for _ in range(rounds):
            if not left:
                break
            await asyncio.sleep(cfg.recovery_interval)
            left = self.unsettled()
        self.trace("settled", len(left))
        return left


# ---- a checked run -----------------------------------------------------------------------


@dataclass
class SimResult:
    """What one simulated run did and what the checker found."""

    seed: int
    faults: tuple[Fault, ...]
    report: Report
    trace_hash: str
    counters: dict[str, Any]
    history: list[dict]  # the recorded history (``specs/history.md``)
    trace: list[tuple]
    unsettled: list[str]  # transactions left prepared after healing (a liveness failure)
    internal_errors: list[str]  # handlers that raised something not an OribusError; a failed final read
    stuck: bool  # the workload did not finish within ``max_seconds`` (a liveness failure)
    # acknowledged commits whose answer lacked the new version of a key they wrote
    incomplete_results: list[str] = field(default_factory=list)
    # acknowledged commits the final state does not hold (``lost_acknowledged``)
    lost_acknowledged: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.report.ok and not self.unsettled and not self.internal_errors and not self.stuck
                and not self.incomplete_results and not self.lost_acknowledged)

    def summary(self) -> str:
        c = self.counters
        lines = [
            f"seed {self.seed}: {c['transactions']} transactions ({c['ok']} ok, {c['fail']} failed, "
            f"{c['info']} unknown), {c['faults']} faults ({c['crashes']} shard crashes, "
            f"{c['bus_crashes']} bus crashes, {c['lost_records']} unsynced WAL records lost), "
            f"{c['messages']} messages ({c['lost']} lost, {c['duplicated']} duplicated), "
            f"{c['virtual_seconds']:.2f} virtual s, trace {self.trace_hash}",
            self.report.summary(limit=5),
        ]
        if self.unsettled:
            lines.append(f"UNSETTLED after healing: {self.unsettled[:5]}")
        if self.internal_errors:
            lines.append(f"INTERNAL ERRORS: {self.internal_errors[:5]}")
        if self.stuck:
            lines.append("STUCK: the workload did not finish")
        if self.incomplete_results:
            lines.append(f"INCOMPLETE COMMIT RESULTS: {self.incomplete_results[:5]}")
        if self.lost_acknowledged:
            lines.append(f"LOST ACKNOWLEDGED COMMITS ({len(self.lost_acknowledged)}): {self.lost_acknowledged[:5]}")
        return "\n".join(lines)


def simulate(seed: int, config: SimConfig | None = None, faults: Sequence[Fault] = ()) -> SimResult:
    """Run one whole simulated cluster with ``faults`` and check its history (deterministic)."""
    config = config or SimConfig()
    with _deterministic_ids(seed), _seeded_global_random(seed):
        return run(_simulate(seed, config, tuple(faults)))


@contextlib.contextmanager
def _deterministic_ids(seed: int) -> Iterator[None]:
    """Commit ids from a per-run counter: the SDK's are unique per OS process (a random
    prefix and a process-wide counter), so two runs would otherwise differ in every id."""
    counter = iter(range(1, 1 << 62))
    saved = client_session.new_commit_id
    # the age a session passes on (born_ms) comes from the wall clock: a simulated run's ids
    # keep to the counter, so they stay the same from run to run
    client_session.new_commit_id = lambda born_ms=None: f"sim{seed}-{next(counter):x}"
    try:
        yield
    finally:
        client_session.new_commit_id = saved


@contextlib.contextmanager
def _seeded_global_random(seed: int) -> Iterator[None]:
    """The SDK's retry jitter draws from the ``random`` module: seed it for the run, then restore."""
    saved = random.getstate()
    random.seed(f"oribus-sim/{seed}/global")
    try:
        yield
    finally:
        random.setstate(saved)


async def _simulate(seed: int, config: SimConfig, faults: tuple[Fault, ...]) -> SimResult:
    cluster = SimCluster(seed, config)
    try:
        return await _run_checked(cluster, seed, config, faults)
    finally:
        cluster.close()


async def _run_checked(cluster: SimCluster, seed: int, config: SimConfig, faults: tuple[Fault, ...]) -> SimResult:
    loop = asyncio.get_running_loop()
    await cluster.start()
    recorder = Recorder(clock=loop.time)
    list_keys = workload_keys(config.list_keys)
    register_keys = [f"reg/k{i}" for i in range(config.register_keys)]
    list_sessions = [cluster.session(i) for i in range(config.list_clients)]
    origin = loop.time()
    fault_tasks = [loop.create_task(cluster.inject(f, origin)) for f in sorted(faults, key=lambda f: f.at)]
    done = asyncio.Event()
    register_tasks = [
        loop.create_task(register_client(
            cluster.session(config.list_clients + j), recorder, f"r{j}", register_keys,
            random.Random(f"oribus-sim/{seed}/register/{j}"), config, done,
        ))
        for j in range(config.register_clients if register_keys else 0)
    ]
    stuck = False
    outcomes = {"ok": 0, "fail": 0, "info": 0}
    try:
        outcomes = await asyncio.wait_for(
            run_list_append(list_sessions, recorder, txns=config.txns, duration=config.duration,
                            keys=list_keys, seed=seed, max_ops=config.max_ops),
            config.max_seconds,
        )
    except TimeoutError:
        stuck = True
    done.set()
    try:
        await asyncio.wait_for(asyncio.gather(*register_tasks), config.max_seconds)
    except TimeoutError:
        stuck = True
    for task in fault_tasks:
        task.cancel()  # faults not reached yet never happen; the others are undone
    for outcome in await asyncio.gather(*fault_tasks, return_exceptions=True):
        if isinstance(outcome, Exception):
            raise outcome  # a fault that could not be applied or undone (e.g. recovery failed)
    await cluster.heal_all()
    unsettled = await cluster.settle()
    final_error = ""
    try:
        await record_final(cluster.session(10_000, agent="final-reader"), recorder, [*list_keys, *register_keys])
    except OribusError as e:  # everything is healed and settled: this must not fail
        final_error = f"reading the final state failed: {e!r}"
    history = recorder.events
    report = check(history)
    for ev in history:
        cluster.trace("history", ev["type"], ev.get("id"), repr(ev.get("ops") or ev.get("error")))
    net = cluster.network.counters
    counters: dict[str, Any] = {
        **cluster.counters,
        "transactions": sum(1 for e in history if e["type"] == "invoke"),
        "list_append": outcomes,
        "ok": sum(1 for e in history if e["type"] == "ok"),
        "fail": sum(1 for e in history if e["type"] == "fail"),
        "info": sum(1 for e in history if e["type"] == "info"),
        "committed_checked": report.counts.get("committed", 0),
        "messages": net["messages"],
        "lost": net["lost"],
        "duplicated": net["duplicated"],
        "timeouts": net["timeouts"],
        "calls_reset": net["reset"],  # calls in flight failed by a crash or a connection reset
        "errors": dict(sorted(Counter(e["error"] for e in history if e["type"] in ("fail", "info")).items())),
        "virtual_seconds": loop.time(),
        "history_dropped_by_age": sum(
            s.store.older.stats().get("dropped_by_age", 0)
            for s in (cluster.shard(i) for i in range(config.shards)) if s is not None),
    }
    if cluster.groups is not None:
        counters.update(cluster.groups.counters)
        counters.update({f"etcd_{k}": v for k, v in cluster.groups.etcd.counters.items()})
    faults_by_kind = Counter(ev[2] for ev in cluster.events if ev[1] == "fault")
    counters["faults_by_kind"] = dict(sorted(faults_by_kind.items()))
    return SimResult(
        seed=seed, faults=faults, report=report, trace_hash=cluster.trace_hash, counters=counters,
        history=history, trace=cluster.events, unsettled=unsettled,
        internal_errors=list(cluster.network.internal_errors) + ([final_error] if final_error else []),
        stuck=stuck, incomplete_results=_incomplete_results(history),
        lost_acknowledged=lost_acknowledged(history, aged=config.history_max_age is not None),
    )


def lost_acknowledged(history: list[dict], *, aged: bool = False) -> list[str]:
    """Acknowledged commits the final state does not hold: every write of an ``ok`` event must
    be there — an appended element in its key's final list, a register's version in the key's
    final history under the commit's id (or, without a version, the commit's id somewhere in
    that history). The checker's ``lost-write`` covers this too, among its other checks; this
    one is the replication's promise on its own (``specs/replication.md`` R-1, R-2), counted
    apart, and it reports a missing final state as a loss instead of as unverifiable. ``aged``:
    the shards ran the age rule, so a register version below its key's oldest kept one may have
    been dropped (not lost): it cannot be checked, and is not reported."""
    final = next((ev for ev in history if ev["type"] == "final"), None)
    if final is None:
        return ["no final state was read"]
    state, kept = final.get("state", {}), final.get("history", {})
    lost = []
    for ev in history:
        if ev["type"] != "ok":
            continue
        for op in ev["ops"]:
            f, key, arg, version = op[0], op[1], op[2], op[3] if len(op) > 3 else None
            if f == READ:
                continue
            if f == APPEND:
                value = state.get(key, [None])[0]
                if arg not in (value or []):
                    lost.append(f"{ev['id']}: appended {arg!r} to {key!r}, not in the final list")
                continue
            entries = kept.get(key, [])
            if aged and version is not None and entries and version < min(v for v, _, _ in entries):
                continue
            commit_id = ev.get("commit_id")
            if version is not None:
                found = any(v == version and (commit_id is None or c in (None, commit_id)) for v, c, _ in entries)
            else:
                found = commit_id is not None and any(c == commit_id for _, c, _ in entries)
            if not found:
                lost.append(f"{ev['id']}: wrote {key!r} (version {version}), not in the final history")
    return lost


def _incomplete_results(history: list[dict]) -> list[str]:
    """Acknowledged transactions that wrote a key without being told its new version.

    ``specs/history.md`` lets a history leave a write's version null when the server did not
    report it (``check`` flags only an ``ok`` with some versions and some nulls:
    ``incomplete-result``); oribus always reports it (PROTOCOL.md §5.7), so here any null is a
    failure, that of a transaction's only write too.
    """
    return [
        f"{ev['id']}: no version for {op[1]!r}"
        for ev in history if ev["type"] == "ok"
        for op in ev["ops"] if op[0] != READ and op[3] is None
    ]
