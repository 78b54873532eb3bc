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

The harness (``oribus.sim.harness.SimCluster.inject``) applies them; the tests draw their
schedules with hypothesis, the soak run with ``random_faults``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from oribus.sim.config import SimConfig

FAULT_KINDS = ("crash", "crash_reader", "crash_bus", "partition", "partition_bus", "slow", "loss", "duplicate",
               "pause", "reset")


@dataclass(frozen=True)
class Fault:
    """One fault of a schedule (see the module docstring for the kinds)."""

    at: float  # virtual seconds after the workload starts
    kind: str
    target: int = 0  # shard id (crash, partition) or client index (pause); taken modulo the count
    duration: float = 0.5  # until the restart / heal / end of the window / end of the pause
    amount: float = 0.0  # loss, duplicate: the probability; crash: in-flight records kept; slow, crash_reader: seconds

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
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
        }[self.kind]
        return f"t={self.at:.3f}s {what} for {self.duration:.3f}s"


def random_faults(rng: random.Random, config: SimConfig, count: int) -> list[Fault]:
    """``count`` faults at random times of the workload, of every kind."""
    faults = []
    clients = config.list_clients + config.register_clients
    for _ in range(count):
        kind = rng.choice(FAULT_KINDS)
        at = rng.uniform(0.0, config.duration)
        if kind in ("loss", "duplicate"):
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
