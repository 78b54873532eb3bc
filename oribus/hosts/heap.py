"""The garbage collector in a server process (``oribus up``, ``oribus shard``, ``oribus bus``).

CPython runs its cyclic collector every 700 net allocations of container objects (the first
generation), every 10 of those the second, and the whole heap every 10 of the second. A
server allocates a few lists, dicts and futures per call, almost all freed at once by
reference counting, so those collections find next to nothing: in ``oribus up --processes``
(agent-step, 32 clients) the bus process spent 10-12% of its CPU in them (0.48-0.57 s of
4-5 s; ``gc.callbacks`` timing), each shard process 3-5%. With the first generation's
threshold at ``GEN0_THRESHOLD`` that falls to under 1% (0.02-0.03 s over the same run).

``serve_with_few_collections()``, once start-up's imports are done: collects what start-up
left, moves every surviving object to the permanent generation (``gc.freeze``: later full
collections no longer walk the modules, classes and functions of the process), and raises the
first threshold. Cycles are still collected, only in larger batches: the garbage waiting
for a collection is at most a few thousand small objects. The embedded engine runs in its
user's process and leaves that process's collector alone.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000  # net container allocations between two young collections (CPython: 700)


def serve_with_few_collections() -> None:
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, older, oldest)
