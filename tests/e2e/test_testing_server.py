"""The oribus_server fixture: a real ``oribus up`` process, stopped by pid after the test, whose
agents' history oribus_history checks (final state read from the server included). ORI
switched off through ``/admin/config`` must fail the test; the healthy server passes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

AGENTS_FILE = '''
import aiohttp
import pytest

import oribus

pytestmark = pytest.mark.asyncio


async def two_agents_update_one_key(address):
    async with oribus.connect(address, agent="alice") as alice, oribus.connect(address, agent="bob") as bob:
        seen_by_alice, seen_by_bob = await alice.get("plan"), await bob.get("plan")
        await alice.put("plan", (seen_by_alice.value or 0) + 1)
        try:
            await bob.put("plan", (seen_by_bob.value or 0) + 10)
        except oribus.Conflict:
            pass


def remember_pid(server):
    with open("pids", "a") as f:
        f.write(f"{server.pid}\\n")


async def test_healthy(oribus_server, oribus_history):
    remember_pid(oribus_server)
    await two_agents_update_one_key(oribus_server.address)


@pytest.mark.oribus_server("--admin")
async def test_validation_off(oribus_server, oribus_history):
    remember_pid(oribus_server)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{oribus_server.http_url}/admin/config", json={"ori_enabled": False}) as r:
            assert r.status == 200, await r.text()
    await two_agents_update_one_key(oribus_server.address)
'''


def test_oribus_server_with_oribus_history(tmp_path: Path) -> None:
    (tmp_path / "test_agents.py").write_text(textwrap.dedent(AGENTS_FILE))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                        "-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function",
                        "test_agents.py"], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    out = r.stdout
    assert "PASSED test_agents.py::test_healthy" in out, out + r.stderr
    assert "ERROR test_agents.py::test_validation_off" in out, out
    assert "G-single [ori]" in out, out
    assert "alice, ok" in out and "bob, ok" in out, out
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2
    for pid in pids:   # each server was stopped by the fixture
        assert not os.path.exists(f"/proc/{pid}"), pid
