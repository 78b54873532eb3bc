"""Retention flags on real processes (specs/engine.md "Retention").

``oribus up --processes --history-versions N --history-max-age D`` passes both
to every ``oribus shard`` process it starts: their stats and ``/metrics`` show
the configured count and age and what each rule dropped, ``history``,
``rollback`` and ``watch`` behave after the age compaction ran (a one-second max
age, a short wait), and the S-Bus ``delta_log_depth`` follows the count (also on
an ``oribus bus`` in front of shards started with counts of their own). Bad
values of either flag (``oribus up`` and ``oribus shard``) are refused with a
message before anything starts or any directory is made.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import keys_on_shard
from processes import Cluster, bus, run_cli, shard, up

import oribus
from oribus.errors import HistoryTruncated

MAX_AGE = 1.0  # seconds
VERSIONS = 4


async def wait_for(what, predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = await what()
        if predicate(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.1)


def http_get(address: str, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as r:
        return r.status, r.read().decode()


def http_post(address: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://{address}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


async def test_up_processes_keep_the_configured_count_and_age(cluster: Cluster, tmp_path: Path):
    server = up(tmp_path, tmp_path / "data", processes=True, shards=2)
    server.args += ["--history-versions", str(VERSIONS), "--history-max-age", f"{MAX_AGE}s"]
    cluster.add(server).start().wait_serving()
    assert len(server.children) == 2, "two shard processes"
    async with oribus.connect(server.address, agent="retention") as bus:
        shards = (await bus.stats())["shards"]
        assert [(s["history"]["limit"], s["history"]["max_age_seconds"]) for s in shards] == \
            [(VERSIONS, MAX_AGE)] * 2, "the flags reached every shard process"

        for i in range(1, 7):
            await bus.put("ret/k", i)  # the count keeps 3..6
        assert [v.version for v in await bus.history("ret/k")] == [6, 5, 4, 3]
        await asyncio.sleep(MAX_AGE + 0.3)
        await bus.put("ret/k", 7)  # young: the current version

        async def history() -> list[int]:
            return [v.version for v in await bus.history("ret/k")]

        assert await wait_for(history, lambda h: h == [7]) == [7], "the age rule dropped 4..6"

        with pytest.raises(HistoryTruncated, match=r"version 5 of 'ret/k' is no longer in its history "
                                                   r"\(kept: 7\.\.7\): dropped by the age limit"):
            await bus.rollback({"ret/k": 5})
        with pytest.raises(HistoryTruncated, match=r"dropped by the count limit \(each key keeps its last 4"):
            await bus.rollback({"ret/k": 1})
        assert (await bus.get("ret/k")).version == 7  # nothing written
        with pytest.raises(HistoryTruncated, match="age limit"):
            async for _ in bus.watch("ret/", from_version=3):
                pass
        async for change in bus.watch("ret/k", from_version=6):
            assert (change.version, change.value) == (7, 7)
            break
        await bus.put("ret/k", 8)
        assert await bus.rollback({"ret/k": 7}) == {"ret/k": 9}
        assert (await bus.get("ret/k")).value == 7

        shards = (await bus.stats())["shards"]
        assert sum(s["history"]["dropped_by_age"] for s in shards) >= 3
        assert sum(s["history"]["dropped_by_count"] for s in shards) >= 2

    status, metrics = http_get(server.http_address, "/metrics")
    assert status == 200
    age = [line for line in metrics.splitlines()
           if line.startswith("oribus_history_dropped_versions{") and 'rule="age"' in line]
    assert len(age) == 2 and sum(float(line.rsplit(" ", 1)[1]) for line in age) >= 3, age

    # S-Bus: delta_log_depth is capped by the configured count, not the default 100
    http_post(server.http_address, "/shard", {"key": "ret/doc", "content": "v0"})
    for n in range(6):
        http_post(server.http_address, "/commit/v2",
                  {"key": "ret/doc", "agent_id": "writer", "expected_version": n, "delta": f"v{n + 1}"})
    _, doc = http_get(server.http_address, "/shard/ret/doc")
    got = json.loads(doc)
    assert (got["version"], got["delta_log_depth"]) == (6, VERSIONS - 1)


def test_a_bus_in_front_of_shard_processes_reports_each_shard_s_own_history_depth(cluster: Cluster, tmp_path: Path):
    """``oribus bus --http`` holds no shard: the S-Bus ``delta_log_depth`` of a key is capped by
    the count its own shard keeps (its stats say), not by the default 100."""
    shards = [cluster.add(shard(tmp_path, s, tmp_path / f"shard-{s}", extra=("--history-versions", str(n))))
              for s, n in ((0, 3), (1, 6))]
    for s in shards:
        s.start()
    for s in shards:
        s.wait_serving()
    front = cluster.add(bus(tmp_path, [s.shard_address for s in shards])).start()
    front.wait_serving()
    depths = {}
    for shard_id in (0, 1):
        (key,) = keys_on_shard(shard_id, "depth")
        http_post(front.http_address, "/shard", {"key": key, "content": "v0"})
        for n in range(8):
            http_post(front.http_address, "/commit/v2",
                      {"key": key, "agent_id": "writer", "expected_version": n, "delta": f"v{n + 1}"})
        got = json.loads(http_get(front.http_address, f"/shard/{key}")[1])
        depths[shard_id] = (got["version"], got["delta_log_depth"])
    assert depths == {0: (8, 2), 1: (8, 5)}


@pytest.mark.parametrize("command", ["up", "shard"])
@pytest.mark.parametrize("flag, value, message", [
    ("--history-versions", "0", "must be at least 1"),
    ("--history-versions", "-2", "must be at least 1"),
    ("--history-versions", "lots", "not a whole number"),
    ("--history-max-age", "0", "positive finite"),
    ("--history-max-age", "-5m", "positive finite"),
    ("--history-max-age", "3w", "not a duration"),
    ("--history-max-age", "soon", "not a duration"),
    ("--history-max-age", "inf", "positive finite"),
    ("--history-max-age", "nan", "positive finite"),
])
def test_bad_retention_flags_are_refused_before_anything_starts(tmp_path, command, flag, value, message):
    data = tmp_path / "data"
    args = [command, "--data-dir", str(data), "--listen", "127.0.0.1:0", f"{flag}={value}"]
    if command == "shard":
        args += ["--id", "0"]
    r = run_cli(*args, timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert flag in r.stderr and message in r.stderr, r.stderr
    assert not data.exists()
