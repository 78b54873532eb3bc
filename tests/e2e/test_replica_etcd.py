"""Replica groups' etcd layout against a real etcd (``oribus.meta.groups``): the term register moves
only by CAS, one process per member id, one primary per term (its takeover compares the term and
the absence of a primary), the shard record the buses follow carries the term as its epoch, and
everything a process holds goes with its lease."""

from __future__ import annotations

import asyncio

import pytest

from oribus.errors import InvalidRequest
from oribus.meta.cluster_meta import ClaimRefused, ClusterConfig
from oribus.meta.etcd import EtcdMeta
from oribus.meta.groups import EtcdGroups, check_replicas

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def groups(etcd):
    meta = EtcdMeta(etcd.url, "g", lease_ttl=2)
    await meta.init_cluster(ClusterConfig(2, replicas=3))
    try:
        yield EtcdGroups(meta)
    finally:
        await meta.close()


async def test_the_cluster_config_keeps_its_replica_count(groups):
    meta = groups.meta
    assert (await meta.config()).replicas == 3
    assert await meta.init_cluster(ClusterConfig(2, replicas=3)) is False  # the same: fine
    with pytest.raises(InvalidRequest, match="3 replicas"):
        await meta.init_cluster(ClusterConfig(2, replicas=5))
    assert "replicas" not in ClusterConfig(2).to_dict()  # a single copy's config as before
    assert ClusterConfig.from_dict(ClusterConfig(2).to_dict()).replicas == 1
    for bad in (0, 2, 4, 7):
        with pytest.raises(InvalidRequest):
            check_replicas(bad)


async def test_the_term_register_moves_only_by_compare_and_set(groups):
    assert await groups.term(0) == 0
    results = await asyncio.gather(*(groups.next_term(0, 0) for _ in range(5)))
    assert sorted(results, key=lambda r: r or 0) == [None, None, None, None, 1]
    assert await groups.term(0) == 1
    assert await groups.next_term(0, 0) is None  # stale view: refused
    assert await groups.next_term(0, 1) == 2
    assert await groups.term(0) == 2
    assert await groups.term(1) == 0  # another group's register is its own


async def test_one_process_per_member_id_and_the_lowest_free_id(groups):
    a, b = await groups.lease(), await groups.lease()
    try:
        first = await groups.claim_free_member(0, 3, a, stream="127.0.0.1:1")
        second = await groups.claim_free_member(0, 3, b, stream="127.0.0.1:2")
        assert (first.member, second.member) == (0, 1)
        with pytest.raises(ClaimRefused, match="already claimed"):
            await groups.claim_member(0, 0, b, stream="127.0.0.1:2")
        members = await groups.members(0)
        assert {r: m.stream for r, m in members.items()} == {0: "127.0.0.1:1", 1: "127.0.0.1:2"}
        await groups.revoke(a)  # the process is gone: its id is free again
        again = await groups.claim_free_member(0, 3, b, stream="127.0.0.1:3")
        assert again.member == 0
        c = await groups.lease()
        try:
            assert (await groups.claim_free_member(0, 3, c, stream="x:1")).member == 2
            with pytest.raises(ClaimRefused, match="every member id"):
                await groups.claim_free_member(0, 3, c, stream="x:2")
        finally:
            await groups.revoke(c)
    finally:
        await groups.revoke(b)


async def test_one_primary_per_term_and_the_buses_see_the_term_as_the_epoch(groups):
    meta = groups.meta
    a, b = await groups.lease(), await groups.lease()
    try:
        term = await groups.next_term(0, await groups.term(0))
        assert term == 1
        # two candidates in the same term: exactly one takes over
        won = await asyncio.gather(groups.take_over(0, term, 0, a, address="h:1", stream="h:2"),
                                   groups.take_over(0, term, 1, b, address="h:3", stream="h:4"))
        assert sorted(won) == [False, True]
        primary = await groups.primary(0)
        assert primary is not None and primary.term == 1
        rec = (await meta.shards())[0]
        assert rec.epoch == 1
        assert rec.stream in ("h:2", "h:4")
        # a candidate of a term the register has left behind never takes over, even with no primary
        holder = a if primary.member == 0 else b
        await groups.resign(0, 1, primary.member)
        assert await groups.primary(0) is None and 0 not in await meta.shards()
        assert await groups.next_term(0, 1) == 2
        assert not await groups.take_over(0, 1, 0, a, address="h:1", stream="h:2")
        assert await groups.take_over(0, 2, 1, b, address="h:3", stream="h:4")
        # while a primary serves, no election can move the register past it
        assert await groups.next_term(0, 2) is None
        assert await groups.term(0) == 2
        await groups.resign(0, 2, 1)
        assert await groups.take_over(0, 2, 1, b, address="h:3", stream="h:4")
        assert (await meta.shards())[0].epoch == 2
        # resigning in the wrong name or term touches nothing
        await groups.resign(0, 1, 1)
        await groups.resign(0, 2, 0)
        assert await groups.primary(0) is not None
        del holder
    finally:
        await groups.revoke(a)
        await groups.revoke(b)
    # the primary's lease gone: the primary key and the shard record went with it
    assert await groups.primary(0) is None
    assert 0 not in await meta.shards()


async def test_each_takeover_records_its_predecessor_and_counts_failovers(groups):
    a, b = await groups.lease(), await groups.lease()
    try:
        assert await groups.takeover(0) is None  # never had a primary
        term = await groups.next_term(0, 0)
        won = await asyncio.gather(groups.take_over(0, term, 0, a, address="h:1", stream="h:2"),
                                   groups.take_over(0, term, 1, b, address="h:3", stream="h:4"))
        first = await groups.takeover(0)
        assert first is not None and not first.is_failover and first.failovers == 0
        assert (first.member, first.term) == (won.index(True), 1)  # the winner's, written once
        await groups.revoke(a if first.member == 0 else b)  # the primary's process is gone
        c = await groups.lease()
        try:
            assert await groups.next_term(0, 1) == 2
            assert await groups.take_over(0, 2, 2, c, address="h:5", stream="h:6")
            second = await groups.takeover(0)
            assert second is not None and second.is_failover
            assert (second.member, second.term, second.previous_member, second.previous_term,
                    second.failovers) == (2, 2, first.member, 1, 1)
            assert second.at >= first.at
            assert not await groups.take_over(0, 2, 0, c, address="h:1", stream="h:2")  # refused: no record
            assert await groups.takeover(0) == second
            assert await groups.takeover(1) is None  # another group's record is its own
        finally:
            await groups.revoke(c)
        assert await groups.takeover(0) == second  # kept when the primary's lease goes
    finally:
        await groups.revoke(a)
        await groups.revoke(b)


async def test_a_lease_counts_from_the_last_acknowledged_keepalive_and_knows_when_it_is_lost(groups):
    held = await groups.lease()
    try:
        first = held.acked_at
        await asyncio.sleep(1.5)  # TTL 2: kept alive every 0.5 s
        assert held.acked_at > first
        assert held.valid(skew=0.1)
        assert held.valid_until(0.1) <= held.acked_at + 2
        await groups.meta._call(lambda c: c.revoke_lease(held.id))  # noqa: SLF001 - etcd drops it
        await asyncio.wait_for(held.lost.wait(), 5)
        assert not held.valid(skew=0.1)
    finally:
        await groups.revoke(held)


def test_a_member_id_outside_the_group_or_on_a_single_copy_cluster_is_refused(etcd, tmp_path):
    from processes import run_cli

    assert run_cli("cluster", "init", "--etcd", etcd.url, "--cluster", "r3", "--shards", "1",
                   "--replicas", "3").returncode == 0
    assert run_cli("cluster", "init", "--etcd", etcd.url, "--cluster", "r1", "--shards", "1").returncode == 0
    bad_replicas = run_cli("cluster", "init", "--etcd", etcd.url, "--cluster", "r2", "--shards", "1",
                           "--replicas", "2")
    assert bad_replicas.returncode == 2 and "--replicas must be one of 1, 3, 5" in bad_replicas.stderr
    outside = run_cli("shard", "--id", "0", "--member", "3", "--etcd", etcd.url, "--cluster", "r3",
                      "--data-dir", str(tmp_path / "m3"), "--listen", "127.0.0.1:0")
    assert outside.returncode != 0 and "outside the group's 0..2" in outside.stderr, outside.stderr
    single = run_cli("shard", "--id", "0", "--member", "0", "--etcd", etcd.url, "--cluster", "r1",
                     "--data-dir", str(tmp_path / "s0"), "--listen", "127.0.0.1:0")
    assert single.returncode != 0 and "there are no members" in single.stderr, single.stderr
    assert not (tmp_path / "m3" / "wal").exists() and not (tmp_path / "s0" / "wal").exists()


def test_a_member_id_without_etcd_is_refused(tmp_path):
    from processes import run_cli

    r = run_cli("shard", "--id", "0", "--member", "1", "--data-dir", str(tmp_path / "m"), "--listen", "127.0.0.1:0")
    assert r.returncode == 2 and "needs --etcd" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
