"""Round trips over the bus -> shard transports: gRPC (the mux) against the stream transport.

Two processes on uvloop: this one is the client, a child it starts serves one
operation, ``echo``, over both ``GrpcListener`` + ``mux_handlers`` (what a shard
server runs for gRPC) and ``StreamListener`` (its stream listener), optionally
with mutual TLS. The payload is a map shaped like a shard ``prepare`` (a
``ShardTxn``, ~250 bytes) echoed back.

For each transport and each concurrency (calls kept in flight by that many
asyncio tasks sharing one connection, as the bus's coordinators share it) the
client runs for ``--seconds`` after a warm-up and reports: round trips per
second, calls per message (batching), and CPU time per round trip of each
side, from ``os.times`` here and ``/proc/<pid>/stat`` for the server (robust to
other work on the machine, unlike the rate).

Usage::

    .venv/bin/python benchmarks/transport_roundtrip.py [--seconds 5] [--concurrency 1 32] [--tls]
        [--transports grpc stream] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from oribus.rpc import wire  # noqa: E402
from oribus.rpc.mux_client import MuxClient  # noqa: E402
from oribus.rpc.mux_server import GrpcListener, mux_handlers  # noqa: E402
from oribus.rpc.stream_client import StreamClient  # noqa: E402
from oribus.rpc.stream_server import StreamListener  # noqa: E402
from oribus.tls import (  # noqa: E402
    TlsConfig,
    channel_credentials,
    client_ssl_context,
    server_credentials,
    server_ssl_context,
)

SERVICE = wire.SHARD_SERVICE
PAYLOAD = {  # the shape of a shard prepare's arguments (shard_codec.enc_shard_txn)
    "id": "c0ffee-7f3a9b2e4d1c-0001", "s": ["agent-17", "session-17"], "w": {"key-000417": b"\x81\xa1n\x05"},
    "rb": {}, "e": {}, "r": {"key-000417": 5, "key-000022": 9, "key-000901": 3}, "sc": "session", "q": 41,
    "t": [7, 1], "st": False, "ps": [0, 1], "p": 0, "at": 1767225600.25, "@epoch": 7,
}


# ---- the server process ------------------------------------------------------------------


async def serve(tls_dir: str | None) -> None:
    async def echo(args: object) -> object:
        return args

    ops = {"echo": echo}
    tls = TlsConfig.from_dir(tls_dir) if tls_dir else None
    grpc_listener = GrpcListener("127.0.0.1:0", SERVICE, mux_handlers(SERVICE, ops),
                                 credentials=server_credentials(tls) if tls else None)
    stream_listener = StreamListener("127.0.0.1:0", SERVICE, ops, ssl=server_ssl_context(tls) if tls else None)
    await grpc_listener.start()
    await stream_listener.start()
    print(json.dumps({"grpc": grpc_listener.address, "stream": stream_listener.address}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the client closes our stdin
    await stream_listener.stop(0)
    await grpc_listener.stop(0)


# ---- the client ----------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(transport: str, address: str, tls: TlsConfig | None) -> MuxClient | StreamClient:
    if transport == "grpc":
        return MuxClient(address, SERVICE, credentials=channel_credentials(tls) if tls else None)
    return StreamClient(address, SERVICE, ssl=client_ssl_context(tls) if tls else None)


async def measure(transport: str, address: str, tls: TlsConfig | None, concurrency: int, seconds: float,
                  server_pid: int) -> dict:
    client = connect(transport, address, tls)
    done = 0
    measuring = False
    stop = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            await client.call("echo", PAYLOAD)
            if measuring:
                done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(min(1.0, seconds / 4))  # warm-up: connection, caches
    c0 = dict(client.counters)
    me0, srv0 = sum(os.times()[:2]), proc_cpu(server_pid)
    started = time.perf_counter()
    measuring = True
    await asyncio.sleep(seconds)
    measuring = False
    elapsed = time.perf_counter() - started
    me1, srv1 = sum(os.times()[:2]), proc_cpu(server_pid)
    c1 = dict(client.counters)
    stop = True
    await asyncio.gather(*tasks)
    await client.close()
    calls = c1["calls"] - c0["calls"]
    messages = c1["messages_out"] - c0["messages_out"]
    per = max(done, 1)
    return {
        "transport": transport,
        "tls": tls is not None,
        "concurrency": concurrency,
        "round_trips_per_s": done / elapsed,
        "calls_per_message": calls / messages if messages else 0.0,
        "client_cpu_us": (me1 - me0) / per * 1e6,
        "server_cpu_us": (srv1 - srv0) / per * 1e6,
    }


async def run(args: argparse.Namespace) -> list[dict]:
    tls = TlsConfig.from_dir(args.tls_dir) if args.tls_dir else None
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", *(["--tls-dir", args.tls_dir] if args.tls_dir else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        addresses = json.loads(child.stdout.readline())
        results = []
        for concurrency in args.concurrency:
            for transport in args.transports:
                r = await measure(transport, addresses[transport], tls, concurrency, args.seconds, child.pid)
                results.append(r)
                print(f"  {transport:6} {'tls' if tls else 'tcp'}  x{concurrency:<3} "
                      f"{r['round_trips_per_s']:9.0f} round trips/s  {r['calls_per_message']:5.1f} calls/msg  "
                      f"CPU per round trip: client {r['client_cpu_us']:6.1f} us, server {r['server_cpu_us']:6.1f} us",
                      flush=True)
        return results
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32],
                        help="calls kept in flight over the one connection")
    parser.add_argument("--transports", nargs="+", choices=("grpc", "stream"), default=["grpc", "stream"])
    parser.add_argument("--tls", action="store_true", help="mutual TLS (certificates made in a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.tls_dir))
        return
    with tempfile.TemporaryDirectory(prefix="transport-rt-") as tmp:
        if args.tls:
            from oribus.certs import init_certs

            init_certs(Path(tmp))
            args.tls_dir = tmp
        print(f"round trips, one connection, echo of a {len(wire.pack(PAYLOAD))}-byte prepare-shaped map; "
              f"uvloop {uvloop.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        results = uvloop.run(run(args))
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
