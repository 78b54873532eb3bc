"""Bytes per delivery-log entry at 1,000,000 entries.

Fills one DeliveryLog with 1,000,000 deliveries in two shapes (many small
sessions, few large ones) and reports the memory it took, measured twice:

* tracemalloc: the Python heap allocated while filling the log;
* RSS delta: the process's resident set growth (from /proc/self/statm), as a
  cross-check that includes allocator overhead tracemalloc does not see.

Each measurement runs in a fresh child process so one cannot inherit the
other's heap. Keys are created (and hashed) before measuring, as a store
holds them, and the log is handed those same objects, so key strings are not
counted: they belong to the store.

A third section measures the bare entry layouts the log could use, at the
same sizes, to show why an entry is one packed int.

Usage::

    python benchmarks/delivery_log_memory.py            # everything
    python benchmarks/delivery_log_memory.py --quick    # 100,000 entries
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oribus.delivery_log.config import DeliveryLogConfig  # noqa: E402
from oribus.delivery_log.log import SEQ_BITS, DeliveryLog  # noqa: E402
from oribus.types import SessionRef  # noqa: E402

KEY_POOL = 200_000  # distinct keys the simulated store holds
SHAPES = [(10_000, 100), (100, 10_000)]  # (sessions, keys per session)
LAYOUTS = ["packed", "two_dicts", "tuples"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _workload(sessions: int, per_session: int) -> tuple[list[str], list[list[int]]]:
    """Pre-interned keys and, per session, which of them it reads (distinct)."""
    rng = random.Random(42)
    keys = [f"team-{i % 64}/task-{i}/state" for i in range(KEY_POOL)]
    for key in keys:
        hash(key)  # a store's keys carry their cached hash
    picks = [rng.sample(range(KEY_POOL), per_session) for _ in range(sessions)]
    return keys, picks


def _fill_log(keys: list[str], picks: list[list[int]]) -> DeliveryLog:
    config = DeliveryLogConfig(max_entries_per_session=10_000_000, max_sessions=10_000_000)
    log = DeliveryLog(config)
    rng = random.Random(7)
    for n, chosen in enumerate(picks):
        session = SessionRef(f"agent-{n}", "run-1")
        for i in chosen:
            log.record(session, keys[i], rng.randint(1, 5_000))
    return log


def _fill_layout(layout: str, keys: list[str], picks: list[list[int]]) -> list[object]:
    rng = random.Random(7)
    out: list[object] = []
    for chosen in picks:
        if layout == "packed":
            packed: dict[str, int] = {}
            for seq, i in enumerate(chosen, 1):
                packed[keys[i]] = rng.randint(1, 5_000) << SEQ_BITS | seq
            out.append(packed)
        elif layout == "two_dicts":
            versions: dict[str, int] = {}
            seqs: dict[str, int] = {}
            for seq, i in enumerate(chosen, 1):
                versions[keys[i]] = rng.randint(1, 5_000)
                seqs[keys[i]] = seq
            out.append((versions, seqs))
        else:
            pairs: dict[str, tuple[int, int]] = {}
            for seq, i in enumerate(chosen, 1):
                pairs[keys[i]] = (rng.randint(1, 5_000), seq)
            out.append(pairs)
    return out


def measure(what: str, method: str, sessions: int, per_session: int) -> dict[str, float]:
    """One measurement, meant to run in a fresh process."""
    keys, picks = _workload(sessions, per_session)
    entries = sessions * per_session

    def build() -> object:
        return _fill_log(keys, picks) if what == "log" else _fill_layout(what, keys, picks)

    gc.collect()
    if method == "tracemalloc":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        built = build()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    else:
        before = _rss_bytes()
        built = build()
        gc.collect()
        used = _rss_bytes() - before
    if isinstance(built, DeliveryLog):
        assert built.stats()["entries"] == entries
    return {"entries": entries, "bytes": used, "per_entry": used / entries}


def _child(what: str, method: str, sessions: int, per_session: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, method, str(sessions), str(per_session)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 entries per shape")
    parser.add_argument(
        "--child", nargs=4, metavar=("WHAT", "METHOD", "S", "K"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        what, method, s, k = args.child
        print(json.dumps(measure(what, method, int(s), int(k))))
        return

    shapes = [(s // 10, k) if s > k else (s, k // 10) for s, k in SHAPES] if args.quick else SHAPES
    print(f"DeliveryLog memory per entry (python {sys.version.split()[0]})")
    print(
        f"{'sessions x keys':>18}  {'entries':>9}  {'tracemalloc B/entry':>20}  {'RSS delta B/entry':>18}"
    )
    for sessions, per_session in shapes:
        traced = _child("log", "tracemalloc", sessions, per_session)
        rss = _child("log", "rss", sessions, per_session)
        print(
            f"{f'{sessions:,} x {per_session:,}':>18}  {traced['entries']:>9,}"
            f"  {traced['per_entry']:>20.1f}  {rss['per_entry']:>18.1f}"
        )

    print()
    print("Bare entry layouts (tracemalloc B/entry, dicts only, no session bookkeeping)")
    print(f"{'sessions x keys':>18}  " + "  ".join(f"{name:>10}" for name in LAYOUTS))
    for sessions, per_session in shapes:
        row = [_child(name, "tracemalloc", sessions, per_session)["per_entry"] for name in LAYOUTS]
        print(f"{f'{sessions:,} x {per_session:,}':>18}  " + "  ".join(f"{v:>10.1f}" for v in row))


if __name__ == "__main__":
    main()
