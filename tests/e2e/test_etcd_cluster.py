"""Cluster mode with a real etcd: claims, epochs, fencing, replacement of a shard.

A bus and 3 shard server processes registered in etcd serve SDK traffic.
kill -9 of a shard and a restart: it claims its id again with a new (larger)
epoch, acknowledged commits are intact, and a session that had deliveries on
the old process gets SessionExpired (fail closed). A duplicate shard process
for a held id is refused and exits with a clear message, without touching the
data.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from processes import ServerProcess, cluster_shard, free_port, run_cli

import oribus
from oribus import SessionExpired, Unavailable
from oribus.meta.cluster_meta import BusRecord, ClusterConfig
from oribus.meta.etcd import EtcdMeta

SHARDS = 3
LEASE_TTL = 2


def keys_per_shard(n: int = 2) -> dict[int, list[str]]:
    slot_map = ClusterConfig(SHARDS).slot_map()
    out: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    i = 0
    while any(len(v) < n for v in out.values()):
        k = f"c/{i}"
        if len(out[slot_map.shard_for(k)]) < n:
            out[slot_map.shard_for(k)].append(k)
        i += 1
    return out


async def epochs(url: str) -> dict[int, int]:
    meta = EtcdMeta(url)
    try:
        return {sid: r.epoch for sid, r in (await meta.shards()).items()}
    finally:
        await meta.close()


async def test_etcd_cluster_replaces_a_killed_shard_with_a_new_epoch(cluster, tmp_path, etcd):
    r = run_cli("cluster", "init", "--etcd", etcd.url, "--shards", str(SHARDS))
    assert r.returncode == 0, r.stderr
    assert '"created": true' in r.stdout
    again = run_cli("cluster", "init", "--etcd", etcd.url, "--shards", str(SHARDS))
    assert again.returncode == 0 and '"created": false' in again.stdout
    other = run_cli("cluster", "init", "--etcd", etcd.url, "--shards", "5")
    assert other.returncode != 0 and "already exists with 3 shards" in other.stderr

    ports = [free_port() for _ in range(SHARDS)]
    shards = [cluster.add(cluster_shard(tmp_path, etcd.url, i, port=ports[i])).start() for i in range(SHARDS)]
    for s in shards:
        await asyncio.to_thread(s.wait_serving)
    bus_port = free_port()
    bus = cluster.add(ServerProcess("bus", [
        "bus", "--etcd", etcd.url, "--listen", f"127.0.0.1:{bus_port}", "--http", f"127.0.0.1:{free_port()}",
        "--data-dir", str(tmp_path / "bus"), "--lease-ttl", str(LEASE_TTL)], tmp_path, f"127.0.0.1:{bus_port}"))
    bus.start()
    await asyncio.to_thread(bus.wait_serving)
    before = await epochs(etcd.url)
    assert sorted(before) == [0, 1, 2]
    meta = EtcdMeta(etcd.url)
    try:  # the bus announces itself for as long as it runs
        assert [b.address for b in (await meta.buses()).values()] == [bus.address]
    finally:
        await meta.close()

    keys = keys_per_shard()
    acked: dict[str, int] = {}
    async with oribus.connect(bus.address, agent="writer") as w:
        for n in range(5):  # single-shard and three-shard commits
            for sid in range(SHARDS):
                k = keys[sid][0]
                acked[k] = (await w.commit({k: n}))[k]
            versions = await w.commit({keys[s][1]: n for s in range(SHARDS)})
            acked.update(versions)
        reader = oribus.connect(bus.address, agent="reader")
        await reader.get_many([keys[s][0] for s in range(SHARDS)])  # deliveries on every shard

        await asyncio.to_thread(shards[1].kill9)
        down_at = time.monotonic()
        shards[1].start()  # same id, same data: it must wait for the old lease, then claim anew
        await asyncio.to_thread(shards[1].wait_serving, 30)
        expired = 0
        while True:  # serving again through the bus: the bus follows the new registration
            try:
                await w.commit({keys[1][0]: 100})
                break
            except Unavailable:
                await asyncio.sleep(0.1)
            except SessionExpired:
                # the writer's own earlier writes on shard 1 were deliveries to it, lost with the process
                expired += 1
                await w.reset_session()
        assert expired == 1
        back_in = time.monotonic() - down_at
        after = await epochs(etcd.url)
        assert after[1] > before[1], (before, after)
        assert after[0] == before[0] and after[2] == before[2]

        # acknowledged commits are intact (the last write to keys[1][0] is the one just made)
        check = oribus.connect(bus.address, agent="checker")
        try:
            got = await check.get_many(sorted(acked))
            for k, version in acked.items():
                expect = version + 1 if k == keys[1][0] else version
                assert got[k].version == expect, (k, got[k], version)
        finally:
            await check.close()

        # the reader's deliveries on the old shard 1 are gone: it fails closed
        with pytest.raises(SessionExpired):
            await reader.commit({keys[0][1]: "from-reader"})
        await reader.reset_session()
        await reader.get(keys[1][1])
        await reader.commit({keys[0][1]: "from-reader"})
        await reader.close()
    print(f"\nshard 1 killed -9 and serving again through the bus in {back_in:.2f}s "
          f"(lease TTL {LEASE_TTL}s); epoch {before[1]} -> {after[1]}")


async def test_a_duplicate_shard_process_is_refused(cluster, tmp_path, etcd):
    assert run_cli("cluster", "init", "--etcd", etcd.url, "--shards", str(SHARDS)).returncode == 0
    first = cluster.add(cluster_shard(tmp_path, etcd.url, 0)).start()
    await asyncio.to_thread(first.wait_serving)
    wal = tmp_path / "shard-0" / "wal"
    before = sorted((p.name, p.stat().st_size) for p in wal.iterdir())
    # the same id from another machine (its own data directory: on this one's, the directory
    # lock refuses it before the claim is even tried; test_one_process_per_data_dir.py covers that)
    dup = cluster.add(cluster_shard(tmp_path, etcd.url, 0, name="dup", claim_wait=1,
                                    data_dir=tmp_path / "shard-0-dup")).start()
    code = await asyncio.to_thread(dup.wait_exit, 30)
    assert code == 3
    log = dup.log_tail()
    assert "refused" in log and "already claimed" in log and first.address in log
    assert sorted((p.name, p.stat().st_size) for p in wal.iterdir()) == before  # the data was not touched
    assert first.proc.poll() is None  # the holder keeps serving


async def test_shard_outside_the_cluster_or_uninitialised_cluster_is_refused(cluster, tmp_path, etcd):
    proc = cluster.add(cluster_shard(tmp_path, etcd.url, 0)).start()
    assert await asyncio.to_thread(proc.wait_exit, 30) != 0
    assert "not initialised" in proc.log_tail()
    assert run_cli("cluster", "init", "--etcd", etcd.url, "--shards", "2").returncode == 0
    proc = cluster.add(cluster_shard(tmp_path, etcd.url, 7, name="shard-7")).start()
    assert await asyncio.to_thread(proc.wait_exit, 30) != 0
    assert "outside the cluster" in proc.log_tail()


async def test_a_bus_whose_registration_expired_registers_again(etcd):
    # a bus paused past its lease loses its record; unlike a shard it owns nothing
    # exclusive, so it must come back rather than vanish from the directory for good
    meta = EtcdMeta(etcd.url, lease_ttl=LEASE_TTL)
    other = EtcdMeta(etcd.url)
    try:
        await meta.register_bus(BusRecord("bus-a", "127.0.0.1:7700", "127.0.0.1:7780"))
        assert set(await other.buses()) == {"bus-a"}
        first = meta._bus_lease.id
        await other._call(lambda c: c.revoke_lease(first))  # what expiry does
        assert await other.buses() == {}
        deadline = time.monotonic() + 10
        while "bus-a" not in await other.buses():
            assert time.monotonic() < deadline, "the bus never registered again"
            await asyncio.sleep(0.2)
        assert (await other.buses())["bus-a"].http == "127.0.0.1:7780"
        assert meta._bus_lease.id != first
    finally:
        await meta.close()
        await other.close()


async def test_etcd_down_servers_keep_serving_and_new_claims_are_refused(cluster, tmp_path, etcd):
    assert run_cli("cluster", "init", "--etcd", etcd.url, "--shards", "2").returncode == 0
    shards = [cluster.add(cluster_shard(tmp_path, etcd.url, i)).start() for i in range(2)]
    for s in shards:
        await asyncio.to_thread(s.wait_serving)
    bus_port = free_port()
    bus = cluster.add(ServerProcess("bus", [
        "bus", "--etcd", etcd.url, "--listen", f"127.0.0.1:{bus_port}", "--no-http",
        "--data-dir", str(tmp_path / "bus"), "--lease-ttl", str(LEASE_TTL)], tmp_path, f"127.0.0.1:{bus_port}"))
    await asyncio.to_thread(bus.start().wait_serving)
    acked = {}
    async with oribus.connect(bus.address, agent="w") as w:
        acked.update(await w.commit({"down/a": 1, "down/b": 1, "down/c": 1}))
        etcd.stop()
        await asyncio.sleep(LEASE_TTL * 2)  # longer than the leases: the keep-alives fail meanwhile
        for n in range(2, 12):  # the cluster keeps serving with the map it has
            acked.update(await w.commit({"down/a": n, "down/b": n, "down/c": n}))
        late = cluster.add(cluster_shard(tmp_path, etcd.url, 1, name="late", claim_wait=1,
                                         data_dir=tmp_path / "shard-1-late")).start()  # another machine
        assert await asyncio.to_thread(late.wait_exit, 30) != 0  # no claim without etcd
        assert "etcd is unreachable" in late.log_tail()
        etcd.start()
        await asyncio.sleep(LEASE_TTL * 2)
        acked.update(await w.commit({"down/a": 99}))
        got = await w.get_many(["down/a", "down/b", "down/c"])
        assert {k: i.version for k, i in got.items()} == acked
    for s in shards:
        assert s.proc.poll() is None, s.log_tail()  # nobody was fenced: etcd kept their leases
    assert "etcd unreachable" in shards[0].log_tail(200)  # and they said so loudly
