"""``oribus shard --history-store lmdb`` killed between a commit's WAL fsync and its engine write.

Two shard processes keep their older versions in LMDB; shard 1 runs with the
failpoint ``history.before_flush`` armed, so it dies (SIGKILL) after a
commit's WAL record is durable and applied in memory, before the versions it
replaced reach the engine. Restarted, the shard replays the WAL and writes
them again: every key's history is complete (consecutive versions from 1),
holds every acknowledged write with its value, and new commits work. The
same directory opened without ``--history-store lmdb`` is refused, with a
message naming the option, and left as it was.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import keys_on_shard
from processes import ServerProcess, bus, shard

import oribus

KEYS = 4
ROUNDS = 60  # versions written per key at most (under the 100 kept)
KILL_AT = 40  # the engine flush of shard 1 that dies


def lmdb_shard(log_dir: Path, shard_id: int) -> ServerProcess:
    server = shard(log_dir, shard_id, Path(log_dir) / f"shard-{shard_id}")
    server.args += ["--history-store", "lmdb"]
    return server


async def wait_for(call, timeout: float = 30.0):
    """``call()`` once the bus reaches the restarted shard again."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await call()
        except oribus.Unavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_a_kill_before_the_engine_write_loses_no_version(cluster, tmp_path):
    s0 = cluster.add(lmdb_shard(tmp_path, 0)).start()
    s1 = cluster.add(lmdb_shard(tmp_path, 1))
    s1.env = {"ORIBUS_FAILPOINTS": f"history.before_flush=kill@{KILL_AT}"}
    s1.start()
    for s in (s0, s1):
        await asyncio.to_thread(s.wait_serving)
    b = cluster.add(bus(tmp_path, [s0.shard_address, s1.shard_address])).start()
    await asyncio.to_thread(b.wait_serving)

    keys = keys_on_shard(1, "docs/plan", KEYS) + keys_on_shard(0, "docs/plan", 1)
    writer = oribus.connect(b.address, agent="writer")
    acked: dict[str, dict[int, int]] = {k: {} for k in keys}
    try:
        killed = False
        for i in range(ROUNDS):
            for k in keys:
                try:
                    version = await writer.put(k, {"i": i, "text": "x" * 200})
                except oribus.Unavailable:
                    killed = True
                    break
                acked[k][version] = i
            if killed:
                break
        assert killed, "shard 1 never reached its armed engine flush"
        assert await asyncio.to_thread(s1.wait_exit) == -9, "the failpoint did not kill shard 1"
        assert sum(len(v) for v in acked.values()) > KILL_AT

        s1.env = {}
        s1.start()
        await asyncio.to_thread(s1.wait_serving)
        for k in keys:
            history = await wait_for(lambda k=k: writer.history(k))
            versions = [h.version for h in history]
            assert versions == list(range(versions[0], 0, -1)), f"{k}: history has gaps: {versions}"
            by_version = {h.version: h.value["i"] for h in history}
            lost = {v: i for v, i in acked[k].items() if by_version.get(v) != i}
            assert not lost, f"{k}: acknowledged versions missing or changed after the restart: {lost}"
        await writer.reset_session()  # its deliveries on shard 1 died with that incarnation
        after = await wait_for(lambda: writer.put(keys[0], {"i": "after"}))
        assert after == (await writer.history(keys[0]))[0].version
    finally:
        await writer.close()

    # The same directory without --history-store lmdb: refused, nothing changed.
    await asyncio.to_thread(s1.stop)
    as_memory = cluster.add(shard(tmp_path, 1, tmp_path / "shard-1"))
    as_memory.name = "shard-1-as-memory"
    as_memory.log_path = tmp_path / "shard-1-as-memory.log"
    as_memory.start()
    assert await asyncio.to_thread(as_memory.wait_exit, 30) != 0
    assert "history_store='lmdb'" in as_memory.log_path.read_text()
    assert (tmp_path / "shard-1" / "history" / "data.mdb").exists()
