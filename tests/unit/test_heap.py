"""Server processes collect cycles in large batches (``oribus.hosts.heap``); other commands and
the embedded engine keep the interpreter's defaults."""

from __future__ import annotations

import subprocess
import sys

from oribus.hosts.heap import GEN0_THRESHOLD

PROBE = """
import gc
from oribus.cli import _run

async def main():
    return gc.get_threshold()[0], gc.get_freeze_count()

print(*_run(main(), serving={serving}))
"""


def probe(serving: bool) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(serving=serving)], capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    return int(out[0]), int(out[1])


def test_a_server_process_freezes_its_start_up_heap_and_collects_young_objects_in_large_batches():
    threshold, frozen = probe(serving=True)
    assert threshold == GEN0_THRESHOLD > 700
    assert frozen > 1000  # the modules, classes and functions imported at start-up


def test_other_commands_keep_the_interpreters_collector():
    assert probe(serving=False) == (700, 0)
