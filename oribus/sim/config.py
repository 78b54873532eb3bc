"""``SimConfig``: one simulated cluster and its workload, in virtual seconds."""

from __future__ import annotations

from dataclasses import dataclass, field

from oribus.sim.disk import DiskConfig
from oribus.sim.network import NetworkConfig


@dataclass
class SimConfig:
    """One simulated cluster and its workload (times are virtual seconds)."""

    shards: int = 3  # shard processes
    list_clients: int = 4  # list-append clients (transaction scope), one session each
    register_clients: int = 1  # clients writing registers: rollbacks, session scope, forgets
    list_keys: int = 6  # list-append keys (few: transactions conflict often)
    register_keys: int = 3  # register keys
    duration: float = 3.0  # virtual seconds the list-append clients run (register clients meanwhile)
    txns: int | None = None  # ... or until this many list-append transactions were run in all
    max_ops: int = 4  # micro-operations per list-append transaction
    rollback_rate: float = 0.25  # register clients: share of operations that roll a key back
    session_rate: float = 0.35  # register clients: share of writes made in session scope
    forget_rate: float = 0.5  # before a session-scope write: chance to forget the other keys
    network: NetworkConfig = field(default_factory=NetworkConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    session_ttl_seconds: float = 2.0  # delivery-log TTL on every shard
    txn_expiry_seconds: float = 1.0  # the recovery sweep resolves prepared transactions older than this
    recovery_interval: float = 0.25  # seconds between recovery sweeps of the bus
    read_wait_seconds: float = 0.3  # a read of a key under a write intent waits this long
    lock_wait_seconds: float = 0.2  # a one-phase commit waits this long for locks
    snapshot_every_records: int = 1 << 40  # snapshot cadence (default: never)
    shard_resolver: bool = True  # a blocked read resolves the transaction through its primary
    history_limit: int = 1 << 30  # keep every version: the final check reads whole histories
    # The age rule (specs/engine.md "Retention"): each shard's compaction drops versions older
    # than this (virtual seconds, by its own skewed wall clock); the final check then cannot
    # see versions below a key's oldest kept one. None: no age limit, every version kept.
    history_max_age: float | None = None
    # where shards keep older versions: "memory", or "lmdb" (the disk's SimHistory, with the
    # engine's durability: what is not synced is lost by a crash); of a replica group, every
    # member keeps its own, and a catch-up ships the primary's copy with the snapshot
    history_store: str = "memory"
    max_seconds: float = 600.0  # a workload running longer than this is stuck (liveness failure)
    unsafe_disable_validation: bool = False  # BROKEN on purpose: shards accept stale commits
    # Read-only participants (specs/PROTOCOL.md §5.8): the lease, short so that faults outlast
    # it, and the clock-skew bound ε: every process's wall clock is off by a fixed amount
    # drawn from the seed within ±ε/2 (so any two differ by at most ε).
    read_lease_seconds: float = 0.3
    clock_skew_seconds: float = 0.02
    # BROKEN on purpose: a restarted shard takes new writes at once, though it lost the read
    # leases it had granted (the shards are separate processes here: the grace is needed).
    unsafe_no_restart_grace: bool = False
    # Replica groups (oribus.sim.group, specs/replication.md): 1 = one shard process as before
    # (same seed, same run); 3 or 5 = each shard a group of ReplicaMembers elected through the
    # simulated etcd.
    replicas: int = 1
    lease_ttl_seconds: float = 0.5  # the primary key's etcd lease (and so the primary lease)
    # a catch-up (snapshot, and the engine's copy with history_store="lmdb") travels in
    # messages of this many bytes: several per catch-up, so faults can cut one mid-transfer
    snapshot_chunk_bytes: int = 2 << 10
    watch_delay_seconds: float = 0.02  # a change of a primary key reaches the bus this much later, at most
    # BROKEN on purpose: a candidate with a majority of promises takes over even when another
    # promising member holds a later log position (it must not: §5 step 3).
    unsafe_elect_any: bool = False
    # BROKEN on purpose: a primary acknowledges once its own fsync returns (not a majority's).
    unsafe_ack_on_local_fsync: bool = False
