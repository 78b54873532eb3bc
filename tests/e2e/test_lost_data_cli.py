"""``oribus up`` and ``oribus shard`` over lost data: refused, unless ``--allow-empty``.

The data is written through the embedded engine (one shard, 200 commits),
then a file or directory is deleted, and the real commands are started on
free ports: they exit with ``DataCorrupted`` naming what is missing, and with
``--allow-empty`` serve an empty shard.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from processes import shard, up

import oribus
from oribus.shards.wal import list_segments

pytestmark = pytest.mark.slow

COMMITS = 200


async def seed(data: Path) -> None:
    async with oribus.open_local(data, shards=1, agent="seed") as bus:
        for i in range(COMMITS):
            await bus.session(session_id=f"s{i}").commit({f"cli-lost/{i}": i}, commit_id=f"c{i:03d}")


def refusal(server) -> dict:
    code = server.wait_exit(30)
    assert code == 1, server.log_tail()
    line = next((ln for ln in server.log_path.read_text().splitlines() if '"DataCorrupted"' in ln), None)
    assert line is not None, server.log_tail()
    return json.loads(line)


async def test_shard_without_its_wal_refuses_unless_allowed_empty(cluster, tmp_path: Path) -> None:
    data = tmp_path / "data"
    await seed(data)
    shard_dir = data / "shard-0000"
    (segment,) = list_segments(shard_dir / "wal")
    segment.path.unlink()

    server = cluster.add(shard(tmp_path, 0, shard_dir)).start()
    refused = await asyncio.to_thread(refusal, server)
    assert refused["expected_lsn"] == COMMITS and refused["found_lsn"] == 0
    assert str(shard_dir / "wal") in refused["message"]

    server.args.append("--allow-empty")
    server.start()
    await asyncio.to_thread(server.wait_serving)
    assert "starting from what is left" in server.log_tail()
    assert server.stop() == 0


async def test_up_without_a_shard_directory_refuses_unless_allowed_empty(cluster, tmp_path: Path) -> None:
    data = tmp_path / "data"
    await seed(data)
    shutil.rmtree(data / "shard-0000")

    server = cluster.add(up(tmp_path, data, processes=False, shards=1)).start()
    refused = await asyncio.to_thread(refusal, server)
    assert str(data / "shard-0000") in refused["message"] and "missing" in refused["message"]
    assert not (data / "shard-0000").exists()

    server.args.append("--allow-empty")
    server.start()
    await asyncio.to_thread(server.wait_serving)
    async with oribus.connect(server.address, agent="reader") as s:
        assert (await s.get("cli-lost/1")).version == 0
    assert server.stop() == 0


async def test_up_with_shard_processes_passes_allow_empty_to_them(cluster, tmp_path: Path) -> None:
    data = tmp_path / "data"
    await seed(data)
    (segment,) = list_segments(data / "shard-0000" / "wal")
    segment.path.unlink()

    server = cluster.add(up(tmp_path, data, processes=True, shards=1)).start()
    refused = await asyncio.to_thread(refusal, server)  # the shard process's refusal, in up's log
    assert refused["expected_lsn"] == COMMITS and refused["found_lsn"] == 0

    server.args.append("--allow-empty")
    server.start()
    await asyncio.to_thread(server.wait_serving)
    async with oribus.connect(server.address, agent="reader") as s:
        assert (await s.get("cli-lost/1")).version == 0
    assert server.stop() == 0
