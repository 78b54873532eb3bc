"""Deterministic simulation of a whole oribus cluster in one process.

A file per job:

    loop.py      an asyncio loop on virtual time, with simulated processes
    disk.py      a shard's WAL and snapshot in memory; a crash loses what was not fsynced
    network.py   the simulated network: ``SimShardClient`` (the third ShardService) and
                 ``SimBusClient``; delays, reordering, loss, duplication, partitions
    config.py    ``SimConfig``: the cluster's size, the workload, the time limits
    faults.py    ``Fault`` (crashes, partitions, loss, duplication, pauses), ``random_faults``
    workload.py  the register clients (rollbacks, session scope, forgets) beside list-append
    etcd.py      ``SimEtcd``: replica groups' term registers and primary keys bound to leases
    group.py     replica groups (``SimConfig.replicas`` 3 or 5): real ``ReplicaMember``s on real
                 files with fsyncs on virtual time, elections driven over ``SimEtcd`` as the
                 cluster layer drives them, the primary lease, the bus following the primary
    harness.py   ``SimCluster`` (real Bus, Coordinator, abandoned-transaction sweep and Shards
                 over the above), the fault scheduler, and ``simulate``: one checked run
    __main__.py  ``python -m oribus.sim``: the soak run over many seeds

With ``replicas`` 1 (the default) a shard is one process on a ``SimDisk``, as it always was:
the same seed gives the same run it gave before replica groups existed. With 3 or 5, every
shard is a replica group and the faults of ``faults.REPLICA_FAULT_KINDS`` join the others (kills
of a primary or a follower, disk loss of a minority, the primary cut from its followers and
etcd, a follower cut from the primary, the primary stopped past its lease, the bus's watch of
etcd stalled); every run is
checked for anomalies and for acknowledged commits missing from the final state
(``harness.lost_acknowledged``). ``specs/replication.md`` §9 says what that proves.

Same seed, same run: see ``loop.py`` for how, and for replaying in another process.
"""

from oribus.sim.config import SimConfig
from oribus.sim.faults import Fault, random_faults
from oribus.sim.harness import SimCluster, SimResult, simulate

__all__ = ["Fault", "SimCluster", "SimConfig", "SimResult", "random_faults", "simulate"]
