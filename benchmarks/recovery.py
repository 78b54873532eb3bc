"""Recovery-rate benchmark for the shard WAL.

Builds a log of small commit-like records (with ``unsafe_no_fsync`` so the
build is quick), then times ``Wal.open(..., on_record=...)``, which runs the
full recovery scan: segment headers, every frame's CRC, LSN continuity and
msgpack decoding of every body.

    python benchmarks/recovery.py [--records N] [--segment-mib M] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oribus.shards.wal import Wal, WalConfig  # noqa: E402

RECORD_TYPE = 1
BATCH = 1000  # records per write; segments roll over at batch boundaries


def build(directory: Path, records: int, segment_bytes: int) -> float:
    """Write ``records`` commit-like records; returns the seconds it took."""
    config = WalConfig(segment_bytes=segment_bytes, unsafe_no_fsync=True)
    started = time.perf_counter()
    wal = Wal.open(directory, config)
    value = b"x" * 100
    for i in range(records):
        wal.append(RECORD_TYPE, {"k": f"key-{i % 1000}", "v": 17, "val": value, "c": "commit-id"})
        if i % BATCH == BATCH - 1:
            wal.sync_now()
    asyncio.run(wal.close())
    return time.perf_counter() - started


def recover(directory: Path) -> tuple[int, float]:
    """Open the log, replaying every record; returns (records seen, seconds)."""
    seen = 0

    def on_record(lsn: int, rtype: int, body: object) -> None:
        nonlocal seen
        seen += 1

    started = time.perf_counter()
    wal = Wal.open(directory, WalConfig(unsafe_no_fsync=True), on_record=on_record)
    elapsed = time.perf_counter() - started
    asyncio.run(wal.close())
    return seen, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--segment-mib", type=int, default=64)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to build (default: a temp dir)"
    )
    parser.add_argument("--runs", type=int, default=3, help="recovery runs; the best is reported")
    args = parser.parse_args()

    base = args.dir or Path(tempfile.mkdtemp(prefix="oribus-wal-bench-"))
    directory = base / "wal"
    try:
        build_seconds = build(directory, args.records, args.segment_mib << 20)
        files = sorted(directory.glob("*.wal"))
        size = sum(f.stat().st_size for f in files)
        print(f"built {args.records} records in {build_seconds:.2f}s")
        print(
            f"size on disk: {size / (1 << 20):.1f} MiB in {len(files)} segments "
            f"({size / args.records:.0f} bytes/record)"
        )
        best = None
        for run in range(args.runs):
            seen, seconds = recover(directory)
            if seen != args.records:
                raise SystemExit(f"recovered {seen} records, expected {args.records}")
            rate = seen / seconds
            print(
                f"recovery run {run + 1}: {seconds:.3f}s, {rate:,.0f} records/s, "
                f"{size / seconds / (1 << 20):.0f} MiB/s"
            )
            best = rate if best is None else max(best, rate)
        print(f"recovery rate (best of {args.runs}): {best:,.0f} records/s")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
