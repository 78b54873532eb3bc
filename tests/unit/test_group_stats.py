"""A replicated shard's ``group`` stats and how /metrics and the dashboard render them.

``group_section`` is fed what a primary knows (its followers' acknowledgements, the members'
``status`` answers or the errors they raised, the claims and the takeover record from etcd)
and must say, per member, its role, LSNs and lag; the bus's /metrics turns the section of
each shard's stats into the ``oribus_replication_*`` families, parsed back line by line.
``collect_group`` over a member and an etcd that never answer must still answer in bounded time.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from test_metrics import check_histogram, parse, value

from oribus.bus.metrics import render_bus_metrics
from oribus.errors import Unavailable
from oribus.gateway.dashboard import _shard_row
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig
from oribus.hosts.group_stats import (
    ETCD_TIMEOUT,
    STATUS_TIMEOUT,
    collect_group,
    failover_view,
    group_section,
)
from oribus.meta.groups import MemberRecord, TakeoverRecord
from oribus.metrics import LATENCY_BUCKETS, Histogram
from oribus.rpc.replica_codec import MemberStatus
from oribus.shards.replica.primary import Follower


def follower(member: int, match: int, *, acked_at: float | None, voter: bool = True) -> Follower:
    return Follower(SimpleNamespace(member_id=member), next_lsn=match + 1, match_lsn=match, voter=voter,
                    acked_at=acked_at)


def record(member: int) -> MemberRecord:
    return MemberRecord(member, stream=f"10.0.0.{member}:7000", address=f"10.0.0.{member}:7001",
                        revision=10 + member)


def test_three_members_one_primary_with_lag_and_ack_age():
    takeover = TakeoverRecord(member=1, term=5, at=1_800_000_000.5, previous_member=0, previous_term=4,
                              failovers=2)
    section = group_section(
        replicas=3, me=1, term=5, last_lsn=100, durable_lsn=100, commit_lsn=98,
        followers=[follower(0, 98, acked_at=999.9), follower(2, 60, acked_at=990.0)],
        statuses={0: MemberStatus(0, "follower", 5, True, (5, 98), 1, 98, 97),
                  2: MemberStatus(2, "follower", 5, True, (5, 60), 1, 60, 55)},
        records={m: record(m) for m in range(3)}, takeover=takeover, now=1000.0)
    assert (section["replicas"], section["term"], section["primary"]) == (3, 5, 1)
    assert [m["member"] for m in section["members"]] == [0, 1, 2]
    assert [m["role"] for m in section["members"]] == ["follower", "primary", "follower"]
    primary, slow = section["members"][1], section["members"][2]
    assert primary == {"member": 1, "address": "10.0.0.1:7001", "stream": "10.0.0.1:7000", "role": "primary",
                       "voter": True, "term": 5, "durable_lsn": 100, "applied_lsn": 98, "acked_lsn": 100,
                       "lag_records": 0, "last_ack_seconds": None, "error": None}
    assert (slow["durable_lsn"], slow["applied_lsn"], slow["acked_lsn"]) == (60, 55, 60)
    assert slow["lag_records"] == 40 and slow["last_ack_seconds"] == pytest.approx(10.0)
    assert section["members"][0]["lag_records"] == 2
    assert section["members"][0]["last_ack_seconds"] == pytest.approx(0.1)
    assert section["failovers"] == 2
    assert section["last_failover"] == {"at": 1_800_000_000.5, "term": 5, "previous_primary": 0,
                                        "previous_term": 4, "new_primary": 1}
    assert section["etcd_error"] is None and section["quorum_wait_seconds"] is None


def test_learner_unreachable_and_absent_members():
    section = group_section(
        replicas=5, me=0, term=3, last_lsn=50, durable_lsn=50, commit_lsn=50,
        followers=[follower(1, 10, acked_at=None, voter=False), follower(2, 40, acked_at=90.0),
                   follower(3, 0, acked_at=None), follower(4, 0, acked_at=None)],
        statuses={1: MemberStatus(1, "follower", 3, False, (3, 10), 0, 10, 10),
                  2: Unavailable("no answer within 0.5 s"), 3: TimeoutError(), 4: Unavailable("no claim")},
        records={0: record(0), 1: record(1), 2: record(2), 3: record(3)},
        takeover=TakeoverRecord(0, 1, 1.0, None, None, 0), now=100.0)
    roles = {m["member"]: m["role"] for m in section["members"]}
    assert roles == {0: "primary", 1: "learner", 2: "unreachable", 3: "unreachable", 4: "absent"}
    unreachable = section["members"][2]
    # what the primary knows of it stays: its acknowledged records and the voter flag they carried
    assert unreachable["voter"] is True and unreachable["acked_lsn"] == 40 and unreachable["lag_records"] == 10
    assert unreachable["last_ack_seconds"] == pytest.approx(10.0) and unreachable["durable_lsn"] is None
    assert "no answer within 0.5 s" in unreachable["error"]
    assert section["members"][3]["voter"] is None  # never acknowledged anything: unknown
    assert section["members"][4]["address"] is None and section["members"][4]["error"]
    assert section["failovers"] == 0 and section["last_failover"] is None  # the first term is no failover


def test_etcd_down_leaves_the_members_and_says_why():
    section = group_section(
        replicas=3, me=2, term=9, last_lsn=7, durable_lsn=7, commit_lsn=7,
        followers=[follower(0, 7, acked_at=5.0), follower(1, 3, acked_at=1.0)],
        statuses={0: MemberStatus(0, "follower", 9, True, (9, 7), 2, 7, 7), 1: Unavailable("down")},
        records=None, takeover=None, etcd_error="etcd call failed", now=6.0)
    assert [m["role"] for m in section["members"]] == ["follower", "unreachable", "primary"]
    assert section["members"][0]["address"] is None  # the claims are etcd's
    assert section["failovers"] is None and section["last_failover"] is None
    assert section["etcd_error"] == "etcd call failed"


def test_takeover_records_chain_and_count_failovers():
    first = TakeoverRecord(0, 1, 10.0, None, None, 0)
    assert not first.is_failover and failover_view(first) is None and failover_view(None) is None
    second = first.next(2, 2, 20.0)
    third = second.next(2, 4, 30.0)  # the same member again, in a later term: still a failover
    assert (third.previous_member, third.previous_term, third.failovers) == (2, 2, 2)
    assert TakeoverRecord.from_json(third.to_json()) == third
    assert TakeoverRecord.from_json(first.to_json()) == first
    assert failover_view(third) == {"at": 30.0, "term": 4, "previous_primary": 2, "previous_term": 2,
                                    "new_primary": 2}


def test_histogram_snapshot_restores_elsewhere_and_refuses_other_bounds():
    h = Histogram(LATENCY_BUCKETS)
    for x in (0.0002, 0.003, 0.003, 7.0, 60.0):
        h.observe(x)
    copy = Histogram(LATENCY_BUCKETS)
    copy.restore(h.snapshot())
    assert copy.snapshot() == h.snapshot() and copy.count == 5 and copy.sum == pytest.approx(h.sum)
    with pytest.raises(ValueError):
        Histogram((0.1, 1.0)).restore(h.snapshot())
    with pytest.raises(ValueError):
        Histogram(LATENCY_BUCKETS).restore({**h.snapshot(), "counts": [-1] * (len(LATENCY_BUCKETS) + 1)})


def _section(primary: int, term: int, failovers: int, lags: dict[int, int], quorum: dict | None) -> dict:
    members = [{"member": m, "role": "primary" if m == primary else "follower", "lag_records": lag,
                "last_ack_seconds": None if m == primary else 0.25 * m} for m, lag in lags.items()]
    return {"replicas": len(lags), "term": term, "primary": primary, "members": members, "failovers": failovers,
            "last_failover": None, "quorum_wait_seconds": quorum, "etcd_error": None}


async def test_bus_metrics_render_each_group(data_dir, monkeypatch):
    engine = await EmbeddedEngine.open(EngineConfig(data_dir=data_dir, shards=3))
    try:
        waits = Histogram(LATENCY_BUCKETS)
        for x in (0.001, 0.002, 0.2):
            waits.observe(x)
        groups = {0: _section(1, 7, 3, {0: 12, 1: 0, 2: 4}, {"member": 1, **waits.snapshot()}),
                  1: _section(0, 2, 0, {0: 0, 1: 0, 2: 0}, {"member": 0, "le": [1.0], "counts": [1, 0], "sum": 1})}
        for shard, group in groups.items():
            real = engine.shards[shard].stats

            async def stats(real=real, group=group) -> dict:  # type: ignore[no-untyped-def]
                return {**await real(), "group": group}

            monkeypatch.setattr(engine.shards[shard], "stats", stats)
        text = await render_bus_metrics(engine.bus)
        s = parse(text)
        assert value(s, "oribus_replication_term", shard="0") == 7
        assert value(s, "oribus_replication_term", shard="1") == 2
        assert value(s, "oribus_replication_failovers_total", shard="0") == 3
        assert ("oribus_replication_failovers_total", frozenset({("shard", "1")})) in s  # 0, not absent
        assert [value(s, "oribus_replication_lag_records", shard="0", member=str(m)) for m in range(3)] == [12, 0, 4]
        assert value(s, "oribus_replication_last_ack_seconds", shard="0", member="2") == 0.5
        assert ("oribus_replication_last_ack_seconds", frozenset({("shard", "0"), ("member", "1")})) not in s
        buckets = check_histogram(s, "oribus_replication_quorum_wait_seconds", shard="0", member="1")
        assert buckets[-1][1] == 3 and dict(buckets)[0.0025] == 2
        assert value(s, "oribus_replication_quorum_wait_seconds_sum", shard="0", member="1") == pytest.approx(0.203)
        # shard 1's histogram has other bounds (another version): left out, not the page; shard 2 is one copy
        assert not [k for k in s if k[0].startswith("oribus_replication_quorum") and ("shard", "1") in k[1]]
        assert not [k for k in s if k[0].startswith("oribus_replication") and ("shard", "2") in k[1]]
        assert text.count("# TYPE oribus_replication_quorum_wait_seconds histogram") == 1
    finally:
        await engine.close()


def test_dashboard_row_carries_the_group_without_the_histogram():
    group = {**_section(1, 7, 3, {0: 12, 1: 0, 2: 4}, {"member": 1, "le": [], "counts": [0], "sum": 0}),
             "last_failover": {"at": 5.0, "term": 7, "previous_primary": 0, "previous_term": 6, "new_primary": 1}}
    row = _shard_row(0, {"up": True, "epoch": 7, "group": group})
    assert row["group"] is not None and "quorum_wait_seconds" not in row["group"]
    assert row["group"]["members"] == group["members"] and row["group"]["last_failover"]["new_primary"] == 1
    assert _shard_row(1, {"up": True, "epoch": 123})["group"] is None


class _Peer:
    def __init__(self, answer: MemberStatus | None) -> None:
        self.answer = answer

    async def status(self) -> MemberStatus:
        if self.answer is None:  # a SIGSTOPped member: never answers
            await asyncio.sleep(3600)
        assert self.answer is not None
        return self.answer


class _Groups:
    def __init__(self, hang: bool) -> None:
        self.hang = hang

    async def members(self, shard: int) -> dict[int, MemberRecord]:
        if self.hang:  # an etcd that accepts the call and never answers
            await asyncio.sleep(3600)
        return {m: record(m) for m in range(3)}

    async def takeover(self, shard: int) -> TakeoverRecord | None:
        return TakeoverRecord(0, 3, 5.0, 1, 2, 1)


def _host(groups: _Groups) -> SimpleNamespace:
    peers = {1: _Peer(MemberStatus(1, "follower", 3, True, (3, 9), 0, 9, 9)), 2: _Peer(None)}
    rwal = SimpleNamespace(last_lsn=12, durable_lsn=12, commit_lsn=11,
                           followers=[follower(1, 9, acked_at=time.monotonic()), follower(2, 4, acked_at=None)])
    return SimpleNamespace(member=SimpleNamespace(rwal=rwal), peers=SimpleNamespace(
        peers=[SimpleNamespace(member_id=m) for m in peers], client=peers.__getitem__), term=3, replicas=3,
        member_id=0, shard_id=0, groups=groups)


async def test_a_member_or_etcd_that_never_answers_costs_the_stats_a_bounded_wait():
    started = time.monotonic()
    section = await collect_group(_host(_Groups(hang=False)))  # type: ignore[arg-type]
    assert time.monotonic() - started < STATUS_TIMEOUT + 0.5
    assert section is not None
    assert [m["role"] for m in section["members"]] == ["primary", "follower", "unreachable"]
    assert section["members"][2]["error"] == f"TimeoutError: no answer within {STATUS_TIMEOUT:g} s"
    assert section["members"][2]["lag_records"] == 8 and section["members"][1]["lag_records"] == 3
    assert section["last_failover"]["previous_primary"] == 1 and section["failovers"] == 1
    assert section["quorum_wait_seconds"]["member"] == 0

    started = time.monotonic()
    section = await collect_group(_host(_Groups(hang=True)))  # type: ignore[arg-type]
    assert time.monotonic() - started < ETCD_TIMEOUT + 0.5
    assert section is not None and section["etcd_error"] == f"etcd did not answer within {ETCD_TIMEOUT:g} s"
    assert section["failovers"] is None and section["members"][1]["address"] is None
    assert [m["role"] for m in section["members"]] == ["primary", "follower", "unreachable"]


async def test_no_group_section_unless_serving_as_primary():
    host = _host(_Groups(hang=False))
    host.term = 0
    assert await collect_group(host) is None  # type: ignore[arg-type]
