"""Reopen time and snapshot size of one shard with deep history, per history store (issue 20).

Writes K keys x V versions of ``--value-bytes`` values through the embedded
engine (one shard, fsync on), takes a snapshot (so recovery starts from it,
not from the whole WAL), closes, and times a fresh-process reopen. With
``memory`` the snapshot holds every kept version, values included; with
``lmdb`` only the current ones (the rest is in the engine's file, which
recovery opens but does not read). Reported: snapshot bytes, reopen seconds,
RSS after the reopen (anonymous and file-backed, /proc/self/status) and the
reopen's CPU time.

Usage::

    python benchmarks/history_recovery.py                         # 1,000 keys x 30 versions x 10 KiB
    python benchmarks/history_recovery.py --keys 2000 --versions 50 --value-bytes 1024
    python benchmarks/history_recovery.py --keys 1000000 --versions 3 --value-bytes 100 --stores lmdb --forget
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_per_key import cpu_seconds, proc_memory  # noqa: E402

import oribus  # noqa: E402


async def build(data_dir: Path, store: str, keys: int, versions: int, value_bytes: int, forget: bool) -> int:
    names = [f"doc/{i:08d}" for i in range(keys)]
    batch = max(1, min(500, (4 << 20) // value_bytes))
    async with oribus.open_local(data_dir, shards=1, history_store=store) as bus:
        for r in range(versions):
            for i in range(0, keys, batch):
                await bus.commit({k: f"{r:03d}" + "v" * (value_bytes - 3) for k in names[i:i + batch]})
                if forget:  # a session-scope commit validates every delivery the session holds
                    await bus.forget(names[i:i + batch])
        await bus._owner.shards[0].snapshot()  # type: ignore[attr-defined]
    return sum(f.stat().st_size for f in (data_dir / "shard-0000" / "snapshots").iterdir())


async def reopen(data_dir: Path, store: str, key: str) -> dict[str, float]:
    gc.collect()
    before = proc_memory()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    bus = await oribus.open_local(data_dir, history_store=store)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    history = await bus.history(key)
    gc.collect()
    after = proc_memory()
    await bus.close()
    return {"reopen_seconds": round(seconds, 3), "reopen_cpu_seconds": round(cpu, 2),
            "rss_anon_growth": after["RssAnon"] - before["RssAnon"], "rss_file_after": after["RssFile"],
            "history_read": len(history)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--versions", type=int, default=30)
    parser.add_argument("--value-bytes", type=int, default=10_240)
    parser.add_argument("--stores", default="memory,lmdb")
    parser.add_argument("--forget", action="store_true",
                        help="the writing session forgets its deliveries after each commit (needed for 10^6 "
                             "keys: otherwise each commit validates every delivery held, and the build is "
                             "quadratic); the snapshot then holds no delivery log")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        store, directory = args.child
        print(json.dumps(asyncio.run(reopen(Path(directory), store, "doc/00000000"))))
        return
    for store in args.stores.split(","):
        with tempfile.TemporaryDirectory(prefix="oribus-recovery-") as tmp:
            t0 = time.perf_counter()
            snap = asyncio.run(build(Path(tmp), store, args.keys, args.versions, args.value_bytes, args.forget))
            built = time.perf_counter() - t0
            out = subprocess.run([sys.executable, __file__, "--child", store, tmp],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["history_read"] == args.versions, r
            print(f"{store:7} {args.keys:,} keys x {args.versions} versions x {args.value_bytes:,} B: snapshot "
                  f"{snap / 1e6:.1f} MB (built in {built:.0f} s), reopen {r['reopen_seconds']} s (CPU {r['reopen_cpu_seconds']} s), "
                  f"RSS +{r['rss_anon_growth'] / 1e6:.1f} MB anonymous, {r['rss_file_after'] / 1e6:.1f} MB "
                  f"file-backed")


if __name__ == "__main__":
    main()
