"""``oribus up --processes`` as a process: clean shutdown on SIGTERM, no shard left behind on failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess

from processes import oribus_command, shard_pids, up

import oribus


async def test_sigterm_stops_shards_and_keeps_data(cluster, tmp_path):
    data = tmp_path / "data"
    server = cluster.add(up(tmp_path, data, processes=True)).start()
    await asyncio.to_thread(server.wait_serving)
    assert len(server.children) == 2 and sorted(shard_pids(data)) == sorted(server.children)
    async with oribus.connect(server.address, agent="writer") as s:
        await s.commit({"life/a": 1, "life/b": 2, "life/c": 3})

    assert server.stop() == 0, server.log_tail()  # SIGTERM: drain, flush, stop the shards
    assert shard_pids(data) == [], "shard processes outlived `oribus up`"
    assert "shutting down" in server.log_tail()

    server.start()
    await asyncio.to_thread(server.wait_serving)
    async with oribus.connect(server.address, agent="reader") as s:
        items = await s.get_many(["life/a", "life/b", "life/c"])
    assert {k: (i.value, i.version) for k, i in items.items()} == {
        "life/a": (1, 1),
        "life/b": (2, 1),
        "life/c": (3, 1),
    }


def test_up_that_cannot_listen_leaves_no_shard_behind(tmp_path):
    data = tmp_path / "data"
    # 203.0.113.0/24 is TEST-NET-3: never an address of this machine, so the bus cannot bind
    cmd = oribus_command(
        "up", "--processes", "--data-dir", str(data), "--listen", "203.0.113.7:7700"
    )
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert shard_pids(data) == [], "`oribus up` failed but left its shard processes running"
    finally:
        for pid in shard_pids(data):  # ours: they serve this test's data directory
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

