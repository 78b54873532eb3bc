"""What a member answers the bus (``ReplicaHost._serving``): only the serving primary, only under
its primary lease (``specs/replication.md`` §6), only for the epoch (term) it serves. A
deposed primary that wakes from a pause has a lease counted from before the pause: it must
refuse even a read, which no follower's promise could stop."""

from __future__ import annotations

import time

import pytest

from oribus.errors import Unavailable
from oribus.hosts.replica import ReplicaConfig, ReplicaHost
from oribus.hosts.roles import Role
from oribus.meta.etcd import EtcdMeta
from oribus.meta.groups import GroupLease
from oribus.rpc.shard_codec import FENCE
from oribus.shards.config import ShardConfig

TTL = 2.0
SKEW = 0.1


class FakeLease:
    id = 1


@pytest.fixture
def host(tmp_path):
    shard = ShardConfig(0, tmp_path, clock_skew_seconds=SKEW)
    h = ReplicaHost(ReplicaConfig(shard, "127.0.0.1:0", "127.0.0.1:0"), EtcdMeta("127.0.0.1:1"))
    h.member_id = 0
    return h


def serve(host: ReplicaHost, acked_ago: float) -> list:
    """Make ``host`` the serving primary of term 7 whose last keep-alive was sent ``acked_ago`` s ago."""
    calls: list = []

    async def stats(args):
        calls.append(args)
        return {"ok": True}

    for role in (Role.FOLLOWER, Role.CANDIDATE, Role.PRIMARY):
        host.roles.move(role)
    host.term = 7
    host.shard = object()  # type: ignore[assignment]
    host._shard_ops = {"stats": stats}
    host.lease = GroupLease(FakeLease(), TTL, time.monotonic() - acked_ago)
    return calls


async def test_the_primary_answers_within_its_lease_for_its_term(host):
    calls = serve(host, acked_ago=0.2)
    assert await host._shard_call("stats")({FENCE: 7}) == {"ok": True}
    assert await host._shard_call("stats")({}) == {"ok": True}
    assert len(calls) == 2


async def test_past_its_primary_lease_it_answers_nothing(host):
    calls = serve(host, acked_ago=TTL - SKEW + 0.01)  # etcd may already have let another take over
    with pytest.raises(Unavailable, match="primary lease ran out"):
        await host._shard_call("stats")({FENCE: 7})
    assert calls == []


async def test_a_lost_lease_ends_it_at_once(host):
    calls = serve(host, acked_ago=0.0)
    assert host.lease is not None
    host.lease.lost.set()
    with pytest.raises(Unavailable):
        await host._shard_call("stats")({})
    assert calls == []


async def test_another_epoch_and_a_member_that_is_not_primary_are_refused(host):
    calls = serve(host, acked_ago=0.0)
    with pytest.raises(Unavailable, match="expects epoch 6"):
        await host._shard_call("stats")({FENCE: 6})
    host.roles.move(Role.FOLLOWER)
    with pytest.raises(Unavailable, match="not the serving primary"):
        await host._shard_call("stats")({FENCE: 7})
    assert calls == []
