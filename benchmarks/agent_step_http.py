"""Agent-step benchmark through the HTTP gateway, with the correctness audit.

The workload of ``agent_step.py``: ``--keys`` keys (default 1000) start at 0;
``--clients`` agents (default 32) loop over one step — read 3 distinct random
keys, write one of them with its counter plus one, commit only if all three
are unchanged; a refused commit is counted and not retried. The server is a
real ``oribus up`` process (fsync on) with its HTTP gateway on a free port;
the clients are aiohttp sessions in this process (uvloop), one per agent,
each with its own keep-alive connection.

Two API flavours:

- ``native``: ``POST /v1/get`` (3 keys), then ``POST /v1/commit`` in
  transaction scope (``since`` = the seqs the read returned) with the
  written key's expected version: 2 requests per step;
- ``sbus``: what an unmodified S-Bus agent sends — 3 tracked ``GET
  /shard/{key}?agent_id=``, ``POST /commit/v2`` with ``expected_version`` and
  the explicit ``read_set``, and ``POST /session`` to start the next step's
  read set afresh: 5 requests per step.

Figures for the measured window: committed steps per second, conflicts,
latency of committed steps (first read to acknowledged commit: p50/p99),
HTTP requests per second. The audit: every key's counter equals the commits
acknowledged for it (no lost update, nothing from a refused commit), read
through the gateway after the run.

Usage::

    .venv/bin/python benchmarks/agent_step_http.py [--api native sbus] [--shards 2]
        [--clients 32] [--keys 1000] [--duration 10] [--warmup 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path, shards: int) -> tuple[subprocess.Popen, str]:
    http = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "oribus.cli", "up", "--data-dir", str(data), "--shards", str(shards),
           "--listen", f"127.0.0.1:{free_port()}", "--http", http]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, start_new_session=True)
    return proc, http


async def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as h:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                async with h.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("server not ready after 30 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Run:
    def __init__(self, keys: int) -> None:
        self.keys = [f"k{i:05d}" for i in range(keys)]
        self.acked: Counter[str] = Counter()
        self.committed = 0
        self.conflicts = 0
        self.requests = 0
        self.latencies: list[float] = []
        self.measuring = False
        self.stop = False


async def native_agent(run: Run, url: str, agent: str) -> None:
    async with aiohttp.ClientSession(url) as h:
        while not run.stop:
            picks = random.sample(run.keys, 3)
            t0 = time.perf_counter()
            async with h.post("/v1/get", json={"agent": agent, "keys": picks}) as r:
                got = await r.json()
            key = picks[0]
            item = got["items"][0]
            body = {"agent": agent, "writes": {key: item["value"] + 1}, "scope": "transaction",
                    "since": got["seqs"], "expect": {key: item["version"]}}
            async with h.post("/v1/commit", json=body) as r:
                status = r.status
                await r.read()
            run.requests += 2 if run.measuring else 0
            if status == 200:
                run.acked[key] += 1
                if run.measuring:
                    run.committed += 1
                    run.latencies.append(time.perf_counter() - t0)
            elif status == 409:
                run.conflicts += run.measuring
            else:
                raise SystemExit(f"unexpected status {status}")


async def sbus_agent(run: Run, url: str, agent: str) -> None:
    async with aiohttp.ClientSession(url) as h:
        while not run.stop:
            picks = random.sample(run.keys, 3)
            t0 = time.perf_counter()
            seen = []
            for k in picks:
                async with h.get(f"/shard/{k}", params={"agent_id": agent}) as r:
                    seen.append(await r.json())
            key = picks[0]
            body = {"key": key, "expected_version": seen[0]["version"], "delta": str(int(seen[0]["content"]) + 1),
                    "agent_id": agent,
                    "read_set": [{"key": s["key"], "version_at_read": s["version"]} for s in seen]}
            async with h.post("/commit/v2", json=body) as r:
                status = r.status
                await r.read()
            async with h.post("/session", json={"agent_id": agent}) as r:
                await r.read()
            run.requests += 5 if run.measuring else 0
            if status == 200:
                run.acked[key] += 1
                if run.measuring:
                    run.committed += 1
                    run.latencies.append(time.perf_counter() - t0)
            elif status == 409:
                run.conflicts += run.measuring
            else:
                raise SystemExit(f"unexpected status {status}")


async def setup_keys(url: str, keys: list[str], api: str) -> None:
    async with aiohttp.ClientSession(url) as h:
        for i in range(0, len(keys), 200):
            chunk = keys[i:i + 200]
            if api == "sbus":
                for k in chunk:
                    async with h.post("/shard", json={"key": k, "content": "0"}) as r:
                        assert r.status == 201, await r.text()
            else:
                async with h.post("/v1/commit", json={"agent": "setup", "writes": dict.fromkeys(chunk, 0)}) as r:
                    assert r.status == 200, await r.text()


async def audit(url: str, run: Run, api: str) -> None:
    async with aiohttp.ClientSession(url) as h:
        values = {}
        after = ""
        while True:
            async with h.get("/v1/keys", params={"prefix": "k", "after": after, "limit": "1000"}) as r:
                page = await r.json()
            for it in page["items"]:
                values[it["key"]] = int(it["value"])
            if not page["next_after"]:
                break
            after = page["next_after"]
    bad = {k: (values.get(k), run.acked[k]) for k in run.keys if values.get(k) != run.acked[k]}
    if bad:
        raise SystemExit(f"AUDIT FAILED: {len(bad)} keys differ (value, acknowledged): {list(bad.items())[:5]}")
    print(f"  audit: {sum(run.acked.values())} acknowledged commits, every key's counter matches: OK")


async def measure(api: str, shards: int, clients: int, keys: int, duration: float, warmup: float) -> dict:
    data = Path(tempfile.mkdtemp(prefix="oribus-http-bench-"))
    proc, http = start_server(data / "data", shards)
    url = f"http://{http}"
    try:
        await wait_ready(url, proc)
        run = Run(keys)
        await setup_keys(url, run.keys, api)
        agent = native_agent if api == "native" else sbus_agent
        tasks = [asyncio.create_task(agent(run, url, f"agent-{i}")) for i in range(clients)]
        await asyncio.sleep(warmup)
        run.measuring = True
        t0 = time.perf_counter()
        cpu0 = os.times()
        await asyncio.sleep(duration)
        run.measuring = False
        elapsed = time.perf_counter() - t0
        cpu1 = os.times()
        run.stop = True
        await asyncio.gather(*tasks)
        await audit(url, run, api)
    finally:
        stop_server(proc)
        shutil.rmtree(data, ignore_errors=True)
    lat = sorted(run.latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "api": api, "shards": shards, "clients": clients, "keys": keys, "seconds": round(elapsed, 2),
        "commits_per_s": round(run.committed / elapsed, 1),
        "conflicts_per_s": round(run.conflicts / elapsed, 1),
        "requests_per_s": round(run.requests / elapsed, 1),
        "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2),
        "client_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--api", nargs="+", default=["native", "sbus"], choices=["native", "sbus"])
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    results = []
    for api in args.api:
        print(f"agent-step over HTTP ({api}), {args.shards} shards, {args.clients} clients, {args.keys} keys")
        r = runner(measure(api, args.shards, args.clients, args.keys, args.duration, args.warmup))
        results.append(r)
        print(f"  {r['commits_per_s']} commits/s, {r['conflicts_per_s']} conflicts/s, "
              f"{r['requests_per_s']} HTTP requests/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"client CPU {r['client_cpu_s']} s in {r['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
