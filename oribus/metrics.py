"""Process metrics in the Prometheus text exposition format, with no metrics library.

Three kinds of value, each a small object with ``__slots__``::

    Counter     inc(n=1)                 only goes up
    Histogram   observe(x), time()       fixed buckets, a sum and a count
    Gauge       set(x) or a callback     read when rendered

A metric is declared once on a ``Registry``; with ``labelnames`` the registry
returns a ``Family`` whose ``labels(op="read")`` gives the child for that label
set. The child is created (and its label text formatted and escaped) on the
first call only and cached, so code on a hot path binds its children once::

    COMMITS = registry.counter("oribus_commits_total", "Commits.", labelnames=("kind",))
    ONE_PHASE = COMMITS.labels(kind="1pc")    # once, when the owner is built
    ONE_PHASE.inc()                           # per commit: one integer add

    with OP_SECONDS.labels(op="read").time():
        await bus.read(...)

``Registry.render()`` produces format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/): per family a
``# HELP`` and a ``# TYPE`` line, then one line per sample; a histogram has a
cumulative ``_bucket`` line per upper bound ``le`` ending with ``le="+Inf"``
(equal to ``_count``), then ``_sum`` and ``_count``. In label values a
backslash, a double quote and a newline are escaped as ``\\\\``, ``\\"`` and
``\\n``; in help text, backslash and newline.

Threads: updates are plain attribute and list-item increments, with no lock,
because they run on the event loop or, for the WAL, in a flush worker that
already holds that WAL's I/O lock. Under the GIL an update is never torn, but
two threads updating the *same* child at the same moment can lose one of the
two increments (``x += 1`` is a read, an add and a store). Each child here has
one writer at a time, so that does not happen; a render that runs while a
worker observes may show a ``_sum`` one observation ahead of its buckets,
which Prometheus tolerates. (Not safe on a free-threaded build.)

The process-wide metrics oribus exports are declared at the bottom of this
module. What a bus counts (commits, conflicts, aborts) lives in a registry of
that bus's own, and its per-shard gauges are computed at scrape time: both in
``oribus.bus.metrics``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from time import perf_counter
from typing import Any, Generic, TypeVar, overload

# Content-Type of a response carrying Registry.render().
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds (seconds) for latencies from 50µs (an in-memory read) to 10s (a stuck fsync).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Upper bounds for counts (records per WAL batch, keys per request): 1, 2, 4, ... 1024.
SIZE_BUCKETS: tuple[float, ...] = tuple(float(1 << i) for i in range(11))


def format_value(value: float) -> str:
    """A sample value as Prometheus parses it (Go ParseFloat syntax)."""
    if type(value) is int:  # not bool: True would print as "True"
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str]) -> str:
    """``a="x",b="y"``: formatted once per child, never per observation."""
    return ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True))


def _braces(label_text: str) -> str:
    return "{" + label_text + "}" if label_text else ""


class Counter:
    """A value that only goes up (a restart sets it back to 0, which Prometheus expects)."""

    __slots__ = ("value",)
    kind = "counter"

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, n: float = 1) -> None:
        if n < 0:
            raise ValueError(f"a counter cannot go down (inc({n}))")
        self.value += n

    def _samples(self, name: str, label_text: str) -> list[str]:
        return [f"{name}{_braces(label_text)} {format_value(self.value)}"]


class Histogram:
    """Counts observations into fixed buckets, plus their sum.

    ``_counts[i]`` holds observations with ``bounds[i-1] < x <= bounds[i]``
    (the last slot: above every bound); rendering makes them cumulative.
    """

    __slots__ = ("_bounds", "_counts", "sum")
    kind = "histogram"

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self.sum: float = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, so value <= le as Prometheus defines buckets
        self._counts[bisect_left(self._bounds, value)] += 1
        self.sum += value

    def time(self) -> Timer:
        """``with hist.time(): ...`` observes the block's wall time in seconds."""
        return Timer(self)

    @property
    def count(self) -> int:
        return sum(self._counts)

    def snapshot(self) -> dict[str, list[float] | list[int] | float]:
        """``{"le": upper bounds, "counts": per bucket (not cumulative; the last: above every
        bound), "sum"}``: a histogram carried to another process, which ``restore``s it (a
        shard's stats carry one to the bus's /metrics)."""
        return {"le": list(self._bounds), "counts": list(self._counts), "sum": self.sum}

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Take the counts and sum of ``snapshot`` (``snapshot()``'s shape). ValueError if its
        bounds are not this histogram's or a count is not a non-negative int."""
        bounds = tuple(float(b) for b in snapshot.get("le", ()))
        counts = list(snapshot.get("counts", ()))
        if bounds != self._bounds or len(counts) != len(self._counts):
            raise ValueError(f"a histogram snapshot with bounds {bounds}, not {self._bounds}")
        if not all(type(n) is int and n >= 0 for n in counts):
            raise ValueError("histogram counts must be integers >= 0")
        self._counts = counts
        self.sum = float(snapshot.get("sum", 0.0))

    def _samples(self, name: str, label_text: str) -> list[str]:
        counts = list(self._counts)  # one snapshot, so +Inf and _count agree
        sep = "," if label_text else ""
        lines = []
        total = 0
        for bound, n in zip((*self._bounds, math.inf), counts, strict=True):
            total += n
            lines.append(f'{name}_bucket{{{label_text}{sep}le="{format_value(bound)}"}} {total}')
        lines.append(f"{name}_sum{_braces(label_text)} {format_value(self.sum)}")
        lines.append(f"{name}_count{_braces(label_text)} {total}")
        return lines


class Timer:
    """Context manager returned by ``Histogram.time()``.

    Equivalent by hand: ``t0 = perf_counter(); ...; hist.observe(perf_counter() - t0)``.
    The time is observed on error too: a failed operation still took that long.
    """

    __slots__ = ("_histogram", "_started")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._started = 0.0

    def __enter__(self) -> Timer:
        self._started = perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._histogram.observe(perf_counter() - self._started)


class Gauge:
    """A value that goes up and down: ``set`` it, or give a callback read at render time."""

    __slots__ = ("_value", "_callback")
    kind = "gauge"

    def __init__(self, callback: Callable[[], float] | None = None) -> None:
        self._value: float = 0
        self._callback = callback

    def set(self, value: float) -> None:
        self._value = value

    @property
    def value(self) -> float:
        return self._callback() if self._callback is not None else self._value

    def _samples(self, name: str, label_text: str) -> list[str]:
        return [f"{name}{_braces(label_text)} {format_value(self.value)}"]


M = TypeVar("M", Counter, Histogram, Gauge)


class Family(Generic[M]):
    """The children of one labelled metric, one per distinct label set.

    ``labels(**values)`` is cached by the keyword items exactly as passed, so a
    repeated call costs a tuple and a dict lookup; label values are converted
    with ``str`` (``shard=3`` and ``shard="3"`` are the same child).
    """

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str], make: Callable[[], M]
    ) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._make: Callable[[], M] = make
        self._by_call: dict[tuple, M] = {}  # labels() kwargs as passed -> child
        self._children: dict[tuple[str, ...], tuple[str, M]] = {}  # values -> (label text, child)

    def labels(self, **values: object) -> M:
        try:
            return self._by_call[tuple(values.items())]
        except KeyError:
            pass
        except TypeError:  # an unhashable label value: fall through to str()
            pass
        if set(values) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(values)}")
        key = tuple(str(values[n]) for n in self.labelnames)
        entry = self._children.get(key)
        if entry is None:
            entry = self._children[key] = (_label_text(self.labelnames, key), self._make())
        try:
            self._by_call[tuple(values.items())] = entry[1]
        except TypeError:
            pass
        return entry[1]

    def _render(self, kind: str) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {kind}"]
        for _key, (label_text, child) in sorted(self._children.items()):
            lines.extend(child._samples(self.name, label_text))
        return lines


class Registry:
    """A set of metric families rendered together; names are unique within it.

    Example::

        registry = Registry()
        requests = registry.counter("app_requests_total", "Requests served.", labelnames=("op",))
        requests.labels(op="get").inc()
        body = registry.render()     # serve with Content-Type CONTENT_TYPE
    """

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, Family]] = {}  # name -> (type, family)

    def _add(self, kind: str, family: Family) -> None:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} is already registered")
        self._families[family.name] = (kind, family)

    @overload
    def counter(self, name: str, help: str) -> Counter: ...
    @overload
    def counter(self, name: str, help: str, labelnames: Sequence[str]) -> Family[Counter]: ...
    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter | Family[Counter]:
        """A counter; with ``labelnames``, the family of them. Name it ``..._total``."""
        family = Family(name, help, labelnames, Counter)
        self._add(Counter.kind, family)
        return family if labelnames else family.labels()

    @overload
    def histogram(
        self, name: str, help: str, *, buckets: tuple[float, ...] = ...
    ) -> Histogram: ...
    @overload
    def histogram(
        self, name: str, help: str, labelnames: Sequence[str], *, buckets: tuple[float, ...] = ...
    ) -> Family[Histogram]: ...
    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Histogram | Family[Histogram]:
        """A histogram with upper bounds ``buckets`` (sorted; ``+Inf`` is implied)."""
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)) or math.isinf(bounds[-1]):
            raise ValueError(f"buckets must be finite, distinct and increasing: {buckets}")
        family = Family(name, help, labelnames, lambda: Histogram(bounds))
        self._add(Histogram.kind, family)
        return family if labelnames else family.labels()

    @overload
    def gauge(
        self, name: str, help: str, *, callback: Callable[[], float] | None = ...
    ) -> Gauge: ...
    @overload
    def gauge(self, name: str, help: str, labelnames: Sequence[str]) -> Family[Gauge]: ...
    def gauge(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        callback: Callable[[], float] | None = None,
    ) -> Gauge | Family[Gauge]:
        """A gauge; ``callback`` (unlabelled only) is called at every render."""
        if callback is not None and labelnames:
            raise ValueError("a labelled gauge is set per child, not by one callback")
        family = Family(name, help, labelnames, lambda: Gauge(callback))
        self._add(Gauge.kind, family)
        return family if labelnames else family.labels()

    def render(self) -> str:
        """Every family in registration order, in text format 0.0.4 (ends with a newline)."""
        lines: list[str] = []
        for kind, family in self._families.values():
            lines.extend(family._render(kind))
        return "\n".join(lines) + "\n" if lines else ""


# The process-wide registry the metrics below live in (and the /metrics endpoint renders).
REGISTRY = Registry()

# ---- the metrics oribus exports -------------------------------------------------------
# Children that code increments on a hot path are bound here once, which also makes
# every expected series show up as 0 before its first event.

SESSION_EXPIRED = REGISTRY.counter(
    "oribus_session_expired_total", "Commits refused with SessionExpired by a shard."
)

# Bus-level latency of each operation, observed by the HTTP and gRPC layers:
#     with OP_SECONDS.labels(op="read").time(): ...
OP_SECONDS = REGISTRY.histogram(
    "oribus_op_seconds",
    "Latency of bus operations (read, commit, history, forget, reset, watch), seconds.",
    ("op",),
)

WAL_FSYNC_SECONDS = REGISTRY.histogram(
    "oribus_wal_fsync_seconds", "Duration of each WAL batch fdatasync, seconds.", ("shard",)
)
WAL_BATCH_RECORDS = REGISTRY.histogram(
    "oribus_wal_batch_records",
    "Records per WAL batch (one write and one fsync each: the group-commit size).",
    ("shard",),
    buckets=SIZE_BUCKETS,
)

# Calls the access rules refused (specs/auth.md §6): reason is the Unauthenticated reason
# or "denied" (a PermissionDenied); operation the bus operation asked for.
AUTH_REFUSED = REGISTRY.counter(
    "oribus_auth_refused_total", "Calls refused by authentication or the access rules.", ("reason", "operation")
)

# Cluster mode (specs/auth.md §3): 1 while the last auth data read from etcd had this part
# (config, keys, policy, revoked, or "all": nothing published any more) refused, so the
# bus keeps enforcing the last good one; 0 once a good one is applied.
AUTH_STALE = REGISTRY.gauge(
    "oribus_auth_stale", "1 while the auth data in etcd is refused and the last good part stays in force.", ("part",)
)

# Replica groups (oribus.shards.replica): observed by a group's primary.
REPLICA_QUORUM_SECONDS = REGISTRY.histogram(
    "oribus_replica_quorum_wait_seconds",
    "From a durability wait on a replicated primary to its record being on a majority, seconds.",
    ("shard",),
)
REPLICA_LAG_RECORDS = REGISTRY.gauge(
    "oribus_replica_lag_records",
    "Records the primary holds that a member has not acknowledged (at its last reply).",
    ("shard", "member"),
)
REPLICA_TAKEOVERS = REGISTRY.counter(
    "oribus_replica_takeovers_total",
    "Terms a member in this process began serving as its group's primary (failovers included).",
    ("shard",),
)
