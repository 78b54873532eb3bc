"""Deterministic simulation of a whole oribus cluster in one process.

A file per job:

    loop.py      an asyncio loop on virtual time, with simulated processes
    disk.py      a shard's WAL and snapshot in memory; a crash loses what was not fsynced
    network.py   the simulated network: ``SimShardClient`` (the third ShardService) and
                 ``SimBusClient``; delays, reordering, loss, duplication, partitions
    cluster.py   ``SimCluster`` (real Bus, Coordinator, Recovery and Shards over the above),
                 the fault scheduler, and ``simulate``: one checked run
    __main__.py  ``python -m oribus.sim``: the soak run over many seeds

Same seed, same run: see ``loop.py`` for how, and for replaying in another process.
"""

from oribus.sim.cluster import Fault, SimCluster, SimConfig, SimResult, random_faults, simulate

__all__ = ["Fault", "SimCluster", "SimConfig", "SimResult", "random_faults", "simulate"]
