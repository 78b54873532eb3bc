"""LMDB against SQLite (WAL mode) as a shard's on-disk history store (issue 20).

Each engine gets the same workload, in a fresh child process:

* write: K keys x V versions of ~150-byte version records (a 103-byte value
  plus agent, session, commit id and time, msgpack-encoded), written in
  batches of B records per transaction, as a shard writes the versions one
  group commit replaced;
* read: R point reads of a random (key, version) among those written, timed
  one by one (warm: the file was just written; the machine's page cache is
  left alone);
* the file size on disk, and the process's RSS (``VmRSS`` and its anonymous
  and file-backed parts, from /proc/self/status) and CPU time after each phase.

Durability modes compared (both keep the file consistent after a crash; they
differ in what each commit pays):

* ``lmdb-sync``: every batch's commit fsyncs (``sync=True``, LMDB's default);
* ``lmdb-nosync``: no fsync per commit, one ``env.sync()`` at the end (what a
  shard does at a snapshot); consistent after a process crash, and after a
  power loss only when the file system keeps write order;
* ``sqlite-normal``: WAL mode, ``synchronous=NORMAL``: no fsync per commit,
  consistent after a power loss (the last commits may be undone);
* ``sqlite-full``: WAL mode, ``synchronous=FULL``: an fsync per commit.

Usage::

    python benchmarks/history_engines.py                 # 2,000 keys x 100 versions, batches of 500
    python benchmarks/history_engines.py --keys 1000 --versions 50 --reads 5000 --json
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
from harness.cpu import process_cpu_seconds as cpu_seconds  # noqa: E402
from harness.cpu import process_memory as proc_memory  # noqa: E402

MODES = ("lmdb-sync", "lmdb-nosync", "sqlite-normal", "sqlite-full")
_VERSION = struct.Struct(">Q")  # big-endian: keys sort by (key, version)


def _records(keys: int, versions: int) -> list[tuple[str, int, bytes]]:
    """Version records in the order a shard writes them: round by round over the keys."""
    out = []
    for v in range(1, versions + 1):
        for i in range(keys):
            rec = msgpack.packb([f"{v:03d}" + "v" * 100, "agent-7", "session-1", f"commit-{v}-{i // 500}",
                                 1_765_000_000.0 + v], use_bin_type=True)
            out.append((f"doc/{i:08d}", v, rec))
    return out


class _Lmdb:
    def __init__(self, path: Path, sync: bool) -> None:
        import lmdb

        self.env = lmdb.open(str(path), map_size=1 << 34, subdir=True, sync=sync, metasync=sync,
                             readahead=False, max_dbs=0, lock=True)

    def write(self, batch: list[tuple[str, int, bytes]]) -> None:
        with self.env.begin(write=True) as txn:
            for key, version, rec in batch:
                txn.put(key.encode() + b"\x00" + _VERSION.pack(version), rec)

    def finish(self) -> None:
        self.env.sync(True)

    def read(self, key: str, version: int) -> bytes | None:
        with self.env.begin() as txn:
            return txn.get(key.encode() + b"\x00" + _VERSION.pack(version))

    def size(self, path: Path) -> int:
        return sum(f.stat().st_size for f in path.iterdir())


class _Sqlite:
    def __init__(self, path: Path, synchronous: str) -> None:
        path.mkdir()
        self.db = sqlite3.connect(path / "history.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("CREATE TABLE v (k TEXT NOT NULL, ver INTEGER NOT NULL, rec BLOB NOT NULL, "
                        "PRIMARY KEY (k, ver)) WITHOUT ROWID")

    def write(self, batch: list[tuple[str, int, bytes]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO v VALUES (?, ?, ?)", batch)
        self.db.execute("COMMIT")

    def finish(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def read(self, key: str, version: int) -> bytes | None:
        row = self.db.execute("SELECT rec FROM v WHERE k = ? AND ver = ?", (key, version)).fetchone()
        return None if row is None else row[0]

    def size(self, path: Path) -> int:
        return sum(f.stat().st_size for f in path.iterdir())


def run(mode: str, keys: int, versions: int, batch: int, reads: int, directory: Path) -> dict[str, object]:
    records = _records(keys, versions)
    path = directory / mode
    base = proc_memory()
    engine: _Lmdb | _Sqlite
    if mode.startswith("lmdb"):
        engine = _Lmdb(path, sync=mode == "lmdb-sync")
    else:
        engine = _Sqlite(path, "NORMAL" if mode == "sqlite-normal" else "FULL")
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for i in range(0, len(records), batch):
        engine.write(records[i:i + batch])
    engine.finish()
    write_s, write_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    after_write = proc_memory()
    rng = random.Random(1)
    latencies = []
    cpu0 = cpu_seconds()
    for _ in range(reads):
        key, version, rec = records[rng.randrange(len(records))]
        t = time.perf_counter_ns()
        got = engine.read(key, version)
        latencies.append(time.perf_counter_ns() - t)
        assert got == rec, (mode, key, version)
    read_cpu = cpu_seconds() - cpu0
    after_read = proc_memory()
    latencies.sort()
    return {
        "mode": mode,
        "records": len(records),
        "batch": batch,
        "write_records_per_s": round(len(records) / write_s),
        "write_batches_per_s": round(len(records) / batch / write_s, 1),
        "write_cpu_s": round(write_cpu, 2),
        "read_us_p50": round(latencies[len(latencies) // 2] / 1000, 1),
        "read_us_p99": round(latencies[int(len(latencies) * 0.99)] / 1000, 1),
        "read_us_mean": round(statistics.fmean(latencies) / 1000, 1),
        "read_cpu_s": round(read_cpu, 2),
        "file_bytes": engine.size(path),
        "file_bytes_per_record": round(engine.size(path) / len(records), 1),
        "rss_growth_after_write": after_write["VmRSS"] - base["VmRSS"],
        "rss_anon_growth_after_read": after_read["RssAnon"] - base["RssAnon"],
        "rss_file_after_read": after_read["RssFile"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=2_000)
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500, help="records per transaction (one group commit)")
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory(prefix="oribus-engines-") as tmp:
            print(json.dumps(run(args.child, args.keys, args.versions, args.batch, args.reads, Path(tmp))))
        return
    results = []
    for mode in args.modes.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--keys", str(args.keys), "--versions", str(args.versions),
             "--batch", str(args.batch), "--reads", str(args.reads)],
            check=True, capture_output=True, text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"{r['mode']:14} write {r['write_records_per_s']:>9,} rec/s ({r['write_batches_per_s']} commits/s, "
              f"CPU {r['write_cpu_s']} s)  read p50 {r['read_us_p50']} us p99 {r['read_us_p99']} us  "
              f"file {r['file_bytes_per_record']} B/rec  RSS +{r['rss_growth_after_write'] // 1024} KiB "
              f"(file-backed {r['rss_file_after_read'] // 1024} KiB)")


if __name__ == "__main__":
    main()
