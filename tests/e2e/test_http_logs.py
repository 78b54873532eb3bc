"""Structured logs: ``oribus -v --log-json up`` writes one JSON object per HTTP request."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from processes import up


async def test_json_log_lines_carry_the_commit_id(cluster, tmp_path):
    server = up(tmp_path, tmp_path / "data", processes=False)
    server.args = ["-v", "--log-json", *server.args]
    cluster.add(server).start()
    await asyncio.to_thread(server.wait_serving)
    async with aiohttp.ClientSession(base_url=f"http://{server.http_address}") as http:
        async with http.post("/v1/commit", json={"agent": "logger", "writes": {"log/a": 1},
                                                 "commit_id": "trace-me-1"}) as r:
            assert r.status == 200
        async with http.post("/shard", json={"key": "log/s", "content": "x"}) as r:
            assert r.status == 201
        async with http.post("/commit", json={"key": "log/s", "expected_version": 5, "delta": "x",
                                              "agent_id": "sbus-agent"}) as r:
            assert r.status == 409
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
        http_lines = [ln for ln in lines if ln.get("event") == "http"]
        if len(http_lines) >= 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    commit = next(ln for ln in http_lines if ln["path"] == "/v1/commit")
    assert commit["commit_id"] == "trace-me-1" and commit["agent"] == "logger" and commit["status"] == 200
    assert commit["level"] == "INFO" and commit["logger"] == "oribus.http" and commit["ms"] >= 0
    refused = next(ln for ln in http_lines if ln["path"] == "/commit")
    assert refused["status"] == 409 and refused["agent"] == "sbus-agent" and refused["commit_id"]
