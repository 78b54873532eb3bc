"""Agent-step on an etcd-registered cluster, with the audit; and the time to replace a shard.

Starts a real etcd (Debian ``etcd-server``) on free ports, ``oribus cluster
init --shards N``, N ``oribus shard --etcd`` processes and one ``oribus bus
--etcd`` (fsync on everywhere), then runs the agent-step workload of
``agent_step.py`` through the SDK (32 sessions over one connection by
default) and audits the state (no lost update, no double apply, consecutive
histories). Then it kill -9s shard 1, restarts it, and reports how long until
a commit on that shard succeeds through the bus again (the old claim's lease
must expire first: ``--lease-ttl``).

Usage::

    .venv/bin/python benchmarks/agent_step_cluster.py [--shards 3] [--clients 32] [--keys 1000]
        [--duration 10] [--warmup 2] [--lease-ttl 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_step import Window, audit, client, key_name, percentile, populate  # noqa: E402

import oribus  # noqa: E402
from oribus import SessionExpired, Unavailable  # noqa: E402
from oribus.meta.cluster_meta import ClusterConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: dict[str, subprocess.Popen] = {}
        self.args: dict[str, list[str]] = {}

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.args[name] = args
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()

    def oribus(self, name: str, *args: str) -> None:
        self.start(name, [sys.executable, "-m", "oribus.cli", *args])

    def kill9(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def restart(self, name: str) -> None:
        self.start(name, self.args[name])

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        await asyncio.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="oribus-cluster-bench-"))
    procs = Procs(work)
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("etcd is not installed (apt-get install etcd-server)")
    cport, pport = free_port(), free_port()
    url = f"http://127.0.0.1:{cport}"
    try:
        procs.start("etcd", [etcd, "--name", "b", "--data-dir", str(work / "etcd"),
                             "--listen-client-urls", url, "--advertise-client-urls", url,
                             "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                             "--initial-cluster", f"b=http://127.0.0.1:{pport}", "--log-level", "warn"])
        await wait_port(cport)
        init = subprocess.run([sys.executable, "-m", "oribus.cli", "cluster", "init", "--etcd", url,
                               "--shards", str(args.shards)], capture_output=True, text=True, cwd=ROOT)
        if init.returncode:
            raise SystemExit(init.stderr)
        ports = [free_port() for _ in range(args.shards)]
        for i, port in enumerate(ports):
            procs.oribus(f"shard-{i}", "shard", "--id", str(i), "--data-dir", str(work / f"shard-{i}"),
                         "--listen", f"127.0.0.1:{port}", "--etcd", url, "--lease-ttl", str(args.lease_ttl))
        for port in ports:
            await wait_port(port)
        bus_port = free_port()
        procs.oribus("bus", "bus", "--etcd", url, "--listen", f"127.0.0.1:{bus_port}", "--no-http",
                     "--data-dir", str(work / "bus"), "--lease-ttl", str(args.lease_ttl))
        await wait_port(bus_port)
        addr = f"127.0.0.1:{bus_port}"

        keys = [key_name(i) for i in range(args.keys)]
        w = Window(args.keys)
        async with oribus.connect(addr, agent="loader") as conn:
            populate_ids = await populate(conn, keys)
            sessions = [conn.session(agent=f"agent-{i}") for i in range(args.clients)]
            tasks = [asyncio.create_task(client(s, keys, random.Random(i), "get_many", None, w))
                     for i, s in enumerate(sessions)]
            await asyncio.sleep(args.warmup)
            w.measuring = True
            t0 = time.perf_counter()
            await asyncio.sleep(args.duration)
            w.measuring = False
            elapsed = time.perf_counter() - t0
            w.stopping = True
            await asyncio.gather(*tasks)
            problems = await audit(conn, keys, w, populate_ids, "live")
            lat = sorted(w.latencies)
            print(f"agent-step, etcd-registered cluster: {args.shards} shard processes + bus, "
                  f"{args.clients} sessions, {args.keys} keys, fsync on")
            print(f"  {w.committed / elapsed:,.0f} commits/s, {w.conflicts / elapsed:,.0f} conflicts/s, "
                  f"p50 {percentile(lat, 0.5) * 1000:.1f} ms, p99 {percentile(lat, 0.99) * 1000:.1f} ms "
                  f"in {elapsed:.1f} s; errors: {len(w.errors)}")
            print("  audit: " + ("OK (no lost update, no double apply, consecutive histories)"
                                 if not problems else "FAILED\n    " + "\n    ".join(problems)))

            # replace shard 1 and time its return through the bus
            s = conn.session(agent="prober")
            slot_map = ClusterConfig(args.shards).slot_map()
            target = next(k for k in keys if slot_map.shard_for(k) == 1)
            procs.kill9("shard-1")
            down = time.monotonic()
            procs.restart("shard-1")
            while True:
                try:
                    await s.commit({target: {"n": -1}})
                    break
                except Unavailable:
                    await asyncio.sleep(0.05)
                except SessionExpired:
                    await s.reset_session()
            print(f"  shard 1 kill -9 → serving through the bus again in {time.monotonic() - down:.2f} s "
                  f"(lease TTL {args.lease_ttl} s: the old claim must expire first)")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--lease-ttl", type=int, default=2)
    a = p.parse_args()
    try:
        import uvloop

        uvloop.run(main(a))
    except ImportError:  # pragma: no cover
        asyncio.run(main(a))
