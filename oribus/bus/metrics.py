"""The bus's /metrics page: the process registry plus per-shard gauges read at scrape time.

Counters and histograms (commits, conflicts, op latency, WAL fsyncs) are updated
where the events happen and live in ``oribus.metrics.REGISTRY``. The gauges
here describe state the shards own — keys, prepared transactions, the delivery
log — so each scrape asks every shard for its ``stats()`` and renders them
into a fresh ``Registry``: a shard that has gone away leaves no stale series
behind, only ``oribus_shard_up{shard="N"} 0``.

Each shard is asked on its own, concurrently, with a timeout
(``Bus.shard_stats``): one shard that is down or hung marks only itself down
instead of failing the whole page.
"""

from __future__ import annotations

import logging

from oribus.bus.bus import SHARD_STATS_TIMEOUT_SECONDS, Bus
from oribus.bus.sessions import CAPS
from oribus.metrics import REGISTRY, Registry

log = logging.getLogger("oribus.metrics")


async def render_bus_metrics(bus: Bus, *, timeout: float = SHARD_STATS_TIMEOUT_SECONDS) -> str:
    """``REGISTRY.render()`` followed by this bus's shard and session gauges (format 0.0.4)."""
    answers = await bus.shard_stats(timeout)

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

    return REGISTRY.render() + scrape.render()


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
