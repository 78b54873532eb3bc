"""One process per data directory, and shard processes that die with ``oribus up``.

Two ``oribus up`` on one directory used to run side by side, both acknowledging
writes into the same WALs; the next start then failed with an LSN gap and
``oribus repair`` dropped acknowledged commits. Every opener now takes the
directory's lock (specs/engine.md, "Data directory layout"): a second one is
refused at once, naming the directory and the holder's pid. And a kill -9 of
``oribus up --processes`` no longer leaves its shard processes running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import REPO, _alive, _stop_pid, run_cli, shard, up

import oribus

pytestmark = pytest.mark.slow

# The embedded engine in a process of its own: write one key, say so, wait to be killed.
HOLDER = (
    "import sys, time, oribus\n"
    "bus = oribus.open_local_sync(sys.argv[1], agent='holder')\n"
    "bus.put('held/k', 'v1')\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)
# A second embedded engine on the same directory: report what opening it raised.
SECOND = (
    "import json, sys, oribus\n"
    "try:\n"
    "    oribus.open_local_sync(sys.argv[1], agent='second').close()\n"
    "    print(json.dumps({'opened': True}))\n"
    "except oribus.OribusError as e:\n"
    "    print(json.dumps({'error': e.code, 'message': e.message, **e.details}))\n"
)


def _refusal(server, data: Path, holder_pid: int) -> str:
    """Wait for a second server on ``data`` to exit by itself; its one-line refusal."""
    started = time.monotonic()
    assert server.wait_exit(timeout=20) == 3, server.log_tail()
    took = time.monotonic() - started
    lines = [line for line in server.log_path.read_text().splitlines() if not line.startswith("---- start")]
    assert len(lines) == 1, lines  # one clear line, no traceback
    assert "refused" in lines[0] and str(data) in lines[0] and f"pid {holder_pid}" in lines[0], lines
    assert took < 10, f"the refusal took {took:.1f}s"
    return lines[0]


def test_a_second_up_on_one_data_dir_is_refused_and_the_first_serves_on(cluster, tmp_path):
    data = tmp_path / "data"
    first = cluster.add(up(tmp_path, data, processes=False, shards=1, name="first")).start().wait_serving()
    with oribus.Client(first.address, agent="a") as c:
        assert c.put("dup/k", "v1") == 1

    second = cluster.add(up(tmp_path, data, processes=False, shards=1, name="second")).start()
    _refusal(second, data, first.pid)

    # repair refuses to touch a directory a live process holds
    r = run_cli("repair", "--data-dir", str(data))
    assert r.returncode == 3 and str(data) in r.stderr and f"pid {first.pid}" in r.stderr, r
    assert r.stdout == ""

    with oribus.Client(first.address, agent="b") as c:
        assert c.get("dup/k").value == "v1"
        assert c.put("dup/k", "v2", expect=1) == 2
    assert first.stop() == 0, first.log_tail()
    first.start().wait_serving()  # no LSN gap: one writer only
    with oribus.Client(first.address, agent="c") as c:
        assert c.get("dup/k") == oribus.Item("dup/k", "v2", 2)


def test_a_second_shard_on_one_data_dir_is_refused(cluster, tmp_path):
    data = tmp_path / "shard-0"
    first = cluster.add(shard(tmp_path, 0, data)).start().wait_serving()
    second = shard(tmp_path, 0, data)
    second.name = "shard-0-second"
    second.log_path = tmp_path / "shard-0-second.log"
    cluster.add(second).start()
    _refusal(second, data, first.pid)
    first.wait_serving(timeout=2)  # still serving


def test_a_second_embedded_engine_process_is_refused_and_a_killed_holder_frees_the_dir(tmp_path):
    data = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(data)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = subprocess.run([sys.executable, "-c", SECOND, str(data)], capture_output=True, text=True,
                           timeout=30, cwd=REPO)
        refused = json.loads(r.stdout)
        assert refused["error"] == "DataDirLocked", refused
        assert refused["directory"] == str(data) and refused["pid"] == holder.pid, refused
        assert str(data) in refused["message"] and f"pid {holder.pid}" in refused["message"]
    finally:
        holder.kill()  # kill -9: the kernel drops its lock with it
        holder.wait(10)
    with oribus.open_local_sync(data, agent="after") as bus:
        assert bus.get("held/k") == oribus.Item("held/k", "v1", 1)


def test_shard_processes_die_with_a_killed_up_and_a_restart_sees_every_commit(cluster, tmp_path):
    data = tmp_path / "data"
    server = cluster.add(up(tmp_path, data, processes=True, shards=2)).start().wait_serving()
    first_children = list(server.children)
    assert len(first_children) == 2
    keys = [f"orphan/{i}" for i in range(40)]
    try:
        with oribus.Client(server.address, agent="writer") as c:
            for i, key in enumerate(keys):
                assert c.put(key, i) == 1

        other = cluster.add(up(tmp_path, data, processes=True, shards=2, name="up-second")).start()
        _refusal(other, data, server.pid)

        server.kill9()
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in first_children) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [p for p in first_children if _alive(p)]
        assert survivors == [], f"shard processes {survivors} outlived their killed parent"

        server.start().wait_serving()
        with oribus.Client(server.address, agent="reader") as c:
            items = c.get_many(keys)
        assert {k: (items[k].value, items[k].version) for k in keys} == {k: (i, 1) for i, k in enumerate(keys)}
    finally:
        for pid in first_children:  # survivors of a failed run are stopped by pid too
            _stop_pid(pid, 5)


def test_a_surviving_shard_process_makes_a_restarted_up_refuse_instead_of_sharing(cluster, tmp_path):
    data = tmp_path / "data"
    server = cluster.add(up(tmp_path, data, processes=True, shards=1)).start().wait_serving()
    with oribus.Client(server.address, agent="writer") as c:
        c.put("survivor/k", "v1")
    assert server.stop() == 0, server.log_tail()
    # a shard process left running on up's shard directory (one that escaped its parent's death)
    survivor = cluster.add(shard(tmp_path, 0, data / "shard-0000")).start().wait_serving()

    server.start()
    assert server.wait_exit(timeout=30) != 0, server.log_tail()
    log = server.log_tail()
    assert f"{data / 'shard-0000'} is in use by another process (pid {survivor.pid})" in log, log
    survivor.wait_serving(timeout=2)  # untouched: it alone writes its WAL
