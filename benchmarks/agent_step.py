"""Agent-step benchmark of the embedded engine, with a correctness audit.

The workload is the one oribus is compared on with Redis WATCH/MULTI,
PostgreSQL SERIALIZABLE and etcd Txn (specs/ARCHITECTURE.md, "Measured costs"):

- ``--keys`` keys (default 1000) are written first, each with ``{"n": 0}``;
- ``--clients`` asyncio clients (default 32) each hold their own session
  (``bus.session(agent="agent-<i>")``) and loop over one step: a transaction
  reads 3 distinct random keys (one ``get_many``, or three ``get`` with
  ``--read gets``), writes one of them with its counter plus one, and
  commits. oribus refuses the commit with Conflict if any of the three
  changed since it was read; a refused step is counted and not retried.
- after ``--warmup`` seconds, a window of ``--duration`` seconds is measured:
  committed transactions per second, conflicts per second, latency of
  committed transactions (first read to acknowledged commit), and the WAL
  group commit (fsyncs, records per fsync) from ``bus.stats()``.

In the embedded engine a read that finds no lock returns without
suspending, so with one shard a client may read and validate its commit
without any other client running in between, and conflicts are rare.
``--think MS`` pauses between the reads and the commit (``--think 0`` is one
event-loop yield), as an agent working on what it read would.

The engine runs with its default configuration: every commit is fsynced
before it is acknowledged. Each configuration gets a fresh data directory.

After every run the harness audits what it measured, before and after
closing and reopening the engine (which replays the WAL):

- each key's counter equals the number of commits acknowledged for it, and
  its version is one more (the initial write): no lost update, no double
  apply, and nothing from a refused commit;
- the sum of the counters equals the total of acknowledged commits;
- each key's history has consecutive versions, each carrying counter
  ``version - 1``, each written by an acknowledged commit of that key (no
  refused commit id, no commit id twice).

Usage::

    .venv/bin/python benchmarks/agent_step.py [--shards 1 4] [--clients 32]
        [--keys 1000] [--duration 10] [--warmup 2] [--read get_many|gets|both]
        [--think MS] [--json out.json] [--profile]

``--profile`` runs only the 1-shard case, with cProfile on the event-loop
thread during the measured window, and prints the top 25 functions by
cumulative time, normalised per transaction attempt (the WAL's fsyncs run in
a worker thread and are not in the profile; cProfile also slows everything,
so figures of a profiled run are not the benchmark's figures).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import platform
import pstats
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import oribus  # noqa: E402
from oribus import AsyncSession, Conflict, OribusError  # noqa: E402

try:
    import uvloop
except ImportError:  # the figures are meant to be taken with uvloop; say so when it is missing
    uvloop = None
from harness.cpu import process_cpu_seconds as cpu_seconds  # noqa: E402

READS_PER_STEP = 3
KEY_PREFIX = "bench/k"
POPULATE_BATCH = 100  # keys per commit while populating
PROFILE_TOP = 25


def key_name(i: int) -> str:
    return f"{KEY_PREFIX}{i:05d}"


@dataclass
class RunConfig:
    shards: int
    clients: int
    keys: int
    duration: float
    warmup: float
    read_mode: str  # "get_many" (one read of 3 keys) or "gets" (three reads of 1 key)
    seed: int
    think: float | None = None  # seconds slept between the reads and the commit (None: no await)
    history_store: str = "memory"  # where older versions live (specs/engine.md "History store")


@dataclass
class RunResult:
    shards: int
    clients: int
    keys: int
    read_mode: str
    think_ms: float | None  # pause between reads and commit (None: none)
    duration: float  # seconds actually measured
    committed: int  # commits acknowledged in the window
    conflicts: int  # commits refused (Conflict, Aborted) in the window
    committed_per_s: float
    conflicts_per_s: float
    conflict_rate: float  # conflicts / attempts
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    wal_fsyncs: int  # data fsyncs of all shards in the window
    wal_records: int  # WAL records of all shards in the window
    records_per_fsync: float
    avg_fsync_ms: float  # mean fsync time over the run, all shards
    commits_1pc: int  # in the window, from the coordinator's counters
    commits_2pc: int
    errors: int  # commits that failed with anything but a conflict (whole run)
    total_acked: int  # commits acknowledged over the whole run (warm-up included)
    audit_ok: bool
    audit_problems: list[str] = field(default_factory=list)
    reopen_seconds: float = 0.0  # close + reopen (WAL replay) before the second audit
    load_average: float = (
        0.0  # 1-minute load average at the end of the window (other work on the machine)
    )
    cpu_ms_per_commit: float = 0.0  # the process's CPU time (user + system, /proc) in the window per commit
    engine_commits: int = 0  # LMDB transactions (one fdatasync each) of all shards' history stores in the window


# ---- one client ------------------------------------------------------------------


class Window:
    """What the clients share: the phase, and everything they count."""

    def __init__(self, keys: int) -> None:
        self.measuring = False
        self.stopping = False
        self.committed = 0
        self.conflicts = 0
        self.latencies: list[float] = []
        self.acked: list[int] = [0] * keys  # acknowledged commits per key, whole run
        self.acked_ids: list[set[str]] = [set() for _ in range(keys)]
        self.refused_ids: set[str] = set()
        self.errors: list[str] = []


async def client(
    session: AsyncSession,
    keys: list[str],
    rng: random.Random,
    read_mode: str,
    think: float | None,
    w: Window,
) -> None:
    index = {k: i for i, k in enumerate(keys)}
    perf = time.perf_counter
    while not w.stopping:
        chosen = rng.sample(keys, READS_PER_STEP)
        target = chosen[0]
        started = perf()
        tx = session.transaction()
        try:
            if read_mode == "get_many":
                items = await tx.get_many(chosen)
                old = items[target].value
            else:
                old = None
                for k in chosen:
                    item = await tx.get(k)
                    if k == target:
                        old = item.value
            if think is not None:
                # An agent works between reading and committing. Without this, in the
                # embedded engine nothing may suspend between the reads and the commit's
                # validation (no network hop), so other clients can hardly slip in.
                await asyncio.sleep(think)
            tx.put(target, {"n": old["n"] + 1, "by": session.agent})
            await tx.commit()
        except Conflict:  # Aborted included: refused, nothing applied
            w.refused_ids.add(tx.commit_id)
            if w.measuring:
                w.conflicts += 1
            continue
        except OribusError as e:
            # The outcome of such a commit is unknown to the client; the audit reports it.
            w.errors.append(f"{type(e).__name__}: {e}")
            continue
        elapsed = perf() - started
        i = index[target]
        w.acked[i] += 1
        w.acked_ids[i].add(tx.commit_id)
        if w.measuring:
            w.committed += 1
            w.latencies.append(elapsed)


# ---- the audit ---------------------------------------------------------------------


async def audit(
    bus: AsyncSession, keys: list[str], w: Window, populate_ids: set[str], label: str
) -> list[str]:
    """Check the state against what the clients were told; returns the problems found."""
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < 20:
            problems.append(f"{label}: {text}")

    reader = bus.session(agent="auditor")
    items = await reader.get_many(keys)
    total = 0
    for i, k in enumerate(keys):
        item = items[k]
        n = item.value["n"] if isinstance(item.value, dict) else None
        if n != w.acked[i]:
            problem(f"{k}: counter {n}, but {w.acked[i]} commits were acknowledged")
        if item.version != 1 + w.acked[i]:
            problem(f"{k}: version {item.version}, expected {1 + w.acked[i]}")
        total += n or 0
    if total != sum(w.acked):
        problem(f"sum of counters {total} != {sum(w.acked)} acknowledged commits")

    for i, k in enumerate(keys):
        history = await reader.history(k)
        current = items[k].version
        if not history:
            problem(f"{k}: empty history")
            continue
        if history[0].version != current:
            problem(f"{k}: newest history version {history[0].version} != current {current}")
        seen: set[str] = set()
        for depth, entry in enumerate(history):
            if entry.version != current - depth:
                problem(
                    f"{k}: history not consecutive at {entry.version} (expected {current - depth})"
                )
                break
            if (
                entry.deleted
                or not isinstance(entry.value, dict)
                or entry.value.get("n") != entry.version - 1
            ):
                problem(
                    f"{k}: version {entry.version} holds {entry.value!r}, expected counter {entry.version - 1}"
                )
            if entry.commit_id in seen:
                problem(f"{k}: commit {entry.commit_id} applied twice")
            seen.add(entry.commit_id)
            if entry.version == 1:
                if entry.commit_id not in populate_ids:
                    problem(f"{k}: version 1 written by unknown commit {entry.commit_id}")
            elif entry.commit_id in w.refused_ids:
                problem(f"{k}: version {entry.version} written by refused commit {entry.commit_id}")
            elif entry.commit_id not in w.acked_ids[i]:
                problem(
                    f"{k}: version {entry.version} written by commit {entry.commit_id} not acknowledged for it"
                )
    return problems


# ---- one run -------------------------------------------------------------------------


def wal_totals(stats: dict) -> tuple[int, int, float]:
    """(fsyncs, records, fsync seconds) summed over the shards."""
    fsyncs = records = 0
    seconds = 0.0
    for shard in stats["shards"]:
        wal = shard.get("wal") or {}
        f = int(wal.get("fsyncs", 0))
        fsyncs += f
        records += int(wal.get("records", 0))
        seconds += float(wal.get("avg_fsync_seconds", 0.0)) * f
    return fsyncs, records, seconds


def engine_commits(stats: dict) -> int:
    """LMDB commits of the shards' history stores (0 with ``memory``)."""
    return sum(int((shard.get("history") or {}).get("commits", 0)) for shard in stats["shards"])


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


async def populate(bus: AsyncSession, keys: list[str]) -> set[str]:
    ids: set[str] = set()
    for start in range(0, len(keys), POPULATE_BATCH):
        commit_id = f"populate-{start}"
        batch = keys[start : start + POPULATE_BATCH]
        await bus.commit({k: {"n": 0, "by": "loader"} for k in batch}, commit_id=commit_id)
        ids.add(commit_id)
    return ids


async def run_one(
    cfg: RunConfig, data_dir: Path, profiler: cProfile.Profile | None = None
) -> RunResult:
    keys = [key_name(i) for i in range(cfg.keys)]
    w = Window(cfg.keys)
    bus = await oribus.open_local(data_dir, shards=cfg.shards, agent="loader", history_store=cfg.history_store)
    try:
        populate_ids = await populate(bus, keys)
        sessions = [bus.session(agent=f"agent-{i}") for i in range(cfg.clients)]
        tasks = [
            asyncio.create_task(
                client(
                    s, keys, random.Random(cfg.seed * 1_000_003 + i), cfg.read_mode, cfg.think, w
                )
            )
            for i, s in enumerate(sessions)
        ]
        await asyncio.sleep(cfg.warmup)

        before = await bus.stats()
        if profiler is not None:
            profiler.enable()
        w.measuring = True
        started, cpu_started = time.perf_counter(), cpu_seconds()
        await asyncio.sleep(cfg.duration)
        w.measuring = False
        measured, cpu_measured = time.perf_counter() - started, cpu_seconds() - cpu_started
        if profiler is not None:
            profiler.disable()
        after = await bus.stats()
        load_average = os.getloadavg()[0]

        w.stopping = True
        await asyncio.gather(*tasks)

        problems = await audit(bus, keys, w, populate_ids, "live")
    except BaseException:
        await bus.close()
        raise
    await bus.close()

    # Durability: everything acknowledged must come back from the WAL.
    t0 = time.perf_counter()
    reopened = await oribus.open_local(data_dir, shards=cfg.shards, agent="loader",
                                       history_store=cfg.history_store)
    reopen_seconds = time.perf_counter() - t0
    try:
        problems += await audit(reopened, keys, w, populate_ids, "reopened")
    finally:
        await reopened.close()
    if w.errors:
        problems.insert(
            0,
            f"{len(w.errors)} commits failed with an error (outcome unknown), first: {w.errors[0]}",
        )

    f0, r0, s0 = wal_totals(before)
    f1, r1, s1 = wal_totals(after)
    fsyncs, records = f1 - f0, r1 - r0
    c0, c1 = before["coordinator"], after["coordinator"]
    lat = sorted(w.latencies)
    attempts = w.committed + w.conflicts
    return RunResult(
        shards=cfg.shards,
        clients=cfg.clients,
        keys=cfg.keys,
        read_mode=cfg.read_mode,
        think_ms=None if cfg.think is None else cfg.think * 1e3,
        duration=measured,
        committed=w.committed,
        conflicts=w.conflicts,
        committed_per_s=w.committed / measured,
        conflicts_per_s=w.conflicts / measured,
        conflict_rate=w.conflicts / attempts if attempts else 0.0,
        p50_ms=percentile(lat, 50) * 1e3,
        p95_ms=percentile(lat, 95) * 1e3,
        p99_ms=percentile(lat, 99) * 1e3,
        mean_ms=(sum(lat) / len(lat) * 1e3) if lat else 0.0,
        wal_fsyncs=fsyncs,
        wal_records=records,
        records_per_fsync=records / fsyncs if fsyncs else 0.0,
        avg_fsync_ms=(s1 / f1 * 1e3) if f1 else 0.0,
        commits_1pc=c1["commits_1pc"] - c0["commits_1pc"],
        commits_2pc=c1["commits_2pc"] - c0["commits_2pc"],
        errors=len(w.errors),
        total_acked=sum(w.acked),
        audit_ok=not problems,
        audit_problems=problems,
        reopen_seconds=reopen_seconds,
        load_average=load_average,
        cpu_ms_per_commit=cpu_measured * 1e3 / w.committed if w.committed else 0.0,
        engine_commits=engine_commits(after) - engine_commits(before),
    )


def run_fresh(
    cfg: RunConfig, base: Path | None, profiler: cProfile.Profile | None = None
) -> RunResult:
    """Run one configuration in a new data directory, on uvloop when available."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"agent-step-{cfg.shards}s-", dir=base))
    try:
        factory = uvloop.new_event_loop if uvloop is not None else None
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(run_one(cfg, data_dir, profiler))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


# ---- output ---------------------------------------------------------------------------

COLUMNS = [  # title, format of a cell, RunResult field (None: computed in format_row)
    ("shards", "{:d}", "shards"),
    ("clients", "{:d}", "clients"),
    ("read", "{}", "read_mode"),
    ("think", "{}", None),
    ("commit/s", "{:.0f}", "committed_per_s"),
    ("confl/s", "{:.0f}", "conflicts_per_s"),
    ("confl%", "{:.1%}", "conflict_rate"),
    ("p50 ms", "{:.2f}", "p50_ms"),
    ("p95 ms", "{:.2f}", "p95_ms"),
    ("p99 ms", "{:.2f}", "p99_ms"),
    ("fsyncs", "{:d}", "wal_fsyncs"),
    ("rec/fsync", "{:.1f}", "records_per_fsync"),
    ("fsync ms", "{:.3f}", "avg_fsync_ms"),
    ("CPU ms/c", "{:.3f}", "cpu_ms_per_commit"),
    ("engine tx", "{:d}", "engine_commits"),
    ("2pc%", "{:.1%}", None),
    ("load", "{:.1f}", "load_average"),
    ("audit", "{}", None),
]


def row_cells(r: RunResult) -> list[str]:
    cells = []
    for title, fmt, attr in COLUMNS:
        if title == "2pc%":
            total = r.commits_1pc + r.commits_2pc
            value: Any = r.commits_2pc / total if total else 0.0
        elif title == "think":
            value = "-" if r.think_ms is None else f"{r.think_ms:g}ms"
        elif title == "audit":
            value = "ok" if r.audit_ok else "FAIL"
        else:
            value = getattr(r, attr)
        cells.append(fmt.format(value))
    return cells


def print_table(results: list[RunResult]) -> None:
    rows = [[title for title, _, _ in COLUMNS]] + [row_cells(r) for r in results]
    widths = [max(len(row[c]) for row in rows) for c in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    for r in results:
        status = "ok" if r.audit_ok else "FAILED"
        print(
            f"audit {r.shards} shard(s), {r.read_mode}: {status}: {r.total_acked} commits acknowledged "
            f"(warm-up included); counters and histories checked live and after reopen "
            f"(reopen {r.reopen_seconds:.2f}s)"
        )
        for p in r.audit_problems:
            print(f"    {p}")


def print_profile(profiler: cProfile.Profile, attempts: int) -> None:
    """Top functions by cumulative time, with calls and microseconds per transaction attempt."""
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((cumtime, tottime, ncalls, filename, line, name))
    per = max(attempts, 1)

    def where(filename: str, line: int, name: str) -> str:
        if filename == "~":
            return name  # a builtin
        root = str(Path(__file__).resolve().parent.parent) + os.sep
        short = filename[len(root) :] if filename.startswith(root) else Path(filename).name
        return f"{short}:{line}({name})"

    def show(title: str, ordered: list[tuple]) -> None:
        print(title)
        print(f"{'calls/tx':>9} {'self us/tx':>11} {'cum us/tx':>10}  function")
        for cumtime, tottime, ncalls, filename, line, name in ordered[:PROFILE_TOP]:
            print(
                f"{ncalls / per:>9.2f} {tottime / per * 1e6:>11.1f} {cumtime / per * 1e6:>10.1f}  "
                f"{where(filename, line, name)}"
            )

    total = sum(r[1] for r in rows)
    print(
        f"\nprofile of the measured window: {attempts} transaction attempts, "
        f"{total / per * 1e6:.0f} us of event-loop-thread CPU per attempt (under cProfile)"
    )
    show(
        f"\ntop {PROFILE_TOP} by cumulative time (coroutines count each resumption as a call):",
        sorted(rows, key=lambda r: r[0], reverse=True),
    )
    show(f"\ntop {PROFILE_TOP} by self time:", sorted(rows, key=lambda r: r[1], reverse=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shards", type=int, nargs="+", default=[1, 4], help="shard counts to run (default: 1 4)"
    )
    parser.add_argument(
        "--clients", type=int, default=32, help="concurrent clients, one session each"
    )
    parser.add_argument("--keys", type=int, default=1000, help="keys in the key space")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds run before measuring")
    parser.add_argument(
        "--read",
        choices=["get_many", "gets", "both"],
        default="get_many",
        help="one get_many of 3 keys, three gets, or both variants",
    )
    parser.add_argument(
        "--think",
        type=float,
        default=None,
        metavar="MS",
        help="pause between the reads and the commit, in ms (0: one event-loop yield; "
        "default: no pause at all)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--history-store", choices=["memory", "lmdb"], default="memory",
                        help="where the shards keep versions older than the current one")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to create data directories (default: temp)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run only the 1-shard case under cProfile and print where the time goes",
    )
    args = parser.parse_args()
    if args.keys < READS_PER_STEP or args.clients < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("need keys >= 3, clients >= 1, duration > 0 and warmup >= 0")

    modes = ["get_many", "gets"] if args.read == "both" else [args.read]
    loop_name = (
        f"uvloop {uvloop.__version__}" if uvloop is not None else "asyncio (uvloop not installed!)"
    )
    print(
        f"agent-step: {args.clients} clients, {args.keys} keys, read 3 / write 1 per transaction, "
        f"warm-up {args.warmup:g}s, window {args.duration:g}s, fsync on, {loop_name}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )

    profiler = cProfile.Profile() if args.profile else None
    shard_counts = [1] if args.profile else args.shards
    results: list[RunResult] = []
    for shards in shard_counts:
        for mode in modes:
            think = None if args.think is None else args.think / 1e3
            cfg = RunConfig(
                shards, args.clients, args.keys, args.duration, args.warmup, mode, args.seed, think,
                args.history_store,
            )
            results.append(run_fresh(cfg, args.dir, profiler))
            if profiler is not None:
                break  # one profiled run
    print()
    if args.profile:
        print("(profiled run: cProfile slows the event loop, these are not benchmark figures)")
    print_table(results)
    if profiler is not None:
        print_profile(profiler, results[0].committed + results[0].conflicts)

    if args.json is not None:
        doc = {
            "workload": "agent-step",
            "loop": loop_name,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "fsync": True,
            "warmup": args.warmup,
            "think_ms": args.think,
            "profiled": bool(args.profile),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if not all(r.audit_ok for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
