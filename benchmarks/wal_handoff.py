"""The WAL's fsync hand-off: the loop's default executor against a flush thread per WAL.

Every group of commits waits for one flush of the WAL (``oribus.shards.wal.writer``): the
event loop hands the batch to a thread that writes and fsyncs it, and is told when it is
done. This measures what that hand-off costs, in one process on uvloop: ``--tasks`` tasks
each append a record and wait for it to be durable, in a loop, for ``--seconds``; reported
are syncs per second, flushes (batches), and CPU time per flush and per sync (``os.times``:
robust to other work on the machine). With ``--no-fsync`` the disk is out of the picture
and the hand-off is nearly all that is left.

Usage::

    .venv/bin/python benchmarks/wal_handoff.py [--seconds 3] [--tasks 1 8 32] [--no-fsync]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop  # noqa: E402

from oribus.shards.wal.writer import Wal, WalConfig  # noqa: E402


class ExecutorWal(Wal):
    """The hand-off before the flush thread: the loop's default executor."""

    def _start_flush(self) -> asyncio.Future[None]:
        flush = asyncio.get_running_loop().run_in_executor(None, self._drain)
        self._flush = flush
        flush.add_done_callback(self._flush_done)
        return flush


async def measure(cls: type[Wal], tasks: int, seconds: float, fsync: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="wal-handoff-") as d:
        wal = cls.open(d, WalConfig(unsafe_no_fsync=not fsync))
        done = 0
        measuring = stop = False

        async def writer() -> None:
            nonlocal done
            i = 0
            while not stop:
                await wal.sync(wal.append(1, {"k": "key-000417", "v": i}))
                i += 1
                if measuring:
                    done += 1

        workers = [asyncio.ensure_future(writer()) for _ in range(tasks)]
        await asyncio.sleep(0.3)
        b0, c0, t0 = wal.stats["batches"], sum(os.times()[:2]), time.perf_counter()
        measuring = True
        await asyncio.sleep(seconds)
        measuring = False
        b1, c1, t1 = wal.stats["batches"], sum(os.times()[:2]), time.perf_counter()
        stop = True
        await asyncio.gather(*workers)
        await wal.close()
    flushes = max(b1 - b0, 1)
    return {"syncs_per_s": done / (t1 - t0), "flushes": flushes, "records_per_flush": done / flushes,
            "cpu_us_per_flush": (c1 - c0) / flushes * 1e6, "cpu_us_per_sync": (c1 - c0) / max(done, 1) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--no-fsync", action="store_true", help="skip fdatasync: measure the hand-off alone")
    args = parser.parse_args()
    print(f"WAL hand-off, fsync {'off' if args.no_fsync else 'on'}, uvloop {uvloop.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for tasks in args.tasks:
        for name, cls in (("executor", ExecutorWal), ("thread", Wal)):
            r = uvloop.run(measure(cls, tasks, args.seconds, not args.no_fsync))
            print(f"  {name:8} x{tasks:<3} {r['syncs_per_s']:8.0f} syncs/s  {r['records_per_flush']:5.1f} rec/flush  "
                  f"CPU {r['cpu_us_per_flush']:6.1f} us/flush  {r['cpu_us_per_sync']:6.1f} us/sync", flush=True)


if __name__ == "__main__":
    main()
