"""A replica group of real ``oribus shard`` processes over a real etcd, and a bus in front of it.

``ReplicaGroup`` starts the members of shard 0 (``--member r``, each on fixed gRPC and stream
ports in its own data directory, so a test can kill one and start it again where it was) and
a bus, and asks etcd and the members what they are: who is primary, in which term, how far
each member's log reaches. Short lease TTL and read lease, so that failovers take seconds.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from processes import Cluster, ServerProcess, cluster_bus, free_port, run_cli

from oribus.errors import OribusError
from oribus.hosts.up_groups import wait_for_voters
from oribus.meta.etcd import EtcdMeta
from oribus.meta.groups import EtcdGroups, PrimaryRecord
from oribus.rpc.replica_client import StreamPeer
from oribus.rpc.replica_codec import MemberStatus

LEASE_TTL = 2  # seconds: a dead primary's key is gone after this
READ_LEASE = 0.5  # H: the new primary's restart grace is H + 2 * SKEW
SKEW = 0.1


def member_process(log_dir: Path, etcd_url: str, shard_id: int, member: int) -> ServerProcess:
    address = f"127.0.0.1:{free_port()}"
    stream = f"127.0.0.1:{free_port()}"
    args = ["-v", "shard", "--id", str(shard_id), "--member", str(member),
            "--data-dir", str(Path(log_dir) / f"shard-{shard_id}-member-{member}"),
            "--listen", address, "--stream-listen", stream, "--etcd", etcd_url, "--lease-ttl", str(LEASE_TTL),
            "--read-lease", str(READ_LEASE), "--clock-skew", str(SKEW)]
    server = ServerProcess(f"shard-{shard_id}-member-{member}", args, log_dir, address)
    server.stream_address = stream
    return server


class ReplicaGroup:
    """``shards`` replica groups of ``replicas`` members and a bus; ``members`` are shard 0's
    (``groups[s]`` shard ``s``'s)."""

    def __init__(self, cluster: Cluster, log_dir: Path, etcd_url: str, replicas: int = 3, shards: int = 1) -> None:
        self.cluster = cluster
        self.log_dir = Path(log_dir)
        self.etcd_url = etcd_url
        self.replicas = replicas
        self.shards = shards
        self.groups = [[cluster.add(member_process(log_dir, etcd_url, s, m)) for m in range(replicas)]
                       for s in range(shards)]
        self.members = self.groups[0]
        self.bus: ServerProcess | None = None

    def data_dir(self, member: int, shard: int = 0) -> Path:
        return self.log_dir / f"shard-{shard}-member-{member}"

    async def start(self) -> ReplicaGroup:
        r = run_cli("cluster", "init", "--etcd", self.etcd_url, "--shards", str(self.shards), "--replicas",
                    str(self.replicas))
        assert r.returncode == 0, r.stderr
        everyone = [m for group in self.groups for m in group]
        for m in everyone:
            m.start()
        for m in everyone:
            await asyncio.to_thread(m.wait_serving)
        self.bus = self.cluster.add(cluster_bus(self.log_dir, self.etcd_url, lease_ttl=LEASE_TTL, http=False))
        self.bus.start()
        await asyncio.to_thread(self.bus.wait_serving)
        for shard in range(self.shards):
            await self.wait_primary(shard=shard)
            # as ``oribus up`` does: a member that opened after its group's first term began
            # is a learner until it has caught up, and a group with a learner cannot yet lose
            # its primary (the one voter left would be no majority)
            await self.wait_voters(shard=shard)
        return self

    async def primary(self, shard: int = 0) -> PrimaryRecord | None:
        meta = EtcdMeta(self.etcd_url)
        try:
            return await EtcdGroups(meta).primary(shard)
        finally:
            await meta.close()

    async def wait_primary(self, other_than: int = -1, timeout: float = 30.0, shard: int = 0) -> PrimaryRecord:
        """The primary once there is one (and it is not ``other_than``) and it serves."""
        deadline = time.monotonic() + timeout
        while True:
            p = await self.primary(shard)
            if p is not None and p.member != other_than:
                status = await self.status(p.member, shard)
                if status is not None and status.role == "primary" and status.term == p.term:
                    return p
            assert time.monotonic() < deadline, f"no primary within {timeout}s:\n{self.cluster.logs()}"
            await asyncio.sleep(0.1)

    async def wait_voters(self, timeout: float = 30.0, shard: int = 0) -> None:
        """Until every member answers as a voter (``oribus up``'s own wait, on this group)."""
        async def not_voters() -> list[str]:
            statuses = [await self.status(m, shard) for m in range(self.replicas)]
            return [f"member {m}: {s}" for m, s in enumerate(statuses) if s is None or not s.voter]

        missing = await wait_for_voters(not_voters, timeout)
        assert not missing, (f"shard {shard}: not every member a voter within {timeout}s: {missing}\n"
                             f"{self.cluster.logs()}")

    async def status(self, member: int, shard: int = 0) -> MemberStatus | None:
        stream = self.groups[shard][member].stream_address
        assert stream is not None
        peer = StreamPeer(member, stream, timeout=2.0)
        try:
            return await peer.status()
        except OribusError:
            return None
        finally:
            await peer.close()

    def restart(self, member: int, *, lose_data: bool = False, shard: int = 0) -> None:
        proc = self.groups[shard][member]
        if proc.running:
            proc.kill9()
        if lose_data:
            shutil.rmtree(self.data_dir(member, shard), ignore_errors=True)
        proc.start()
