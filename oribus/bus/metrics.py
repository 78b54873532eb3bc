"""What a bus counts, and its /metrics page.

``CommitMetrics``: the coordinator's counts of commits (1PC, 2PC), refusals and
two-phase aborts, each counted once, in a registry of the bus's own. /metrics
renders that registry; ``Bus.stats()`` ("coordinator") and the dashboard read the
same counters (``Coordinator.counters``), so the two never disagree. One per bus,
not per process: a process that runs several buses (tests, bus replicas) shows on
each bus's /metrics that bus's commits, as its stats do.

The page: the bus's own registry, then the process registry (``oribus.metrics.REGISTRY``:
op latency, WAL fsyncs, …, updated where the events happen), then gauges of state the
shards own — keys, prepared transactions, the delivery log — which each scrape asks
every shard's ``stats()`` for and renders into a fresh ``Registry``: a shard that has
gone away leaves no stale series behind, only ``oribus_shard_up{shard="N"} 0``. A replicated
shard's stats carry its group (``group``: term, members, lag, failovers, the primary's quorum
waits), rendered as the ``oribus_replication_*`` families the same way.

Each shard is asked on its own, concurrently, with a timeout
(``Bus.shard_stats``): one shard that is down or hung marks only itself down
instead of failing the whole page.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from oribus.bus.sessions import CAPS
from oribus.metrics import LATENCY_BUCKETS, REGISTRY, Counter, Histogram, Registry

if TYPE_CHECKING:  # bus.py imports this module (through the coordinator)
    from oribus.bus.bus import Bus

log = logging.getLogger("oribus.metrics")

CONFLICT_REASONS = ("stale_read", "expected_version", "locked", "aborted")


class CommitMetrics:
    """The coordinator's counters, kept once: ``registry`` for /metrics, ``stats()`` for
    ``Bus.stats()`` and the dashboard. Every series is there, at 0, before its first event."""

    def __init__(self) -> None:
        self.registry = Registry()
        commits = self.registry.counter(
            "oribus_commits_total", "Commits that became visible, by protocol.", ("kind",)
        )
        self.commits_1pc = commits.labels(kind="1pc")
        self.commits_2pc = commits.labels(kind="2pc")
        self.conflicts = self.registry.counter(
            "oribus_conflicts_total",
            "Commits refused with Conflict or Aborted; a refusal counts once per distinct reason "
            "among its stale keys (\"aborted\" when it names none).",
            ("reason",),
        )
        for reason in CONFLICT_REASONS:
            self.conflicts.labels(reason=reason)
        self.aborts_2pc = self.registry.counter("oribus_aborts_total", "Two-phase transactions decided abort.")
        # Refused commits, once each: the "conflicts" of stats. Not a series of its own on
        # /metrics, where oribus_conflicts_total counts a refusal once per reason it names.
        self.refusals = Counter()

    def refused(self, reasons: Iterable[str]) -> None:
        """A commit refused with Conflict or Aborted, naming these reasons (none: "aborted")."""
        self.refusals.inc()
        for reason in set(reasons) or ("aborted",):
            self.conflicts.labels(reason=reason).inc()

    def stats(self) -> dict[str, int]:
        """``{"commits_1pc", "commits_2pc", "conflicts", "aborts_2pc"}``: what ``stats`` shows."""
        return {
            "commits_1pc": int(self.commits_1pc.value),
            "commits_2pc": int(self.commits_2pc.value),
            "conflicts": int(self.refusals.value),
            "aborts_2pc": int(self.aborts_2pc.value),
        }


async def render_bus_metrics(bus: Bus, *, timeout: float | None = None) -> str:
    """The bus's commit counters, ``REGISTRY.render()``, then this bus's shard and session
    gauges (format 0.0.4). ``timeout``: for each shard's stats call (None: the bus's default)."""
    answers = await (bus.shard_stats() if timeout is None else bus.shard_stats(timeout))

    scrape = Registry()
    up = scrape.gauge("oribus_shard_up", "1 if the shard answered its stats call, else 0.", ("shard",))
    keys = scrape.gauge("oribus_keys", "Keys held by the shard (live and deleted with history).", ("shard",))
    prepared = scrape.gauge(
        "oribus_prepared", "Two-phase transactions prepared on the shard and not yet finished.", ("shard",)
    )
    dlog_entries = scrape.gauge(
        "oribus_delivery_log_entries", "Deliveries recorded in the shard's delivery log.", ("shard",)
    )
    dlog_sessions = scrape.gauge(
        "oribus_delivery_log_sessions", "Live sessions in the shard's delivery log.", ("shard",)
    )
    dlog_evicted = scrape.gauge(
        "oribus_delivery_log_evicted",
        "Sessions the shard's delivery log evicted over its session cap since it started (they fail closed).",
        ("shard",),
    )
    # Retention (specs/engine.md "Retention"): versions each rule dropped since the shard started.
    history_dropped = scrape.gauge(
        "oribus_history_dropped_versions",
        "Versions the shard's retention dropped since it started, by rule: count (history_limit) or "
        "age (history_max_age).",
        ("shard", "rule"),
    )
    scrape.gauge("oribus_bus_sessions", "Sessions in this bus's session table.").set(len(bus.sessions))
    _session_caps(scrape, bus)

    for shard_id, stats in answers.items():
        if not stats["up"]:
            log.debug("shard %d did not answer its stats call: %s", shard_id, stats["error"])
            up.labels(shard=shard_id).set(0)
            continue
        up.labels(shard=shard_id).set(1)
        keys.labels(shard=shard_id).set(stats.get("keys", 0))
        prepared.labels(shard=shard_id).set(stats.get("prepared", 0))
        dlog = stats.get("delivery_log") or {}
        dlog_entries.labels(shard=shard_id).set(dlog.get("entries", 0))
        dlog_sessions.labels(shard=shard_id).set(dlog.get("sessions", 0))
        dlog_evicted.labels(shard=shard_id).set(dlog.get("evicted", 0))
        history = stats.get("history") or {}
        for rule in ("count", "age"):
            history_dropped.labels(shard=shard_id, rule=rule).set(history.get(f"dropped_by_{rule}", 0))
    _replication(scrape, answers)

    return bus.coordinator.metrics.registry.render() + REGISTRY.render() + scrape.render()


def _session_caps(scrape: Registry, bus: Bus) -> None:
    """The caps on durable (HTTP) sessions: each cap's limit, the largest group under it
    and how many sessions it evicted (``oribus.bus.sessions``)."""
    table = bus.sessions
    limits = {"sessions": table.limits.max_sessions, "agent": table.limits.max_per_agent,
              "client": table.limits.max_per_client}
    used = {"sessions": table.durable_sessions, **table.largest_groups()}
    limit = scrape.gauge("oribus_http_session_limit",
                         "Cap on durable (HTTP) sessions: in all, per agent, per client address.", ("cap",))
    largest = scrape.gauge("oribus_http_sessions_largest",
                           "Durable sessions in all / of the busiest agent / of the busiest client address.",
                           ("cap",))
    evicted = scrape.gauge("oribus_http_sessions_evicted",
                           "Durable sessions evicted over each cap since the bus started (they fail closed).",
                           ("cap",))
    for cap in CAPS:
        limit.labels(cap=cap).set(limits[cap])
        largest.labels(cap=cap).set(used[cap])
        evicted.labels(cap=cap).set(table.evicted[cap])


def _replication(scrape: Registry, answers: Mapping[int, Mapping[str, Any]]) -> None:
    """The replica groups, from the ``group`` section of each replicated shard's stats (what
    its serving primary reports, ``oribus.hosts.group_stats``): term, failovers, each
    member's lag, and the primary's quorum waits. A shard of one copy has no such section
    and no series here."""
    term = scrape.gauge("oribus_replication_term",
                        "The replica group's term: its primary's epoch, one higher with every failover.",
                        ("shard",))
    failovers = scrape.counter("oribus_replication_failovers_total",
                               "Takeovers by a new primary after the group's first (from etcd: every "
                               "process the group has had).", ("shard",))
    lag = scrape.gauge("oribus_replication_lag_records",
                       "Records the primary holds that the member has not acknowledged as durable.",
                       ("shard", "member"))
    ack_age = scrape.gauge("oribus_replication_last_ack_seconds",
                           "Seconds since the member last accepted a batch from the primary.",
                           ("shard", "member"))
    quorum = scrape.histogram("oribus_replication_quorum_wait_seconds",
                              "From a durability wait on the primary to its record being on a majority, "
                              "seconds (labelled with the primary that observed it).", ("shard", "member"))
    for shard_id, stats in answers.items():
        group = stats.get("group") if stats.get("up") else None
        if not isinstance(group, Mapping):
            continue
        term.labels(shard=shard_id).set(group.get("term", 0))
        if group.get("failovers") is not None:
            failovers.labels(shard=shard_id).inc(group["failovers"])
        for member in group.get("members", ()):
            if member.get("lag_records") is not None:
                lag.labels(shard=shard_id, member=member["member"]).set(member["lag_records"])
            if member.get("last_ack_seconds") is not None:
                ack_age.labels(shard=shard_id, member=member["member"]).set(member["last_ack_seconds"])
        waits = group.get("quorum_wait_seconds")
        if isinstance(waits, Mapping):
            try:
                Histogram(LATENCY_BUCKETS).restore(waits)  # checked before its series exists
                quorum.labels(shard=shard_id, member=waits.get("member", "")).restore(waits)
            except (ValueError, TypeError) as e:  # another version's buckets: skipped, not the page
                log.warning("shard %d: quorum wait histogram not shown: %s", shard_id, e)
