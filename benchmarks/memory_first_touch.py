"""What a page of memory costs the first time a process writes to it, GiB after GiB.

A store that grows during a run — history kept in memory, large values, a log in the page
cache — takes a page fault per 4 KiB page it grows into: the kernel finds a free page and
zeroes it. On a virtual machine whose host backs guest memory only when the guest first
uses it (and may take freed memory back), a page the guest has not used lately costs
several times one it has: the figures of a run that grows by GBs then depend on how much
of the guest's memory is warm, not only on the software measured. This maps ``--gib``
GiB of anonymous memory and writes one byte per page, reporting microseconds per page
for each GiB; run it twice to see the second pass over memory the first one warmed.

Usage::

    .venv/bin/python benchmarks/memory_first_touch.py [--gib 8] [--passes 2]
"""

from __future__ import annotations

import argparse
import mmap
import time

PAGE = 4096
GIB = 1 << 30


def touch_pass(gib: int) -> list[float]:
    """µs per page written, for each GiB of one fresh mapping of ``gib`` GiB."""
    region = mmap.mmap(-1, gib * GIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        out = []
        for start in range(0, gib * GIB, GIB):
            t0 = time.perf_counter()
            for offset in range(start, start + GIB, PAGE):
                region[offset] = 1
            out.append((time.perf_counter() - t0) / (GIB // PAGE) * 1e6)
        return out
    finally:
        region.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=8, help="GiB mapped and written per pass")
    parser.add_argument("--passes", type=int, default=2, help="passes, each over a fresh mapping")
    args = parser.parse_args()
    for n in range(1, args.passes + 1):
        per_gib = touch_pass(args.gib)
        cells = "  ".join(f"{us:5.2f}" for us in per_gib)
        print(f"pass {n}: µs per 4 KiB page, GiB by GiB: {cells}", flush=True)


if __name__ == "__main__":
    main()
