"""``oribus up --processes`` as a process: clean shutdown on SIGTERM, no shard left behind on failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

from processes import oribus_command, up

import oribus


def pids_serving(data_dir: Path) -> list[int]:
    """Processes whose command line names ``data_dir`` (shards started by ``up``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().split(")")[-1].split()[0]
            if "oribus.cli shard " in cmd and str(data_dir) in cmd and state != "Z":
                found.append(int(proc.name))
    return found


async def test_sigterm_stops_shards_and_keeps_data(cluster, tmp_path):
    data = tmp_path / "data"
    server = cluster.add(up(tmp_path, data, processes=True)).start()
    await asyncio.to_thread(server.wait_serving)
    assert len(server.children) == 2 and sorted(pids_serving(data)) == sorted(server.children)
    async with oribus.connect(server.address, agent="writer") as s:
        await s.commit({"life/a": 1, "life/b": 2, "life/c": 3})

    assert server.stop() == 0, server.log_tail()  # SIGTERM: drain, flush, stop the shards
    assert pids_serving(data) == [], "shard processes outlived `oribus up`"
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
        assert pids_serving(data) == [], "`oribus up` failed but left its shard processes running"
    finally:
        for pid in pids_serving(data):  # ours: they serve this test's data directory
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

