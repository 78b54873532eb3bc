"""Deterministic simulation of a whole oribus cluster in one process.

A file per job:

    loop.py      an asyncio loop on virtual time, with simulated processes
    disk.py      a shard's WAL and snapshot in memory; a crash loses what was not fsynced
    network.py   the simulated network: ``SimShardClient`` (the third ShardService) and
                 ``SimBusClient``; delays, reordering, loss, duplication, partitions
    config.py    ``SimConfig``: the cluster's size, the workload, the time limits
    faults.py    ``Fault`` (crashes, partitions, loss, duplication, pauses), ``random_faults``
    workload.py  the register clients (rollbacks, session scope, forgets) beside list-append
    harness.py   ``SimCluster`` (real Bus, Coordinator, abandoned-transaction sweep and Shards
                 over the above), the fault scheduler, and ``simulate``: one checked run
    __main__.py  ``python -m oribus.sim``: the soak run over many seeds

Same seed, same run: see ``loop.py`` for how, and for replaying in another process.
"""

from oribus.sim.config import SimConfig
from oribus.sim.faults import Fault, random_faults
from oribus.sim.harness import SimCluster, SimResult, simulate

__all__ = ["Fault", "SimCluster", "SimConfig", "SimResult", "random_faults", "simulate"]
