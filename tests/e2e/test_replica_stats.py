"""Operators see their replica groups: ``oribus stats``, ``/v1/stats``, the dashboard's feed and
``/metrics`` of a real ``oribus up --processes --replicas 3`` (a private etcd, three supervised
member processes, a bus with its HTTP gateway).

* at start: three members, exactly one primary, the others followers and voters, the term,
  every member's LSNs, no failover yet;
* a SIGSTOPped follower: its lag in records grows with every commit and its time since the
  last ack with every second; resumed, it catches up (lag 0, a follower again);
* kill -9 of the primary: the stats name the primary of a higher term, the failover is
  recorded (previous and new primary, both terms, when), ``/metrics`` counts it, and the
  dashboard (headless chromium) draws the group's table with the new primary and the failover
  (a screenshot goes to ``$ORIBUS_ARTIFACTS/dashboard-replica-group.png``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import urllib.request
from typing import Any

import pytest
from processes import ServerProcess, free_port, run_cli, shard_pids
from selenium.webdriver.remote.webdriver import WebDriver
from test_dashboard_browser import ARTIFACTS, browser, wait_for  # noqa: F401 - browser: the fixture
from unit.test_metrics import check_histogram, parse, value

import oribus
from oribus import SessionExpired, Unavailable

pytestmark = pytest.mark.timeout(240)


def http_json(base: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{base}{path}", timeout=10) as r:
        return json.loads(r.read())


def http_text(base: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{base}{path}", timeout=10) as r:
        return r.read().decode()


def cli_group(address: str) -> dict | None:
    """Shard 0's ``group`` as ``oribus stats`` prints it (None: the shard did not answer)."""
    r = run_cli("stats", "--addr", address)
    assert r.returncode == 0, r.stderr
    shard = json.loads(r.stdout)["shards"][0]
    return shard.get("group") if shard["up"] else None


async def wait_group(address: str, check: Any, what: str, server: ServerProcess, timeout: float = 30.0) -> dict:
    """Shard 0's group from ``oribus stats`` once ``check(group)`` holds."""
    deadline = time.monotonic() + timeout
    group = None
    while True:
        group = await asyncio.to_thread(cli_group, address)
        if group is not None and check(group):
            return group
        assert time.monotonic() < deadline, f"{what}: {json.dumps(group, indent=1)}\n{server.log_tail(80)}"
        await asyncio.sleep(0.3)


# The replica groups as the dashboard draws them, read in one script run (the page redraws every second).
_GROUPS = """
return [...document.querySelectorAll('[data-testid="group"]')].map((g) => ({
  shard: g.dataset.shard,
  term: g.querySelector('[data-field="term"]').textContent,
  primary: g.querySelector('[data-field="primary"]').textContent,
  last_failover: g.querySelector('[data-field="last_failover"]').textContent,
  members: [...g.querySelectorAll('[data-testid="member-row"]')].map((r) => ({
    member: r.dataset.member, role: r.dataset.role,
    lag: r.querySelector('[data-field="lag_records"]').textContent})),
}));
"""


def row(group: dict, member: int) -> dict:
    (found,) = [m for m in group["members"] if m["member"] == member]
    return found


async def commit_retrying(session: oribus.Session, writes: dict, server: ServerProcess, timeout: float = 30.0) -> dict:
    """One commit through a failover: the same commit id while the outcome is unknown."""
    deadline = time.monotonic() + timeout
    commit_id = f"c-{time.monotonic_ns()}"
    while True:
        try:
            return await session.commit(writes, commit_id=commit_id)
        except Unavailable:
            pass
        except SessionExpired:  # its deliveries lived on the old primary: a new session, a new commit
            await session.reset_session()
            commit_id = f"c-{time.monotonic_ns()}"
        assert time.monotonic() < deadline, f"writes did not flow again:\n{server.log_tail(120)}"
        await asyncio.sleep(0.1)


async def test_stats_and_metrics_show_the_group_through_a_stalled_follower_and_a_failover(
        cluster, tmp_path, browser: WebDriver):  # noqa: F811 - the fixture imported above
    data = tmp_path / "data"
    address, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    server = cluster.add(ServerProcess("up", [
        "up", "--processes", "--replicas", "3", "--shards", "1", "--data-dir", str(data), "--listen", address,
        "--http", http, "--lease-ttl", "2", "--read-lease", "0.5"], tmp_path, address)).start()
    server.http_address = http
    stopped: list[int] = []
    try:
        await asyncio.to_thread(server.wait_serving, 60)
        groups = json.loads(re.search(r"oribus up: groups (\{.*\})", server.log_tail(50)).group(1))  # type: ignore[union-attr]
        pids = {m["member"]: m["pid"] for m in groups["0"]}

        # ---- three members, one primary, the term ---------------------------------------------
        async with oribus.connect(address, agent="writer") as w:
            for i in range(10):
                await w.commit({f"k/{i}": i})
            group = await wait_group(address, lambda g: all(m["role"] in ("primary", "follower")
                                                            for m in g["members"]), "three members", server)
            assert group["replicas"] == 3 and [m["member"] for m in group["members"]] == [0, 1, 2]
            assert [m["role"] for m in group["members"]].count("primary") == 1
            primary, term = group["primary"], group["term"]
            assert row(group, primary)["role"] == "primary" and term >= 1
            assert all(m["voter"] and m["term"] == term and m["durable_lsn"] >= 10 and m["stream"]
                       for m in group["members"])
            assert row(group, primary)["applied_lsn"] == group["commit_lsn"] >= 10
            assert group["failovers"] == 0 and group["last_failover"] is None
            v1 = http_json(http, "/v1/stats")["shards"][0]["group"]
            assert (v1["primary"], v1["term"], len(v1["members"])) == (primary, term, 3)
            assert v1["quorum_wait_seconds"]["member"] == primary
            page = parse(http_text(http, "/metrics"))
            assert value(page, "oribus_replication_term", shard="0") == term
            assert value(page, "oribus_replication_failovers_total", shard="0") == 0
            waits = check_histogram(page, "oribus_replication_quorum_wait_seconds", shard="0", member=str(primary))
            assert waits[-1][1] >= 10  # a quorum wait per commit (and the term's start)

            # ---- a SIGSTOPped follower falls behind; resumed, it catches up -------------------
            slow = min(m for m in (0, 1, 2) if m != primary)
            os.kill(pids[slow], signal.SIGSTOP)
            stopped.append(pids[slow])
            for i in range(20):
                await w.commit({f"s/{i}": i})  # a majority (the other two) still acknowledges
            first = await wait_group(address, lambda g: row(g, slow)["role"] in ("unreachable", "absent"),
                                     "the stopped follower answers nothing", server)
            assert row(first, slow)["lag_records"] >= 20
            for i in range(15):
                await w.commit({f"t/{i}": i})
            await asyncio.sleep(1.0)
            later = await wait_group(address, lambda g: True, "stats", server)
            assert row(later, slow)["lag_records"] >= row(first, slow)["lag_records"] + 15
            assert row(later, slow)["last_ack_seconds"] >= row(first, slow)["last_ack_seconds"] + 1.0
            assert row(later, slow)["acked_lsn"] == row(first, slow)["acked_lsn"]
            other = 3 - primary - slow
            assert row(later, other)["lag_records"] < 15 and row(later, other)["role"] == "follower"
            page = parse(http_text(http, "/metrics"))
            assert value(page, "oribus_replication_lag_records", shard="0", member=str(slow)) >= 35
            assert value(page, "oribus_replication_last_ack_seconds", shard="0", member=str(slow)) >= 1.0
            os.kill(pids[slow], signal.SIGCONT)
            stopped.remove(pids[slow])
            await wait_group(address, lambda g: row(g, slow)["role"] == "follower" and row(g, slow)["lag_records"]
                             == 0, "the resumed follower catches up", server, timeout=60)

            # ---- kill -9 of the primary: a new primary, a higher term, the failover recorded ---
            killed_at = time.time()
            os.kill(pids[primary], signal.SIGKILL)
            await commit_retrying(w, {"after": 1}, server)
            # a new term; its primary may be the killed member again, restarted by the supervisor
            # on its own directory (complete, and the lowest ids stand first)
            group = await wait_group(address, lambda g: g["term"] > term, "a new primary", server)
        assert row(group, group["primary"])["role"] == "primary"
        assert group["failovers"] == 1
        failover = group["last_failover"]
        assert (failover["previous_primary"], failover["previous_term"]) == (primary, term)
        assert (failover["new_primary"], failover["term"]) == (group["primary"], group["term"])
        assert killed_at - 1 <= failover["at"] <= time.time() + 1
        page = parse(http_text(http, "/metrics"))
        assert value(page, "oribus_replication_failovers_total", shard="0") == 1
        assert value(page, "oribus_replication_term", shard="0") == group["term"]
        feed = http_json(http, "/dashboard/state")["shards"][0]["group"]
        assert feed["primary"] == group["primary"] and feed["last_failover"]["previous_primary"] == primary
        assert "quorum_wait_seconds" not in feed
        browser.get(f"http://{http}/")
        new = group["primary"]
        drawn = wait_for(browser, "the group's table after the failover", lambda d: [
            g for g in d.execute_script(_GROUPS) if g["primary"] == f"primary: member {new}"])
        (shown,) = drawn
        assert shown["shard"] == "0" and shown["term"] == f"term {group['term']}"
        assert [m["member"] for m in shown["members"]] == ["0", "1", "2"]
        assert [m["member"] for m in shown["members"] if m["role"] == "primary"] == [str(new)]
        assert (f"member {primary} (term {term}) → member {new} (term {group['term']})"
                in shown["last_failover"]), shown
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard-replica-group.png")), "screenshot failed"
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        code = server.stop()
        for pid in shard_pids(data):  # ours: they serve this test's data directory
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 0, server.log_tail()
