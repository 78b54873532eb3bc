"""What ``--auth`` costs a bus: commits/s and server CPU per commit with and without it, in
one run (issue 16: target ≤ 5% apart).

Two ``oribus up`` processes (one in-process shard each, a fresh data directory each) are
started on free loopback ports, one of them with ``--auth`` over a fresh auth directory.
Rounds alternate between them (plain, auth, plain, auth, ...) so that drift in what else
the machine runs falls on both alike. In a round, ``--clients`` asyncio clients in this
process, each its own agent with its own token (``--auth`` side), loop over an agent step
for ``--seconds``: read two keys of their own prefix, write one, commit. Reported per side:
committed steps per second (the median over rounds) and the server process's CPU per
commit (``/proc/<pid>/stat``, robust to other load), then the differences.

Rounds of the same server vary by ±30% on a shared machine; two rounds next to each other in
time share most of it, so each (plain, auth) pair's CPU per commit is also compared on its
own, and the median of those ratios reported (``paired_cpu_change_pct``). Which side goes
first alternates from one pair to the next (run as an A/A test, two servers without
``--auth``, the side that always went second came out 2.4% higher).

``--in-process`` measures the guard alone, without processes, sockets or a second core in the
way: one embedded engine (one shard, fsync on) in this process, its ``Bus`` and a
``GuardedBus`` over it, ``--clients`` tasks each stepping its own session (read two keys,
write one, commit, with the session's tokens as the SDK sends them) in alternating blocks of
``--steps`` steps per side, each block after a full collection (the process keeps the
collector's default settings, and a full collection landing in a block of one side skewed a
run); reported: this process's CPU
(``time.process_time``) per step on each side, the median of the blocks, and the difference. The agent-step's whole server path
is in it (bus, shard, delivery log, WAL), only the transport is not.

Usage::

    .venv/bin/python benchmarks/auth_overhead.py [--clients 16] [--seconds 5] [--rounds 3]
    .venv/bin/python benchmarks/auth_overhead.py --in-process [--clients 16] [--steps 4000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cpu import process_cpu_seconds as cpu_seconds  # noqa: E402

import oribus  # noqa: E402
from oribus.auth.keys import AuthDir, load_signing_key  # noqa: E402
from oribus.auth.tokens import issue  # noqa: E402
from oribus.cli import main as oribus_main  # noqa: E402
from oribus.errors import Conflict  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
POLICY = """roles:
  agent:
    read: ["bench/*"]
    write: ["bench/*"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, name: str, auth: Path | None) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        args = [sys.executable, "-m", "oribus.cli", "up", "--data-dir", str(tmp / name), "--listen", self.address,
                "--shards", "1", "--no-http"]
        if auth is not None:
            args += ["--auth", str(auth)]
        self.log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    async def wait(self, token: str | None) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                async with oribus.connect(self.address, agent="agent-0", token=token, timeout=1.0) as s:
                    await s.get("bench/probe")
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


async def round_(server: Server, tokens: list[str | None], seconds: float) -> tuple[float, float]:
    """(commits/s, server CPU µs per commit) of one round."""
    sessions = [oribus.connect(server.address, agent=f"agent-{i}", token=t) for i, t in enumerate(tokens)]
    commits = 0
    stop = False

    async def step(i: int) -> None:
        nonlocal commits
        s = sessions[i]
        keys = [f"bench/{i}/a", f"bench/{i}/b"]
        while not stop:
            got = await s.get_many(keys)
            try:
                await s.commit({keys[0]: (got[keys[0]].value or 0) + 1})
                commits += 1
            except Conflict:
                pass

    try:
        await asyncio.gather(*(s.get("bench/warm") for s in sessions))  # connections open
        cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
        tasks = [asyncio.create_task(step(i)) for i in range(len(sessions))]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(server.proc.pid) - cpu0
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    return commits / elapsed, cpu / max(commits, 1) * 1e6


def auth_dir(root: Path) -> tuple[AuthDir, str, Any]:
    """A fresh auth directory with this benchmark's policy, and its signing key."""
    oribus_main(["auth", "init", "--dir", str(root)])
    auth = AuthDir(root)
    auth.policy.write_text(POLICY)
    kid, key = load_signing_key(auth)
    return auth, kid, key


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="auth-overhead-") as d:
        tmp = Path(d)
        auth, kid, key = auth_dir(tmp / "auth")
        tokens: list[str | None] = [issue(key, kid, agent=f"agent-{i}", roles=["agent"], now=time.time(), ttl=3600)
                                    for i in range(args.clients)]
        plain, guarded = Server(tmp, "plain", None), Server(tmp, "auth", auth.root)
        try:
            await plain.wait(None)
            await guarded.wait(tokens[0])
            results: dict[str, list[tuple[float, float]]] = {"plain": [], "auth": []}
            sides = [("plain", plain, [None] * args.clients), ("auth", guarded, tokens)]
            for r in range(args.rounds):  # plain first, then auth first, ...: neither always goes second
                for side, server, toks in (sides if r % 2 == 0 else sides[::-1]):
                    results[side].append(await round_(server, toks, args.seconds))
        finally:
            plain.stop()
            guarded.stop()
    out: dict = {"clients": args.clients, "seconds": args.seconds, "rounds": args.rounds}
    for side, rows in results.items():
        out[side] = {"commits_per_s": round(statistics.median(r[0] for r in rows), 1),
                     "server_cpu_us_per_commit": round(statistics.median(r[1] for r in rows), 1),
                     "rounds": [[round(a, 1), round(b, 1)] for a, b in rows]}
    out["throughput_change_pct"] = round((out["auth"]["commits_per_s"] / out["plain"]["commits_per_s"] - 1) * 100, 1)
    out["cpu_per_commit_change_pct"] = round(
        (out["auth"]["server_cpu_us_per_commit"] / out["plain"]["server_cpu_us_per_commit"] - 1) * 100, 1)
    out["paired_cpu_change_pct"] = round((statistics.median(
        a[1] / p[1] for p, a in zip(results["plain"], results["auth"], strict=True)) - 1) * 100, 1)
    return out


async def run_in_process(args: argparse.Namespace) -> dict:
    """The guard alone: an embedded engine's Bus against a GuardedBus over it, one process."""
    from oribus.auth import Authority
    from oribus.auth.credential import CREDENTIAL
    from oribus.bus.guarded import GuardedBus
    from oribus.contract import CommitRequest
    from oribus.hosts.embedded import EmbeddedEngine, EngineConfig
    from oribus.types import SessionRef, encode_value

    with tempfile.TemporaryDirectory(prefix="auth-overhead-") as d:
        tmp = Path(d)
        auth, kid, key = auth_dir(tmp / "auth")
        tokens = [issue(key, kid, agent=f"agent-{i}", roles=["agent"], now=time.time(), ttl=3600)
                  for i in range(args.clients)]
        engine = await EmbeddedEngine.open(EngineConfig(tmp / "data", shards=1))
        try:
            sides = {"plain": engine.bus, "auth": GuardedBus(engine.bus, Authority(auth.root))}

            async def client(i: int, side: str, steps: int) -> None:
                api = sides[side]
                CREDENTIAL.set(tokens[i])  # this task's own context, as a transport sets it
                session = SessionRef(f"agent-{i}", side)
                keys = [f"bench/{i}/a", f"bench/{i}/b"]
                held: dict = {}
                for n in range(steps):
                    got = await api.read(session, keys)
                    held.update(got.tokens)
                    req = CommitRequest(session=session, commit_id=f"{side}-{i}-{n}-{time.monotonic_ns()}",
                                        writes={keys[0]: encode_value(n)}, tokens=dict(held), complete_tokens=True)
                    held.update((await api.commit(req)).tokens)

            per_step: dict[str, list[float]] = {"plain": [], "auth": []}
            for side in sides:  # warm: sessions claimed, caches filled
                await asyncio.gather(*(client(i, side, 20) for i in range(args.clients)))
            for r in range(args.rounds):
                for side in (["plain", "auth"] if r % 2 == 0 else ["auth", "plain"]):
                    gc.collect()  # each block starts with the collector's work done, not the other side's left over
                    cpu0 = time.process_time()
                    await asyncio.gather(*(client(i, side, args.steps // args.clients) for i in range(args.clients)))
                    per_step[side].append((time.process_time() - cpu0) / args.steps * 1e6)
        finally:
            await engine.close()
    out: dict = {"mode": "in-process", "clients": args.clients, "steps_per_block": args.steps, "rounds": args.rounds}
    for side, rows in per_step.items():
        out[side] = {"cpu_us_per_step": round(statistics.median(rows), 1), "blocks": [round(r, 1) for r in rows]}
    out["cpu_per_step_change_pct"] = round((out["auth"]["cpu_us_per_step"] / out["plain"]["cpu_us_per_step"] - 1) * 100, 1)
    out["paired_cpu_change_pct"] = round((statistics.median(
        a / p for p, a in zip(per_step["plain"], per_step["auth"], strict=True)) - 1) * 100, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--in-process", action="store_true", help="the guard alone, in this process (module docstring)")
    ap.add_argument("--steps", type=int, default=4000, help="--in-process: steps per block and side")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run_in_process(args) if args.in_process else run(args)), indent=1))


if __name__ == "__main__":
    main()
