"""The comparison harness behind ``benchmarks/compare.py``, a file per job.

- ``workloads``: points, sweeps and key picking (what is measured);
- ``runner``: one backend x one point (populate, warm-up, window, audit);
- ``audit``: what every run proves (no lost update, no accepted stale commit);
- ``report``: results.json, results.md and the plots;
- ``machine``: the machine description (machine.md).

The backends themselves live in ``benchmarks/peers``.
"""
