"""``oribus verify`` against real deployments: a healthy one passes, two broken ones are caught.

- a healthy ``oribus up --processes`` (SDK and HTTP clients): exit 0, the reports are
  written, the history passes ``oribus check`` too, and the run's keys are removed;
- ``oribus up --admin`` with ORI validation switched off through ``POST /admin/config``:
  exit 1 and the summary names the anomalies (stale commits accepted);
- a shard server started with ``--unsafe-no-fsync``, killed mid-run and restarted from
  what its last fsync covered (a power loss: segments cut back to their size when it
  started, as ``tests/consistency/test_checker.py`` simulates it): exit 1, ``lost-write``;
- an address nobody serves: exit 2 with a clear message;
- ``--nemesis local --pids``: the seeded schedule hits the given process;
- ``--start-local --nemesis local``: verify starts, kills, pauses and restarts its own
  ``oribus up --processes`` and finds nothing (slow);
- ``--start-local --replicas 3 --nemesis local``: its ``oribus up --processes --replicas 3``
  loses primaries with their data directories, has primaries paused past their lease and
  followers killed, and verify finds no anomaly and no lost acknowledged commit (slow).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import SLOT_MAP
from processes import bus, free_port, oribus_command, shard, up

import oribus
from oribus.verify.workloads import KeyRing

SHORT = "5s"


def verify(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(oribus_command("verify", *args), capture_output=True, text=True, timeout=timeout)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


async def test_a_healthy_deployment_passes_and_its_keys_are_removed(cluster, tmp_path):
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=True, shards=2)).start().wait_serving()
    out = tmp_path / "out"
    r = verify("--addr", server.address, "--http", f"http://{server.http_address}", "--duration", SHORT,
               "--clients", "6", "--keys", "6", "--seed", "11", "--out", str(out), "--prefix", "verify/healthy/")
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "anomalies: none" in r.stdout and "OK: no anomaly found" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["counts"]["ok"] > 50 and report["http_clients"] == 1
    assert report["counts"]["edges"] > 0
    assert {"ok", "conflict", "p50_ms"} <= set(report["series"][0])
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 2 and "Latency" in page and "Outcomes per second" in page
    assert not any(ref in page for ref in ("<script", "src=", "href=", "@import"))  # self-contained
    # the history stands on its own
    check = subprocess.run(oribus_command("check", str(out / "history.jsonl")), capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    # only the run's prefix was touched, and its keys are gone (their history stays)
    async with oribus.connect(server.address, agent="audit") as s:
        for k in (KeyRing("verify/healthy/la/", 6).current()[0], KeyRing("verify/healthy/step/", 6).current()[0]):
            item = await s.get(k)
            assert item.value is None and item.version > 1, item
            assert len(await s.history(k)) > 1


async def test_keep_leaves_the_keys(cluster, tmp_path):
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False, shards=2)).start().wait_serving()
    r = verify("--addr", server.address, "--duration", "2s", "--clients", "2", "--keys", "3",
               "--workload", "list-append", "--prefix", "verify/kept/", "--keep", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stdout + r.stderr
    async with oribus.connect(server.address, agent="audit") as s:
        assert isinstance((await s.get(KeyRing("verify/kept/la/", 3).current()[0])).value, list)


async def test_validation_switched_off_is_caught(cluster, tmp_path):
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False, shards=2, admin=True)).start()
    server.wait_serving()
    assert _post(f"http://{server.http_address}/admin/config", {"ori_enabled": False})["ori_enabled"] is False
    r = verify("--addr", server.address, "--http", f"http://{server.http_address}", "--duration", SHORT,
               "--clients", "6", "--keys", "4", "--seed", "2", "--out", str(tmp_path / "out"))
    print(r.stdout[-4000:])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED: the deployment broke its promises" in r.stdout
    kinds = json.loads((tmp_path / "out" / "report.json").read_text())["by_kind"]
    # stale commits accepted: lost updates show as cycles with an anti-dependency, and
    # as lists that are not prefixes of one another
    assert {"G-single", "G2", "incompatible-order", "lost-write"} & set(kinds), kinds
    assert any(f"{k} [" in r.stdout for k in kinds)  # each kind named with an example


def _wal_sizes(data_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in data_dir.rglob("*.wal")}


def _lose_unsynced(data_dir: Path, durable: dict[Path, int]) -> int:
    """A power loss of a shard that never fsynced: every segment goes back to its size when the
    shard started, and segments created since vanish. Returns how many were cut."""
    cut = 0
    for p in data_dir.rglob("*.wal"):
        keep = durable.get(p)
        if keep is None:
            p.unlink()
            cut += 1
        elif p.stat().st_size > keep:
            os.truncate(p, keep)
            cut += 1
    return cut


async def test_a_shard_without_fsync_that_loses_power_is_caught(cluster, tmp_path):
    s0 = cluster.add(shard(tmp_path, 0, tmp_path / "shard-0")).start()
    s1 = cluster.add(shard(tmp_path, 1, tmp_path / "shard-1"))
    s1.args.append("--unsafe-no-fsync")
    s1.start()
    for s in (s0, s1):
        s.wait_serving()
    b = cluster.add(bus(tmp_path, [s0.shard_address, s1.shard_address])).start().wait_serving()
    durable = _wal_sizes(tmp_path / "shard-1")
    assert durable
    assert {SLOT_MAP.shard_for(k) for k in KeyRing("verify/power/la/", 6).current()} == {0, 1}
    run = subprocess.Popen(oribus_command("verify", "--addr", b.address, "--duration", "10s", "--clients", "4",
                                          "--keys", "6", "--workload", "list-append", "--seed", "4",
                                          "--prefix", "verify/power/", "--out", str(tmp_path / "out")),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while sum(_wal_sizes(tmp_path / "shard-1").values()) < sum(durable.values()) + 20_000:
            assert time.monotonic() < deadline and run.poll() is None, "no commits reached shard 1"
            time.sleep(0.2)
        s1.kill9()
        assert _lose_unsynced(tmp_path / "shard-1", durable) > 0
        s1.start().wait_serving()
        out, err = run.communicate(timeout=150)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    print(out[-4000:])
    assert run.returncode == 1, out + err
    assert "lost-write" in out
    assert "lost-write" in json.loads((tmp_path / "out" / "report.json").read_text())["by_kind"]


def test_an_unreachable_deployment_exits_2_with_a_clear_message(tmp_path):
    r = verify("--addr", f"127.0.0.1:{free_port()}", "--duration", "1s", "--out", str(tmp_path / "o"), timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot reach the bus at 127.0.0.1:" in r.stderr
    assert not (tmp_path / "o" / "report.json").exists()


async def test_nemesis_local_hits_the_given_pids_on_a_seeded_schedule(cluster, tmp_path):
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False, shards=2)).start().wait_serving()
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        r = verify("--addr", server.address, "--duration", "4s", "--clients", "2", "--keys", "4", "--seed", "9",
                   "--nemesis", "local", "--pids", str(victim.pid), "--out", str(tmp_path / "o"))
        assert r.returncode == 0, r.stdout + r.stderr
        events = json.loads((tmp_path / "o" / "report.json").read_text())["nemesis_events"]
        faults = [e for e in events if e["fault"] in ("kill", "pause")]
        assert faults and all(e["pid"] == victim.pid for e in faults), events
        assert "nemesis:" in r.stdout
        if any(e["fault"] == "kill" for e in faults):
            assert victim.wait(5) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


@pytest.mark.slow
def test_start_local_with_the_nemesis_kills_pauses_restarts_and_finds_nothing(tmp_path):
    r = verify("--start-local", "--nemesis", "local", "--duration", "12s", "--clients", "6", "--keys", "6",
               "--seed", "1", "--out", str(tmp_path / "o"), timeout=240)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    faults = {e["fault"] for e in report["nemesis_events"]}
    assert faults & {"kill", "pause"}, report["nemesis_events"]
    assert report["counts"]["ok"] > 20
    started = re.search(r"starting oribus up --processes in (\S+) \.\.\.", r.stderr)
    assert started and not Path(started.group(1)).exists()  # a passing run leaves no directory behind


@pytest.mark.slow
def test_start_local_replica_groups_survive_their_faults_and_verify_finds_nothing(tmp_path):
    """Every kind of the group nemesis hits (kill-primary-wipe, pause-primary, kill-follower: one
    of each per round, in a seeded order); each wiped primary's data directory is really gone."""
    out = tmp_path / "o"
    r = verify("--start-local", "--replicas", "3", "--nemesis", "local", "--duration", "30s", "--clients", "6",
               "--keys", "6", "--seed", "5", "--out", str(out), timeout=300)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "anomalies: none" in r.stdout and "on 2 replica groups of 3" in r.stdout
    report = json.loads((out / "report.json").read_text())
    events = report["nemesis_events"]
    assert all(n >= 1 for n in report["faults"].values()), events
    assert not [e for e in events if e["fault"] == "unhealthy"], events
    for e in events:
        if e["fault"] == "kill-primary-wipe":
            assert "deleted" in e["detail"] and e["pid"] > 1
    # every primary lost (killed, or paused past its lease) had a successor named in etcd
    primaries_hit = [e for e in events if e["fault"] in ("kill-primary-wipe", "pause-primary")]
    assert len([e for e in events if e["fault"] == "takeover"]) == len(primaries_hit), events
    assert "a new primary" in r.stdout
    assert report["counts"]["ok"] > 50 and report["counts"]["unverifiable_writes"] == 0
