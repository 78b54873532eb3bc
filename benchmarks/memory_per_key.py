"""Memory per key and per kept history version of one shard (issue 20).

Two measurements, each in a fresh child process so one cannot inherit the
other's heap:

* ``keys``: N keys of 100-character values, one version each, committed
  through the embedded engine (one shard, fsync on, 500 keys per commit).
  The writing session's delivery log then holds an entry per key, unless
  ``--forget`` drops them after each commit (the store's bytes alone).
  Reported: RSS growth per key, from /proc/self/status (``VmRSS``, and its
  anonymous part ``RssAnon``: a memory-mapped history file shows up in
  ``RssFile`` instead, where the kernel may drop it under pressure).
* ``versions``: K keys written V times each (103-character values, or
  ``--value-bytes``); the
  growth from the first round to the last, divided by K x (V - 1), is the
  RSS per kept history version.

A shard also remembers the outcome of its last ``max_resolved_txns``
commits (a version per written key, for idempotent retries): that memory
grows with commits too, and ``--max-resolved 1`` leaves it out of the
per-version figure.

Both also report the process's CPU time (utime + stime from /proc/self/stat)
and, for the ``keys`` run, where the bytes go: ``sys.getsizeof`` of one
key's structures in the store (``--breakdown``).

``--redis`` loads the same keys into a ``redis-server`` (no persistence)
and reports its ``used_memory`` and RSS growth per key, side by side.

``--history-store`` picks the shard's history store (``memory`` or
``lmdb``, see specs/engine.md "History store").

Usage::

    python benchmarks/memory_per_key.py                       # 300,000 keys; 2,000 x 50 versions
    python benchmarks/memory_per_key.py --keys 100000 --versions-keys 1000 --versions 30
    python benchmarks/memory_per_key.py --history-store lmdb --json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.cpu import process_cpu_seconds as cpu_seconds  # noqa: E402
from harness.cpu import process_memory as proc_memory  # noqa: E402

BATCH = 500  # keys per commit


def _settled() -> dict[str, int]:
    gc.collect()
    return proc_memory()


FORGET = False  # --forget: the writing session forgets its deliveries after each commit
MAX_RESOLVED: int | None = None  # --max-resolved: outcomes a shard keeps for retries (None: its default)


async def _open(data_dir: Path, history_store: str):  # noqa: ANN202 - the SDK's session
    from oribus.local import open_local

    overrides = {} if MAX_RESOLVED is None else {"max_resolved_txns": MAX_RESOLVED}
    return await open_local(data_dir, shards=1, history_store=history_store, shard_overrides=overrides)


def _breakdown(session: object) -> dict[str, object]:
    """sys.getsizeof of one key's structures in the shard's store."""
    engine = session._owner  # type: ignore[attr-defined]
    shard = engine.shards[0]
    store = shard.store
    key = "doc/00000000"
    sizes: dict[str, object] = {"store": type(store).__name__}
    sizes.update(store.sizes_of(key) if hasattr(store, "sizes_of") else {})
    return sizes


async def run_keys(data_dir: Path, keys: int, history_store: str, breakdown: bool) -> dict[str, object]:
    session = await _open(data_dir, history_store)
    names = [f"doc/{i:08d}" for i in range(keys)]
    value = "v" * 100
    before = _settled()
    cpu0 = cpu_seconds()
    for i in range(0, keys, BATCH):
        await session.commit({k: value for k in names[i:i + BATCH]})
        if FORGET:
            await session.forget(names[i:i + BATCH])
    cpu = cpu_seconds() - cpu0
    after = _settled()
    out: dict[str, object] = {"keys": keys, **_growth(before, after, keys, "key"), "cpu_seconds": round(cpu, 2)}
    if breakdown:
        out["breakdown"] = _breakdown(session)
    await session.close()
    return out


async def run_versions(data_dir: Path, keys: int, versions: int, history_store: str,
                       value_bytes: int) -> dict[str, object]:
    session = await _open(data_dir, history_store)
    names = [f"doc/{i:08d}" for i in range(keys)]
    batch = max(1, min(BATCH, (4 << 20) // value_bytes))  # commits of at most ~4 MiB
    for i in range(0, keys, batch):
        await session.commit({k: f"{0:03d}" + "v" * (value_bytes - 3) for k in names[i:i + batch]})
    first = _settled()
    cpu0 = cpu_seconds()
    for round_ in range(1, versions):
        for i in range(0, keys, batch):
            await session.commit({k: f"{round_:03d}" + "v" * (value_bytes - 3) for k in names[i:i + batch]})
    cpu = cpu_seconds() - cpu0
    last = _settled()
    kept = keys * (versions - 1)
    hist = await session.history(names[0])
    assert len(hist) == versions, f"history of {names[0]} holds {len(hist)} versions, not {versions}"
    await session.close()
    return {"keys": keys, "versions": versions, "value_bytes": value_bytes,
            **_growth(first, last, kept, "version"), "cpu_seconds": round(cpu, 2)}


def _growth(before: dict[str, int], after: dict[str, int], count: int, unit: str) -> dict[str, object]:
    """RSS before and after, and its growth (all of it, and anonymous memory alone) per ``unit``."""
    return {"rss_before": before["VmRSS"], "rss_after": after["VmRSS"],
            f"bytes_per_{unit}_rss": round((after["VmRSS"] - before["VmRSS"]) / count, 1),
            f"bytes_per_{unit}_anon": round((after["RssAnon"] - before["RssAnon"]) / count, 1)}


def redis_keys(keys: int) -> dict[str, object]:
    """The same keys and values in Redis, side by side: ``used_memory`` and the server's RSS growth.

    ``redis-server`` on a free loopback port in a temporary directory (no persistence: memory
    is what is compared), loaded with ``redis-cli --pipe``; stopped by pid at the end.
    """
    import shutil
    import signal
    import socket
    import time

    server = shutil.which("redis-server")
    if server is None:
        return {"error": "redis-server not installed"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="oribus-mem-redis-") as tmp:
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def cli(*a: str, stdin: bytes | None = None) -> str:
                return subprocess.run(["redis-cli", "-p", str(port), *a], input=stdin, capture_output=True,
                                      check=True).stdout.decode()

            for _ in range(100):
                try:
                    if cli("PING").strip() == "PONG":
                        break
                except subprocess.CalledProcessError:
                    pass
                time.sleep(0.05)

            def used() -> int:
                return int(next(line.split(":")[1] for line in cli("INFO", "memory").splitlines()
                                if line.startswith("used_memory:")))

            def rss() -> int:
                with open(f"/proc/{proc.pid}/status") as f:
                    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

            used0, rss0 = used(), rss()
            value = "v" * 100
            resp = b"".join(
                f"*3\r\n$3\r\nSET\r\n${len(k)}\r\n{k}\r\n${len(value)}\r\n{value}\r\n".encode()
                for k in (f"doc/{i:08d}" for i in range(keys)))
            cli("--pipe", stdin=resp)
            assert int(cli("DBSIZE").strip()) == keys
            return {"keys": keys, "bytes_per_key_used_memory": round((used() - used0) / keys, 1),
                    "bytes_per_key_rss": round((rss() - rss0) / keys, 1)}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)


def _child(args: argparse.Namespace) -> None:
    global MAX_RESOLVED, FORGET
    MAX_RESOLVED = args.max_resolved
    FORGET = args.forget
    with tempfile.TemporaryDirectory(prefix="oribus-mem-") as tmp:
        if args.child == "keys":
            result = asyncio.run(run_keys(Path(tmp), args.keys, args.history_store, args.breakdown))
        else:
            result = asyncio.run(run_versions(Path(tmp), args.versions_keys, args.versions, args.history_store,
                                              args.value_bytes))
    print(json.dumps(result))


def _in_child(args: argparse.Namespace, which: str) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", which, "--keys", str(args.keys),
           "--versions-keys", str(args.versions_keys), "--versions", str(args.versions),
           "--history-store", args.history_store, "--value-bytes", str(args.value_bytes)]
    if args.breakdown:
        cmd.append("--breakdown")
    if args.max_resolved is not None:
        cmd += ["--max-resolved", str(args.max_resolved)]
    if args.forget:
        cmd.append("--forget")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=300_000)
    parser.add_argument("--versions-keys", type=int, default=2_000)
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--value-bytes", type=int, default=103, help="value size of the versions run")
    parser.add_argument("--history-store", default="memory")
    parser.add_argument("--max-resolved", type=int,
                        help="outcomes a shard keeps for idempotent retries (default: the shard's, 100,000 "
                             "commits): each holds a version per key it wrote (about 92 B), which a per-version figure "
                             "counts unless this is 1")
    parser.add_argument("--breakdown", action="store_true", help="sizes of one key's structures")
    parser.add_argument("--redis", action="store_true",
                        help="keys run: load the same keys into a redis-server too and report its bytes per key")
    parser.add_argument("--forget", action="store_true",
                        help="keys run: the writing session forgets its deliveries after each commit, so the "
                             "figure is the store's alone (without it, it holds the session's delivery log too)")
    parser.add_argument("--only", choices=("keys", "versions"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=("keys", "versions"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    results = {"history_store": args.history_store}
    for which in ("keys", "versions"):
        if args.only in (None, which):
            results[which] = _in_child(args, which)
    if args.redis and args.only in (None, "keys"):
        results["redis"] = redis_keys(args.keys)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"history store: {args.history_store}")
    if "keys" in results:
        r = results["keys"]
        print(f"{r['keys']:,} keys x 100 B: RSS +{r['bytes_per_key_rss']} B/key "
              f"(anonymous +{r['bytes_per_key_anon']} B/key), CPU {r['cpu_seconds']} s")
        if "breakdown" in r:
            print("  one key:", r["breakdown"])
    if "redis" in results:
        r = results["redis"]
        print(f"redis, same keys: {r}" if "error" in r else
              f"redis, same keys: used_memory +{r['bytes_per_key_used_memory']} B/key, "
              f"RSS +{r['bytes_per_key_rss']} B/key")
    if "versions" in results:
        r = results["versions"]
        print(f"{r['keys']:,} keys x {r['versions']} versions x {r['value_bytes']:,} B: RSS +{r['bytes_per_version_rss']} B/version "
              f"(anonymous +{r['bytes_per_version_anon']} B/version), CPU {r['cpu_seconds']} s")


if __name__ == "__main__":
    main()
