"""The restart grace covers every lease an earlier life of the shard may have out, even when
``read_lease_seconds`` was lowered across the restart (PROTOCOL.md §5.8, rule 5): the bound is
kept in the shard's MANIFEST, and lowered once this life's grace is over."""

from __future__ import annotations

import asyncio
import json

from oribus.shards.config import ShardConfig
from oribus.shards.manifest import manifest_path, read_manifest
from oribus.shards.shard import Shard


def config(data_dir, lease: float) -> ShardConfig:
    return ShardConfig(0, data_dir, read_lease_seconds=lease, clock_skew_seconds=0.0)


async def test_a_lowered_lease_does_not_shorten_the_grace_below_the_earlier_leases(tmp_path):
    data = tmp_path / "shard-0"
    first = await Shard.open(config(data, 1.5))
    assert read_manifest(data).grace_seconds == 1.5  # fsynced before any lease is granted
    await first.close()

    second = await Shard.open(config(data, 0.1))  # the operator lowered the lease
    try:
        assert second.core.grace_left() > 1.0  # the earlier life's 1.5 s leases may still be out
        assert read_manifest(data).grace_seconds == 1.5
        await asyncio.sleep(second.core.grace_left() + 0.5)
        assert second.core.grace_left() == 0
        assert read_manifest(data).grace_seconds == 0.1  # every earlier lease has ended: lowered
    finally:
        await second.close()

    third = await Shard.open(config(data, 0.1))
    try:
        assert 0 < third.core.grace_left() <= 0.1
    finally:
        await third.close()


async def test_a_shard_that_stops_within_its_grace_keeps_the_bound(tmp_path):
    data = tmp_path / "shard-0"
    await (await Shard.open(config(data, 2.0))).close()
    short = await Shard.open(config(data, 0.1))
    await short.close()  # before its 2 s grace is over: the earlier leases may still be out
    assert read_manifest(data).grace_seconds == 2.0
    again = await Shard.open(config(data, 0.1))
    try:
        assert again.core.grace_left() > 1.5
    finally:
        await again.close()


async def test_a_manifest_written_before_the_bound_was_kept_opens(tmp_path):
    data = tmp_path / "shard-0"
    await (await Shard.open(config(data, 0.2))).close()
    raw = json.loads(manifest_path(data).read_text())
    del raw["grace"]
    manifest_path(data).write_text(json.dumps(raw))
    shard = await Shard.open(config(data, 0.2))
    try:
        assert read_manifest(data).grace_seconds == 0.2
    finally:
        await shard.close()
