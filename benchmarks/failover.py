"""Failover time of a replica group, over many kills, and the catch-up rate of a new member.

One group of three ``oribus shard`` members (shard 0) and a bus, as real processes, on a
private etcd (the ``etcd`` binary), all in a temporary directory. A writer commits without
pause through the bus, each commit resent with the same commit id while its outcome is
unknown, and records every acknowledged version. Then, ``--kills`` times:

1. the primary (as etcd names it) is killed with SIGKILL;
2. **failover time** = from the kill to the acknowledgement of the first commit the writer
   sent after it (what a client
   sees: the lease TTL running out, the election, ``TERM_START`` on a majority, the restart
   grace, the bus following etcd, the SDK's retry); **election time** = to the moment the
   new primary's key is in etcd;
3. the killed member is started again on its data, and the next kill waits until it is a
   voter holding the new primary's commit index.

Then the **catch-up rate**: ``--catchup-records`` more commits, a follower killed, its
data directory deleted and the member started again empty; the rate is the records the
primary had committed divided by the seconds from the member's joining (its claim taken
again, once the killed process's lease ran out) until it is a voter holding them (snapshot +
log shipping + fsyncs).

At the end every acknowledged commit is read back: **lost acknowledged commits** must be 0.

    python benchmarks/failover.py [--kills 20] [--lease-ttl 2] [--catchup-records 20000] [--json]

A short smoke run: ``--kills 2 --catchup-records 500``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import oribus  # noqa: E402
from oribus import SessionExpired, Unavailable  # noqa: E402
from oribus.hosts.up_groups import PrivateEtcd  # noqa: E402
from oribus.meta.etcd import EtcdMeta  # noqa: E402
from oribus.meta.groups import EtcdGroups  # noqa: E402
from oribus.rpc.replica_client import StreamPeer  # noqa: E402
from oribus.rpc.replica_codec import MemberStatus  # noqa: E402

REPLICAS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def oribus_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "oribus.cli", *args]


class Proc:
    """One server process, restartable with the same command."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Group:
    def __init__(self, work: Path, etcd_url: str, lease_ttl: int, read_lease: float) -> None:
        self.work, self.etcd_url = work, etcd_url
        self.streams = [f"127.0.0.1:{free_port()}" for _ in range(REPLICAS)]
        self.members = [
            Proc(f"member-{m}", oribus_cli(
                "-v", "shard", "--id", "0", "--member", str(m), "--data-dir", str(self.data_dir(m)),
                "--listen", "127.0.0.1:0", "--stream-listen", self.streams[m], "--etcd", etcd_url,
                "--lease-ttl", str(lease_ttl), "--read-lease", str(read_lease), "--clock-skew", "0.05"),
                work / f"member-{m}.log")
            for m in range(REPLICAS)]
        self.bus_address = f"127.0.0.1:{free_port()}"
        self.bus = Proc("bus", oribus_cli("bus", "--etcd", etcd_url, "--listen", self.bus_address, "--no-http",
                                          "--data-dir", str(work / "bus"), "--lease-ttl", str(lease_ttl)),
                        work / "bus.log")

    def data_dir(self, member: int) -> Path:
        return self.work / f"member-{member}"

    def check_alive(self) -> None:
        """A member that ended by itself (not killed here) stops the run: it is a finding."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"{m.name} exited by itself with code {m.proc.returncode}; see {m.log}")

    async def primary(self) -> tuple[int, int]:
        meta = EtcdMeta(self.etcd_url)
        try:
            p = await EtcdGroups(meta).primary(0)
            return (p.member, p.term) if p is not None else (-1, 0)
        finally:
            await meta.close()

    async def status(self, member: int) -> MemberStatus | None:
        peer = StreamPeer(member, self.streams[member], timeout=2.0)
        try:
            return await peer.status()
        except oribus.OribusError:
            return None
        finally:
            await peer.close()

    async def wait_caught_up(self, member: int, timeout: float = 300.0) -> float:
        """Seconds until ``member`` is a voter holding the primary's commit index."""
        started = time.monotonic()
        while True:
            p, _ = await self.primary()
            lead = await self.status(p) if p >= 0 else None
            me = await self.status(member)
            if lead is not None and me is not None and me.voter and me.last[1] >= lead.commit_lsn > 0 \
                    and me.last[0] == lead.term:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"member {member} did not catch up in {timeout}s: {me} vs {lead}")
            await asyncio.sleep(0.05)


class Writer:
    """Commits without pause; every acknowledged version recorded."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.acked: dict[str, int] = {}
        self.last_ack = 0.0
        self.last_started = 0.0  # when the last acknowledged commit was first sent
        self.acks = 0
        self.unavailable = 0  # answers Unavailable during the catch-up's load (a failover under load)
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with oribus.connect(self.address, agent="failover-writer") as s:
            i = 0
            while not self.stop.is_set():
                key = f"f/{i % 500}"
                commit_id = uuid.uuid4().hex
                started = time.monotonic()
                while not self.stop.is_set():
                    try:
                        self.acked.update(await s.commit({key: i}, commit_id=commit_id))
                        self.last_ack = time.monotonic()
                        self.last_started = started
                        self.acks += 1
                        break
                    except Unavailable:
                        await asyncio.sleep(0.02)
                    except SessionExpired:  # its deliveries lived on the old primary: refused, not applied
                        await s.reset_session()
                        commit_id = uuid.uuid4().hex
                i += 1

    async def load(self, n: int, concurrency: int = 32) -> None:
        """``n`` more commits, ``concurrency`` at a time (the catch-up's backlog)."""
        async with oribus.connect(self.address, agent="failover-loader") as s:
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with sem:
                    commit_id = uuid.uuid4().hex
                    while True:  # a failover under the load (a primary that missed its lease) is retried
                        try:
                            self.acked.update(await s.commit({f"load/{i}": i}, commit_id=commit_id))
                            return
                        except Unavailable:
                            self.unavailable += 1
                            await asyncio.sleep(0.05)
                        except SessionExpired:
                            await s.reset_session()
                            commit_id = uuid.uuid4().hex

            await asyncio.gather(*(one(i) for i in range(n)))


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    return {"n": len(xs), "min": round(xs[0], 3), "p50": round(statistics.median(xs), 3),
            "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 3), "max": round(xs[-1], 3),
            "mean": round(statistics.fmean(xs), 3)}


async def main(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="oribus-failover-"))
    etcd = PrivateEtcd(work / "etcd")
    await etcd.start()
    group = Group(work, etcd.url, args.lease_ttl, args.read_lease)
    procs = [*group.members, group.bus]
    try:
        init = subprocess.run(oribus_cli("cluster", "init", "--etcd", etcd.url, "--shards", "1", "--replicas",
                                         str(REPLICAS)), capture_output=True, text=True)
        assert init.returncode == 0, init.stderr
        for m in group.members:
            m.start()
        group.bus.start()
        while (await group.primary())[0] < 0:
            group.check_alive()
            await asyncio.sleep(0.1)
        writer = Writer(group.bus_address)
        writing = asyncio.create_task(writer.run())
        while writer.acks < 20:
            group.check_alive()
            await asyncio.sleep(0.05)
        failovers, elections = [], []
        for k in range(args.kills):
            group.check_alive()
            member, term = await group.primary()
            before = writer.acks
            group.members[member].kill9()
            killed = time.monotonic()
            while (p := await group.primary())[0] in (-1, member):
                await asyncio.sleep(0.01)
            elections.append(time.monotonic() - killed)
            # the first commit sent after the kill and acknowledged (one in flight at the kill
            # may still be answered from the socket's buffer: that is no write flowing again)
            while writer.acks == before or writer.last_started <= killed:
                await asyncio.sleep(0.005)
            failovers.append(writer.last_ack - killed)
            print(f"kill {k + 1}: member {member} (term {term}) -> member {p[0]} (term {p[1]}): "
                  f"elected after {elections[-1]:.2f}s, writes again after {failovers[-1]:.2f}s",
                  file=sys.stderr, flush=True)
            group.members[member].start()
            await group.wait_caught_up(member)
        writer.stop.set()
        await writing

        # catch-up of a member that lost its disk
        term_before_load = (await group.primary())[1]
        await writer.load(args.catchup_records)
        # a primary that missed its lease under the load (no kill) is a failover too: counted
        failovers_under_load = (await group.primary())[1] - term_before_load
        member, _ = await group.primary()
        follower = next(m for m in range(REPLICAS) if m != member)
        lead = await group.status(member)
        assert lead is not None
        group.members[follower].kill9()
        shutil.rmtree(group.data_dir(follower))
        group.members[follower].start()
        restarted = time.monotonic()
        while await group.status(follower) is None:  # joined: its old claim's lease ran out, it claimed again
            await asyncio.sleep(0.01)
        joined = time.monotonic() - restarted
        seconds = await group.wait_caught_up(follower)
        rate = lead.commit_lsn / seconds if seconds else 0.0
        print(f"catch-up: {lead.commit_lsn} records in {seconds:.2f}s ({rate:.0f} records/s) after joining "
              f"{joined:.2f}s after its start", file=sys.stderr)

        got = {}
        async with oribus.connect(group.bus_address, agent="failover-checker") as check:
            keys = sorted(writer.acked)
            for i in range(0, len(keys), 5000):  # a read names at most 10000 keys
                got.update(await check.get_many(keys[i:i + 5000]))
        lost = sum(1 for k, v in writer.acked.items() if got[k].version < v)
        return {"kills": args.kills, "lease_ttl": args.lease_ttl, "read_lease": args.read_lease,
                "failover_seconds": summary(failovers), "election_seconds": summary(elections),
                "catchup": {"records": lead.commit_lsn, "seconds": round(seconds, 3),
                            "records_per_second": round(rate), "joined_after_seconds": round(joined, 3)},
                "failovers_under_load": failovers_under_load, "unavailable_under_load": writer.unavailable,
                "acknowledged_commits": len(writer.acked), "lost_acknowledged_commits": lost}
    finally:
        for p in procs:
            p.stop()
        await etcd.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--lease-ttl", type=int, default=2)
    parser.add_argument("--read-lease", type=float, default=0.5)
    parser.add_argument("--catchup-records", type=int, default=20000)
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, data)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    sys.exit(1 if result["lost_acknowledged_commits"] else 0)
