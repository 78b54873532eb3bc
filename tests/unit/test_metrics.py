"""The metrics layer: text format 0.0.4, labelled families, and what a real engine counts.

Rendered text is checked by parsing it back line by line (``parse``), so a
malformed line, a non-cumulative bucket or a wrong escape fails here, not in
Prometheus. The engine tests read the process-wide registry before and after
and compare deltas, since other tests in the process update it too.
"""

from __future__ import annotations

import asyncio
import math
import re
import time

import pytest

from oribus import Conflict, SessionExpired
from oribus.bus.metrics import render_bus_metrics
from oribus.client.session import AsyncSession
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig
from oribus.metrics import REGISTRY, SIZE_BUCKETS, Registry, format_value
from oribus.shards.wal import Wal

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Samples = dict[tuple[str, frozenset], float]


def _parse_labels(text: str) -> frozenset:
    labels = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad label text at {pos}: {text!r}"
        labels[m[1]] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e[0]], m[2])
        pos = m.end()
    return frozenset(labels.items())


def parse(text: str) -> Samples:
    """Samples of an exposition, checking the grammar and that TYPE precedes its samples."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: Samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types, line
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m[1]
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample before its TYPE: {line!r}"
        key = (name, _parse_labels(m[2] or ""))
        assert key not in samples, f"duplicate sample: {line!r}"
        samples[key] = float(m[3])
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def check_histogram(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """Assert the histogram invariants; return its cumulative (le, count) pairs."""
    buckets = sorted(
        (float(dict(ls)["le"]), v) for (n, ls), v in samples.items()
        if n == f"{name}_bucket" and {k: x for k, x in ls if k != "le"} == labels
    )
    assert buckets and math.isinf(buckets[-1][0]), buckets
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), f"buckets not cumulative: {buckets}"
    assert buckets[-1][1] == value(samples, f"{name}_count", **labels)
    return buckets


# ---- format --------------------------------------------------------------------


def test_counters_by_label_and_unlabelled():
    reg = Registry()
    ops = reg.counter("t_ops_total", "Ops.", ("op", "shard"))
    plain = reg.counter("t_plain_total", "Plain.")
    ops.labels(op="read", shard="0").inc()
    ops.labels(op="read", shard="0").inc(2)
    ops.labels(shard=1, op="commit").inc()
    assert ("t_plain_total", frozenset()) in parse(reg.render())  # rendered before any inc
    assert value(parse(reg.render()), "t_plain_total") == 0
    plain.inc(1.5)
    text = reg.render()
    s = parse(text)
    assert value(s, "t_ops_total", op="read", shard="0") == 3
    assert value(s, "t_ops_total", op="commit", shard="1") == 1
    assert value(s, "t_plain_total") == 1.5 and plain.value == 1.5
    assert "# TYPE t_ops_total counter\n" in text and "# HELP t_plain_total Plain.\n" in text
    assert len([k for k in s if k[0] == "t_ops_total"]) == 2


def test_labels_are_cached_and_checked():
    reg = Registry()
    fam = reg.counter("t_total", "T.", ("a", "b"))
    child = fam.labels(a="x", b=1)
    assert fam.labels(b="1", a="x") is child  # order and str() do not make a new child
    assert fam.labels(a="x", b=1) is child
    with pytest.raises(ValueError):
        fam.labels(a="x")
    with pytest.raises(ValueError):
        fam.labels(a="x", b="1", c="2")
    with pytest.raises(ValueError):
        child.inc(-1)
    with pytest.raises(ValueError):
        reg.counter("t_total", "again")


def test_histogram_buckets_sum_and_count():
    reg = Registry()
    h = reg.histogram("t_seconds", "Latency.", ("op",))
    observed = [0.00005, 0.0001, 0.0003, 0.001, 0.001, 0.7, 3.0, 42.0]
    for x in observed:
        h.labels(op="read").observe(x)
    h.labels(op="empty")
    s = parse(reg.render())
    buckets = dict(check_histogram(s, "t_seconds", op="read"))
    assert buckets[0.0001] == 2  # le is inclusive: 0.0001 falls in le="0.0001"
    assert buckets[0.00025] == 2
    assert buckets[0.0005] == 3
    assert buckets[0.001] == 5
    assert buckets[0.5] == 5 and buckets[1.0] == 6
    assert buckets[10.0] == 7 and buckets[math.inf] == 8  # 42s only in +Inf
    assert value(s, "t_seconds_count", op="read") == len(observed)
    assert value(s, "t_seconds_sum", op="read") == pytest.approx(sum(observed))
    assert check_histogram(s, "t_seconds", op="empty")[-1] == (math.inf, 0)
    assert value(s, "t_seconds_sum", op="empty") == 0


def test_size_histogram_and_le_text():
    reg = Registry()
    h = reg.histogram("t_records", "Batch sizes.", buckets=SIZE_BUCKETS)
    for n in (1, 2, 3, 1024, 1025):
        h.observe(n)
    text = reg.render()
    assert 't_records_bucket{le="1.0"} 1\n' in text
    assert 't_records_bucket{le="4.0"} 3\n' in text
    assert 't_records_bucket{le="1024.0"} 4\n' in text
    assert 't_records_bucket{le="+Inf"} 5\n' in text
    assert "t_records_count 5\n" in text and "t_records_sum 2055.0\n" in text
    with pytest.raises(ValueError):
        reg.histogram("t_bad", "Unsorted.", buckets=(2.0, 1.0))


def test_label_value_and_help_escaping():
    reg = Registry()
    fam = reg.gauge("t_gauge", 'Help with \\ and\nnewline "quoted".', ("path",))
    nasty = 'C:\\dir\n"quoted"'
    fam.labels(path=nasty).set(1.5)
    text = reg.render()
    assert 't_gauge{path="C:\\\\dir\\n\\"quoted\\""} 1.5\n' in text
    assert '# HELP t_gauge Help with \\\\ and\\nnewline "quoted".\n' in text
    assert value(parse(text), "t_gauge", path=nasty) == 1.5


def test_gauge_callback_and_values():
    reg = Registry()
    box = [3]
    reg.gauge("t_cb", "From a callback.", callback=lambda: box[0])
    reg.gauge("t_flag", "A bool renders as a number.").set(True)
    box[0] = 7
    s = parse(reg.render())
    assert value(s, "t_cb") == 7 and value(s, "t_flag") == 1
    assert [format_value(v) for v in (2, 0.5, math.inf, -math.inf)] == ["2", "0.5", "+Inf", "-Inf"]
    assert format_value(math.nan) == "NaN"
    assert Registry().render() == ""


def test_timer_observes_the_block_even_on_error():
    reg = Registry()
    h = reg.histogram("t_timed", "Timed.")
    with h.time():
        time.sleep(0.02)
    with pytest.raises(KeyError), h.time():
        raise KeyError("x")
    assert h.count == 2
    assert 0.02 <= h.sum < 1.0


async def test_wal_observes_batches_under_its_label(tmp_path):
    label = f"wal-test-{time.monotonic_ns()}"
    wal = Wal.open(tmp_path / "labelled", metrics_label=label)
    for i in range(3):
        wal.append(1, {"i": i})
    await wal.sync()
    await wal.close()
    unlabelled = Wal.open(tmp_path / "plain")
    unlabelled.append(1, {"i": 0})
    await unlabelled.sync()
    await unlabelled.close()
    s = parse(REGISTRY.render())
    assert value(s, "oribus_wal_batch_records_count", shard=label) == 1
    assert value(s, "oribus_wal_batch_records_sum", shard=label) == 3
    assert value(s, "oribus_wal_fsync_seconds_count", shard=label) == 1
    assert not any(dict(ls).get("shard") == "" for _, ls in s)


# ---- a real engine ---------------------------------------------------------------


def keys_on_two_shards(engine: EmbeddedEngine) -> tuple[str, str]:
    by_shard: dict[int, str] = {}
    i = 0
    while len(by_shard) < 2:
        k = f"m/{i}"
        by_shard.setdefault(engine.slot_map.shard_for(k), k)
        i += 1
    a, b = sorted(by_shard.values())
    return a, b


def deltas(before: Samples, after: Samples, *names: tuple[str, dict]) -> list[float]:
    return [value(after, n, **ls) - value(before, n, **ls) for n, ls in names]


async def test_engine_counts_commits_conflicts_aborts_and_fsyncs(data_dir):
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=2))
    try:
        a, b = keys_on_two_shards(engine)
        shard_a = str(engine.slot_map.shard_for(a))
        shard_b = str(engine.slot_map.shard_for(b))
        # A session's commit involves every shard it has read or written on (its read
        # set lives there), so 1PC commits need sessions that have touched one shard.
        def fresh(agent: str) -> AsyncSession:
            return AsyncSession(engine.bus, agent)

        me, other = fresh("me"), fresh("other")
        before = parse(await render_bus_metrics(engine.bus))

        await fresh("w1").put(a, 1)  # 1PC
        await fresh("w2").put(b, 1)  # 1PC
        await fresh("w3").commit({a: 2, b: 2})  # 2PC
        with pytest.raises(Conflict):  # 1PC refused: expected_version
            await fresh("w4").put(a, 9, expect=1)
        await me.get_many([a, b])
        await other.commit({a: 3, b: 3})  # 2PC, makes both of me's reads stale
        with pytest.raises(Conflict) as refused:  # 2PC refused: stale_read on both shards
            await me.commit({a: 4, b: 4})
        assert {s.reason for s in refused.value.stale} == {"stale_read"}

        text = await render_bus_metrics(engine.bus)
        after = parse(text)
        got = deltas(
            before, after,
            ("oribus_commits_total", {"kind": "1pc"}),
            ("oribus_commits_total", {"kind": "2pc"}),
            ("oribus_conflicts_total", {"reason": "expected_version"}),
            ("oribus_conflicts_total", {"reason": "stale_read"}),  # once, not per stale key
            ("oribus_conflicts_total", {"reason": "locked"}),
            ("oribus_aborts_total", {}),
        )
        assert got == [2, 2, 1, 1, 0, 1]
        for shard in (shard_a, shard_b):
            check_histogram(after, "oribus_wal_fsync_seconds", shard=shard)
            (fsyncs,) = deltas(before, after, ("oribus_wal_fsync_seconds_count", {"shard": shard}))
            assert fsyncs > 0
            (batches,) = deltas(before, after, ("oribus_wal_batch_records_count", {"shard": shard}))
            assert batches > 0
            assert value(after, "oribus_shard_up", shard=shard) == 1
            assert value(after, "oribus_keys", shard=shard) == 1
            assert value(after, "oribus_prepared", shard=shard) == 0
        assert value(after, "oribus_delivery_log_entries", shard=shard_a) >= 1
        assert value(after, "oribus_delivery_log_sessions", shard=shard_a) >= 1
        assert value(after, "oribus_bus_sessions") == 5  # w1, w2, w3, me, other (w4 left none)
        assert text.count("# TYPE oribus_shard_up gauge") == 1
        # the coordinator's own counters still move alongside
        assert engine.bus.coordinator.counters["commits_2pc"] == 2
    finally:
        await engine.close()


async def test_engine_counts_session_expired(data_dir):
    engine = await EmbeddedEngine.open(
        EngineConfig(data_dir=data_dir, shards=2, session_ttl_seconds=0.2)
    )
    try:
        me = AsyncSession(engine.bus, "me")
        await me.get("k")
        before = parse(await render_bus_metrics(engine.bus))
        await asyncio.sleep(0.3)
        with pytest.raises(SessionExpired):
            await me.put("k", 1)
        after = parse(await render_bus_metrics(engine.bus))
        assert deltas(before, after, ("oribus_session_expired_total", {})) == [1]
        assert deltas(before, after, ("oribus_commits_total", {"kind": "1pc"})) == [0]
    finally:
        await engine.close()


async def test_a_failing_or_hung_shard_is_reported_down(data_dir, monkeypatch):
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=3))
    try:
        async def broken() -> dict:
            raise OSError("shard unreachable")

        async def hung() -> dict:
            await asyncio.sleep(60)
            return {}

        monkeypatch.setattr(engine.shards[1], "stats", broken)
        monkeypatch.setattr(engine.shards[2], "stats", hung)
        s = parse(await render_bus_metrics(engine.bus, timeout=0.1))
        assert [value(s, "oribus_shard_up", shard=str(i)) for i in range(3)] == [1, 0, 0]
        assert ("oribus_shard_up", frozenset({("shard", "1")})) in s  # 0, not absent
        assert ("oribus_keys", frozenset({("shard", "1")})) not in s  # no stale values
        assert ("oribus_keys", frozenset({("shard", "0")})) in s
    finally:
        await engine.close()


# ---- stats and /metrics: one count ----------------------------------------------

STATS_TO_SERIES = {  # the coordinator's stats key -> the /metrics series it is counted in
    "commits_1pc": ("oribus_commits_total", {"kind": "1pc"}),
    "commits_2pc": ("oribus_commits_total", {"kind": "2pc"}),
    "aborts_2pc": ("oribus_aborts_total", {}),
}


async def counts(engine: EmbeddedEngine) -> tuple[dict[str, int], dict[str, float]]:
    """(the stats' "coordinator" counters, the same counts read from /metrics). A refusal
    naming one reason counts once in oribus_conflicts_total, as in stats' "conflicts"."""
    stats = (await engine.bus.stats())["coordinator"]
    page = parse(await render_bus_metrics(engine.bus))
    series = {key: value(page, name, **labels) for key, (name, labels) in STATS_TO_SERIES.items()}
    series["conflicts"] = sum(v for (name, _), v in page.items() if name == "oribus_conflicts_total")
    return stats, series


async def test_each_commit_and_refusal_moves_stats_and_metrics_alike(tmp_path):
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=tmp_path / "a", shards=2))
    other = await EmbeddedEngine.open(EngineConfig(data_dir=tmp_path / "b", shards=2))
    try:
        a, b = keys_on_two_shards(engine)
        reader = AsyncSession(engine.bus, "reader")

        async def one_phase() -> None:
            await AsyncSession(engine.bus, "w1").put(a, 1)

        async def conflict() -> None:
            with pytest.raises(Conflict):  # expected_version: one reason
                await AsyncSession(engine.bus, "w2").put(a, 9, expect=7)

        async def two_phase() -> None:
            await reader.get_many([a, b])
            await AsyncSession(engine.bus, "w3").commit({a: 2, b: 2})

        async def two_phase_refused() -> None:  # stale_read on both shards: aborted at 2PC
            with pytest.raises(Conflict):
                await reader.commit({a: 3, b: 3})

        async def on_another_bus() -> None:  # same process, another bus: counted there only
            await AsyncSession(other.bus, "w4").commit({a: 1, b: 1})

        steps = [
            (one_phase, {"commits_1pc": 1}),
            (conflict, {"conflicts": 1}),
            (two_phase, {"commits_2pc": 1}),
            (two_phase_refused, {"conflicts": 1, "aborts_2pc": 1}),
            (on_another_bus, {}),
        ]
        for step, moved in steps:
            stats0, series0 = await counts(engine)
            await step()
            stats1, series1 = await counts(engine)
            expected = {key: moved.get(key, 0) for key in ("commits_1pc", "commits_2pc", "conflicts", "aborts_2pc")}
            assert {k: stats1[k] - stats0[k] for k in expected} == expected, step.__name__
            assert {k: series1[k] - series0[k] for k in expected} == expected, step.__name__
        assert (await other.bus.stats())["coordinator"]["commits_2pc"] == 1
        assert set(stats1) == {"commits_1pc", "commits_2pc", "conflicts", "aborts_2pc"}
    finally:
        await other.close()
        await engine.close()
