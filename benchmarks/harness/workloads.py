"""What is measured: workloads, sweep points, and how keys are picked.

A **point** is one configuration of the workload; every backend runs every
selected point once (fresh store, populate, warm-up, measured window, audit).

Workloads (``Point.workload``):

- ``agent-step``: read ``reads`` (3) distinct random keys of ``keys`` (1000),
  write the first one with its counter + 1, commit only if all reads are
  unchanged. A refused step is retried (fresh reads, same keys) up to
  ``--max-retries`` times; then it is given up and counted.
- ``cross-shard``: the same, writing all 3 keys read (on ``oribus-procs``'s
  2 shard processes most such commits span both: two-phase commit).
- ``read-only``: read 3 keys together, no write, no commit.

``hot`` is the contention knob: each key picked comes from the hot set (the
first 1% of the keys, at least one) with probability ``hot``, else from the
rest. ``sessions``: the number of distinct agents taking the steps (0: one
per client); every one is made live before the warm-up (``Client.touch``).

Scenarios group points: a single point (``agent-step``, ``read-only``,
``cross-shard``) or a sweep of one parameter from the base point. Points
equal to the base point are run once and shared. The default sweep values
(full run / ``--quick``) are in ``SWEEPS``; ``--sweep NAME=v1,v2`` overrides.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace

HOT_SET_FRACTION = 0.01
KEY_PREFIX = "bench/k"


def key_name(i: int) -> str:
    return f"{KEY_PREFIX}{i:07d}"


@dataclass(frozen=True)
class Point:
    workload: str = "agent-step"  # agent-step | cross-shard | read-only
    clients: int = 32  # concurrent workers (one connection each, except oribus-up's shared one)
    keys: int = 1000  # keys in the store
    reads: int = 3  # keys read per step
    writes: int = 1  # keys written per step (the first `writes` of those read)
    hot: float = 0.0  # fraction of picks from the hot 1% of the keys
    value_size: int = 100  # bytes of padding per value (plus the counter)
    sessions: int = 0  # distinct agents (0: one per client)

    def canonical(self) -> Point:
        """The same point with its defaults spelled out (so equal points compare equal)."""
        p = self
        if p.workload == "read-only":
            p = replace(p, writes=0)
        elif p.workload == "cross-shard":
            p = replace(p, writes=p.reads)
        else:
            p = replace(p, writes=min(max(p.writes, 1), p.reads))
        return replace(p, sessions=p.sessions or p.clients)

    @property
    def id(self) -> str:
        p = self.canonical()
        return (f"{p.workload}:c{p.clients}:k{p.keys}:r{p.reads}:w{p.writes}:h{p.hot:g}:"
                f"v{p.value_size}:s{p.sessions}")

    def as_dict(self) -> dict:
        return asdict(self.canonical())

    def label(self) -> str:
        """Short: the workload and what differs from its default point (``agent-step clients=128``)."""
        p, default = self.canonical(), Point(workload=self.workload).canonical()
        diff = [f"{f.name}={getattr(p, f.name):g}" for f in fields(Point)
                if f.name not in ("workload", "writes") and getattr(p, f.name) != getattr(default, f.name)
                and not (f.name == "sessions" and p.sessions == p.clients)]
        return " ".join([p.workload, *diff])


BASE = Point()


@dataclass(frozen=True)
class Sweep:
    """A scenario: ``param`` (a Point field) takes ``values`` from the base point."""

    name: str
    param: str | None  # None: a single point
    full: tuple = ()
    quick: tuple = ()
    workload: str = "agent-step"
    title: str = ""  # axis label


SWEEPS: dict[str, Sweep] = {s.name: s for s in [
    Sweep("agent-step", None, title="agent-step"),
    Sweep("read-only", None, workload="read-only", title="read-only"),
    Sweep("cross-shard", None, workload="cross-shard", title="cross-shard writes (3 keys)"),
    Sweep("contention", "hot", (0.0, 0.5, 0.9, 0.99), (0.0, 0.5, 0.9),
          title="fraction of picks from the hot 1% of keys"),
    Sweep("clients", "clients", (1, 4, 16, 32, 64, 128, 256), (1, 32, 128),
          title="concurrent clients"),
    Sweep("read-set", "reads", (1, 2, 4, 8, 16, 32, 64), (1, 3, 16), title="keys read per step"),
    Sweep("keys", "keys", (1000, 10_000, 100_000, 1_000_000), (1000, 100_000), title="keys in the store"),
    Sweep("value-size", "value_size", (100, 1000, 10_000, 100_000), (100, 100_000),
          title="value size (bytes)"),
    Sweep("sessions", "sessions", (10, 100, 1000, 10_000), (32, 10_000), title="live sessions"),
]}
PARAM_TYPES = {f.name: f.type for f in fields(Point)}


def scenario_points(sweep: Sweep, base: Point, quick: bool, values: tuple | None = None) -> list[Point]:
    start = replace(base, workload=sweep.workload)
    if sweep.param is None:
        return [start]
    vals = values if values is not None else (sweep.quick if quick else sweep.full)
    return [replace(start, **{sweep.param: v}) for v in vals]


def parse_value(param: str, raw: str) -> float | int:
    return float(raw) if param == "hot" else int(float(raw))


class KeyPicker:
    """Distinct keys for one step, uniformly or with a hot set."""

    def __init__(self, keys: list[str], reads: int, hot: float) -> None:
        if reads > len(keys):
            raise ValueError(f"cannot read {reads} distinct keys of {len(keys)}")
        self.keys = keys
        self.reads = reads
        self.hot = hot
        self.hot_n = max(1, int(len(keys) * HOT_SET_FRACTION))
        self.cold_n = len(keys) - self.hot_n

    def pick(self, rng: random.Random) -> list[str]:
        keys = self.keys
        if self.hot <= 0.0:
            return [keys[i] for i in rng.sample(range(len(keys)), self.reads)]
        chosen: dict[int, None] = {}
        hot_taken = 0
        while len(chosen) < self.reads:
            if (rng.random() < self.hot and hot_taken < self.hot_n) or self.cold_n == 0:
                i = rng.randrange(self.hot_n)
            else:
                i = self.hot_n + rng.randrange(self.cold_n)
            if i not in chosen:
                chosen[i] = None
                hot_taken += i < self.hot_n
        return [keys[i] for i in chosen]
