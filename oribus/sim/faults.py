"""The faults a simulated run injects: ``Fault`` and ``random_faults``.

Faults (``Fault.kind``), each applied at ``at`` virtual seconds after the
workload starts and undone ``duration`` seconds later:

    crash          shard ``target`` dies: its tasks are cancelled, its memory (delivery
                   log, locks, waiters) is gone, its WAL keeps only fsynced records plus
                   ``int(amount)`` records of the batch being fsynced; calls in flight to
                   it fail. It restarts after ``duration`` with a new epoch: Shard recovery
                   replays the SimDisk, and sessions that had read from it fail closed.
    crash_reader   shard ``target`` dies (as ``crash``, keeping no in-flight record) once it
                   holds a read lease (PROTOCOL.md §5.8) of a transaction whose commit point
                   is on its way to another shard (a one-phase commit or a decision in
                   flight), within 0.5 s — nothing happens if that does not come — and the
                   network holds that message back for ``amount`` seconds: meanwhile the
                   shard restarts (after ``duration``) and others may write what it leased
    crash_bus      the bus dies (every coordinator in flight: transactions stay prepared
                   until the recovery sweep resolves them through their primary) and a
                   fresh one (empty session table) starts after ``duration``
    partition      every message to or from shard ``target`` is dropped (callers time out)
    partition_bus  the same for the bus: clients and shards cannot reach it, nor it them
    slow           every message to or from shard ``target`` takes ``amount`` seconds more
                   (a congested link, a stalled process): a commit on its way to it arrives
                   late, after others overtook it
    loss           each message is lost with probability ``amount``
    duplicate      each request is delivered twice with probability ``amount`` (for the
                   operations in ``NetworkConfig.duplicate_ops``)
    pause          client ``target`` stalls (a slow agent) for ``duration``: if that is
                   longer than the delivery-log TTL, its session expires on the shards,
                   and a commit depending on reads made before the pause must fail with
                   SessionExpired
    reset          the connections to shard ``target`` break again and again for
                   ``duration`` (a flapping link or proxy): each time, every call in flight
                   to it fails with Unavailable while the shard lives on and may still
                   run a request that was on its way (``SimNetwork.reset``)

Faults of replica groups (``SimConfig.replicas`` > 1, ``oribus.sim.group``); there the shard
faults above hit the group's primary (``crash`` kills it, ``partition`` cuts it from everyone,
etcd included), and these are added:

    kill_primary       the primary dies (it loses what it did not fsync) and restarts after
                       ``duration`` as a follower: the others elect a new primary meanwhile.
                       ``int(amount)`` 1: once its log has fsynced records no follower
                       acknowledged; 2: once a record is committed that a follower lacks
                       (within 0.5 s; ``SimGroups.exposed_primary``); 0: at once
    kill_follower      follower ``int(amount)`` (of those etcd does not name primary) dies and
                       restarts after ``duration``
    disk_loss          a member dies and its whole directory is deleted (``int(amount)`` 0: the
                       primary, once a record is committed that a follower lacks, as
                       ``kill_primary`` 2; else a follower); it restarts after ``duration`` with an empty
                       directory, as a learner that must catch up before it is a voter again.
                       Skipped if it would leave a majority of the group without its data
                       (the model's assumption: at most a minority of disks is lost at once)
    partition_primary  every message between the primary and its followers is dropped for
                       ``duration``; with ``amount`` >= 0.5 it is cut from etcd too, so its
                       lease runs out and the others elect a new primary while the bus may
                       still reach the old one
    partition_follower every message between the primary and follower ``int(amount)`` is dropped
                       for ``duration``: that follower lags behind while the other members
                       commit, and an election meanwhile must not pick it
    pause_primary      the primary's process stops (SIGSTOP) for ``duration``, drawn past its
                       lease: the others take over, and when it resumes, what it holds
                       (calls that arrived meanwhile, its batches to the followers) must
                       acknowledge nothing
    stale_bus          the bus is cut from etcd for ``duration``: its watch of the primary keys
                       stalls, so it keeps calling a primary that etcd no longer names (with
                       ``partition_primary`` or ``pause_primary``, one a newer primary has
                       moved past: only the primary lease stops it serving stale reads)

The harness (``oribus.sim.harness.SimCluster.inject``) applies them; the tests draw their
schedules with hypothesis, the soak run with ``random_faults``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from oribus.sim.config import SimConfig

FAULT_KINDS = ("crash", "crash_reader", "crash_bus", "partition", "partition_bus", "slow", "loss", "duplicate",
               "pause", "reset")
REPLICA_FAULT_KINDS = ("kill_primary", "kill_follower", "disk_loss", "partition_primary", "partition_follower",
                       "pause_primary", "stale_bus")


@dataclass(frozen=True)
class Fault:
    """One fault of a schedule (see the module docstring for the kinds)."""

    at: float  # virtual seconds after the workload starts
    kind: str
    target: int = 0  # shard id (crash, partition) or client index (pause); taken modulo the count
    duration: float = 0.5  # until the restart / heal / end of the window / end of the pause
    amount: float = 0.0  # loss, duplicate: the probability; crash: in-flight records kept; slow, crash_reader: seconds

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS and self.kind not in REPLICA_FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def describe(self) -> str:
        what = {
            "crash": f"crash shard {self.target} (keep {int(self.amount)} in-flight records)",
            "crash_reader": f"crash shard {self.target} once it holds a read lease a commit in flight "
                            f"relies on, and hold that commit back {self.amount:.3f}s",
            "crash_bus": "crash the bus",
            "partition": f"partition shard {self.target}",
            "partition_bus": "partition the bus",
            "slow": f"slow shard {self.target} down by {self.amount:.3f}s a message",
            "loss": f"lose {self.amount:.0%} of messages",
            "duplicate": f"duplicate {self.amount:.0%} of requests",
            "pause": f"pause client {self.target}",
            "reset": f"reset the connections to shard {self.target}",
            "kill_primary": f"kill the primary of shard {self.target}",
            "kill_follower": f"kill follower {int(self.amount)} of shard {self.target}",
            "disk_loss": f"kill {'the primary' if int(self.amount) == 0 else f'follower {int(self.amount)}'} of "
                         f"shard {self.target} and delete its data directory",
            "partition_primary": f"cut the primary of shard {self.target} from its followers"
                                 f"{' and etcd' if self.amount >= 0.5 else ''}",
            "partition_follower": f"cut follower {int(self.amount)} of shard {self.target} from its primary",
            "pause_primary": f"stop the primary of shard {self.target}",
            "stale_bus": "cut the bus from etcd (its watch stalls)",
        }[self.kind]
        return f"t={self.at:.3f}s {what} for {self.duration:.3f}s"


def random_faults(rng: random.Random, config: SimConfig, count: int) -> list[Fault]:
    """``count`` faults at random times of the workload, of every kind (those of replica groups
    too when ``config.replicas`` > 1)."""
    faults = []
    clients = config.list_clients + config.register_clients
    kinds = FAULT_KINDS + REPLICA_FAULT_KINDS if config.replicas > 1 else FAULT_KINDS
    ttl = config.lease_ttl_seconds
    for _ in range(count):
        kind = rng.choice(kinds)
        at = rng.uniform(0.0, config.duration)
        if kind in REPLICA_FAULT_KINDS:
            duration = rng.uniform(1.2 * ttl, 3 * ttl) if kind == "pause_primary" else rng.uniform(0.0, 3 * ttl)
            amount = rng.random() if kind == "partition_primary" else float(rng.randrange(config.replicas))
            faults.append(Fault(at, kind, rng.randrange(config.shards), duration, amount))
        elif kind in ("loss", "duplicate"):
            faults.append(Fault(at, kind, 0, rng.uniform(0.05, 1.0), rng.choice((0.02, 0.1, 0.3))))
        elif kind == "pause":
            faults.append(Fault(at, kind, rng.randrange(clients),
                                rng.uniform(0.1, 2.5 * config.session_ttl_seconds)))
        elif kind == "slow":
            faults.append(Fault(at, kind, rng.randrange(config.shards), rng.uniform(0.0, 0.5),
                                rng.choice((0.01, 0.05, 0.2, 0.5))))
        elif kind == "crash_reader":
            faults.append(Fault(at, kind, rng.randrange(config.shards), rng.uniform(0.0, 0.3),
                                rng.uniform(0.0, 1.5 * config.read_lease_seconds)))
        elif kind == "crash":
            faults.append(Fault(at, kind, rng.randrange(config.shards), rng.uniform(0.0, 0.5),
                                float(rng.choice((0, 0, 1, 3)))))
        else:
            faults.append(Fault(at, kind, rng.randrange(config.shards), rng.uniform(0.0, 0.5)))
    return faults
