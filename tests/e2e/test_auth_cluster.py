"""Agent identity in cluster mode: the rules live in etcd (issue 16, specs/auth.md §3).

A real etcd, one shard server and two buses (``oribus bus --etcd E --auth D``, where ``D``
does not exist on the buses' side: they read the rules ``oribus auth push`` stored in etcd),
each on free ports in a temporary directory:

* a token revoked in etcd (``oribus auth revoke --etcd``) is refused by both buses, without
  a restart, shortly after;
* a policy pushed again applies on both buses; a policy that does not parse, written into
  etcd by hand, is refused: both buses keep enforcing the last good one, say so in their
  logs and in ``/metrics`` (``oribus_auth_stale``), and never fall open;
* a bus started while etcd's auth data is malformed does not start;
* a push from a broken directory writes nothing;
* ``oribus up --replicas 3 --etcd E --auth D`` (another cluster name on the same etcd)
  enforces D until a directory is pushed to its cluster, then etcd's rules.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aetcd
import jwt
import pytest
from etcd_server import EtcdServer
from processes import Cluster, ServerProcess, cluster_bus, cluster_shard, free_port, run_cli

import oribus
from oribus.errors import InvalidRequest, PermissionDenied, Unauthenticated

POLICY = """
roles:
  team-a:
    read: ["team/a/*"]
    write: ["team/a/*"]
  ops:
    read: ["*"]
    write: ["*"]
    admin: true
"""
# the same with team-a also granted team/b/*
POLICY_WIDER = POLICY.replace('read: ["team/a/*"]', 'read: ["team/a/*", "team/b/*"]')


def cli(*args: str) -> str:
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def token(auth: Path, agent: str, role: str) -> str:
    return cli("auth", "token", "--dir", str(auth), "--agent", agent, "--role", role, "--ttl", "1h")


def eventually(check, timeout: float = 15.0) -> float:
    """Seconds until ``check()`` passed (it must within ``timeout``)."""
    t0 = time.monotonic()
    while True:
        try:
            check()
            return time.monotonic() - t0
        except AssertionError:
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.05)


def outcome(bus: ServerProcess, agent: str, tok: str, key: str) -> str:
    """"ok", or the name of the error reading ``key`` through ``bus`` raised."""
    try:
        with oribus.Client(bus.address, agent=agent, token=tok) as c:
            c.get(key)
        return "ok"
    except (Unauthenticated, PermissionDenied) as e:
        return type(e).__name__


def metrics(bus: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://{bus.http_address}/metrics", timeout=10) as r:
        return r.read().decode()


def etcd_put(url: str, key: str, value: bytes) -> None:
    async def put() -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        client = aetcd.Client(host=host, port=int(port))
        try:
            await client.put(key.encode(), value)
        finally:
            await client.close()

    asyncio.run(put())


class Fleet:
    def __init__(self, etcd: EtcdServer, auth: Path, buses: list[ServerProcess], tmp: Path) -> None:
        self.etcd = etcd
        self.auth = auth
        self.buses = buses
        self.tmp = tmp
        self.ops = token(auth, "ops", "ops")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("auth-cluster")
    etcd = EtcdServer(tmp / "etcd").start()
    cluster = Cluster()
    try:
        auth = tmp / "auth"
        cli("auth", "init", "--dir", str(auth))
        (auth / "policy.yaml").write_text(POLICY)
        cli("cluster", "init", "--etcd", etcd.url, "--shards", "1")
        pushed = json.loads(cli("auth", "push", "--dir", str(auth), "--etcd", etcd.url))
        assert pushed["keys"] == 1 and pushed["etcd"] == "/oribus/oribus/auth/"
        shard = cluster.add(cluster_shard(tmp, etcd.url, 0)).start()
        shard.wait_serving()
        buses = []
        for name in ("bus-1", "bus-2"):
            bus = cluster.add(cluster_bus(tmp, etcd.url, name=name))
            bus.args += ["--auth", str(tmp / "not-on-this-machine")]  # etcd's rules, not a directory's
            buses.append(bus.start())
        for bus in buses:
            bus.wait_serving()
        f = Fleet(etcd, auth, buses, tmp)
        with oribus.Client(buses[0].address, agent="ops", token=f.ops) as c:
            c.commit({"team/a/x": "a0", "team/b/x": "b0"})
        yield f
    finally:
        try:
            cluster.stop()
        finally:
            etcd.stop()


def test_a_revocation_in_etcd_applies_on_every_bus(fleet):
    tok = token(fleet.auth, "a1", "team-a")
    other = token(fleet.auth, "a2", "team-a")
    for bus in fleet.buses:
        assert outcome(bus, "a1", tok, "team/a/x") == "ok"
        assert outcome(bus, "a1", tok, "team/b/x") == "PermissionDenied"  # the rules come from etcd
    token_id = jwt.decode(tok, options={"verify_signature": False})["jti"]
    done = json.loads(cli("auth", "revoke", "--etcd", fleet.etcd.url, token_id))
    assert done["revoked"] == token_id and done["etcd"]["until"] == 0
    for bus in fleet.buses:
        eventually(lambda bus=bus: (assert_equal(outcome(bus, "a1", tok, "team/a/x"), "Unauthenticated")), 10)
        assert outcome(bus, "a2", other, "team/a/x") == "ok"  # only that token
    assert 'reason="revoked"' in metrics(fleet.buses[1])


def assert_equal(got: object, want: object) -> None:
    assert got == want, got


def test_a_pushed_policy_applies_on_every_bus_and_a_broken_one_keeps_the_last_good(fleet):
    tok = token(fleet.auth, "a3", "team-a")
    for bus in fleet.buses:
        assert outcome(bus, "a3", tok, "team/b/x") == "PermissionDenied"
    (fleet.auth / "policy.yaml").write_text(POLICY_WIDER)
    cli("auth", "push", "--dir", str(fleet.auth), "--etcd", fleet.etcd.url)
    for bus in fleet.buses:
        eventually(lambda bus=bus: assert_equal(outcome(bus, "a3", tok, "team/b/x"), "ok"))

    # back to the narrower rules, then a policy nobody can parse written over them by hand
    (fleet.auth / "policy.yaml").write_text(POLICY)
    cli("auth", "push", "--dir", str(fleet.auth), "--etcd", fleet.etcd.url)
    for bus in fleet.buses:
        eventually(lambda bus=bus: assert_equal(outcome(bus, "a3", tok, "team/b/x"), "PermissionDenied"))
    etcd_put(fleet.etcd.url, "/oribus/oribus/auth/policy", b"roles: [team-a: everything\n")
    for bus in fleet.buses:
        eventually(lambda bus=bus: assert_equal('oribus_auth_stale{part="policy"} 1' in metrics(bus), True))
        assert "policy in etcd refused, the last good one stays in force" in bus.log_tail(200)
        assert outcome(bus, "a3", tok, "team/b/x") == "PermissionDenied"  # closed, as before
        assert outcome(bus, "a3", tok, "team/a/x") == "ok"
    # a bus started now, on that data, refuses to start and names the part
    late = cluster_bus(fleet.tmp, fleet.etcd.url, name="bus-late")
    late.args += ["--auth", str(fleet.tmp / "not-on-this-machine")]
    late.start()
    try:
        assert late.wait_exit(30) != 0
    finally:
        late.stop()
    assert "auth data under /oribus/oribus/auth/ is not usable: policy" in late.log_tail(20)

    cli("auth", "push", "--dir", str(fleet.auth), "--etcd", fleet.etcd.url)  # repaired
    for bus in fleet.buses:
        eventually(lambda bus=bus: assert_equal('oribus_auth_stale{part="policy"} 0' in metrics(bus), True))


def test_a_push_from_a_broken_directory_writes_nothing(fleet, tmp_path):
    tok = token(fleet.auth, "a4", "team-a")
    broken = tmp_path / "broken"
    cli("auth", "init", "--dir", str(broken))  # another key: pushed, it would refuse tok
    (broken / "policy.yaml").write_text("roles: {team-a: {read: [\"a*b\"]}}\n")
    done = run_cli("auth", "push", "--dir", str(broken), "--etcd", fleet.etcd.url)
    assert done.returncode != 0 and "a*b" in done.stderr
    time.sleep(1.0)  # what a watch round trip would have delivered
    for bus in fleet.buses:
        assert outcome(bus, "a4", tok, "team/a/x") == "ok"


def test_up_with_replica_groups_switches_from_its_directory_to_etcd_at_the_first_push(fleet, tmp_path):
    """``oribus up --replicas 3 --etcd E --auth D`` on a cluster with nothing published enforces
    D; once another directory is pushed to the cluster, its bus follows etcd instead."""
    local, cluster_dir = tmp_path / "local", tmp_path / "published"
    for d in (local, cluster_dir):
        cli("auth", "init", "--dir", str(d))
        (d / "policy.yaml").write_text(POLICY)
    address = f"127.0.0.1:{free_port()}"
    servers = Cluster()
    server = servers.add(ServerProcess("up-replicas", [
        "up", "--processes", "--replicas", "3", "--shards", "1", "--data-dir", str(tmp_path / "data"),
        "--listen", address, "--etcd", fleet.etcd.url, "--cluster", "up-auth", "--lease-ttl", "2",
        "--no-http", "--auth", str(local)], tmp_path, address))
    try:
        server.start().wait_serving(60)
        from_local, from_cluster = token(local, "a1", "team-a"), token(cluster_dir, "a1", "team-a")
        assert outcome(server, "a1", from_local, "team/a/x") == "ok"
        assert outcome(server, "a1", from_cluster, "team/a/x") == "Unauthenticated"  # a key it does not hold
        cli("auth", "push", "--dir", str(cluster_dir), "--etcd", fleet.etcd.url, "--cluster", "up-auth")
        eventually(lambda: assert_equal(outcome(server, "a1", from_cluster, "team/a/x"), "ok"))
        assert outcome(server, "a1", from_local, "team/a/x") == "Unauthenticated"
        assert "following the auth data in etcd from now on" in server.log_tail(200)
        # the other cluster of this etcd never saw it
        assert outcome(fleet.buses[0], "a1", from_cluster, "team/a/x") == "Unauthenticated"
    finally:
        servers.stop()


async def test_revocations_in_etcd_merge_are_pruned_and_survive_a_push(etcd, tmp_path):
    """``EtcdAuthStore`` against a real etcd: a revocation for good stays for good, a later
    ``until`` wins, an id past its ``until`` and the leeway is dropped by the next revocation
    (one still inside the leeway is kept: a bus still accepts its token), a push adds the
    directory's revocations and removes none, and removes the keys the directory retired."""
    from oribus.auth.keys import AuthDir, new_signing_key, retire_key
    from oribus.auth.published import dir_push
    from oribus.meta.auth_store import EtcdAuthStore
    from oribus.meta.etcd import EtcdMeta

    d = AuthDir(tmp_path / "auth")
    cli("auth", "init", "--dir", str(d.root))
    (d.root / "revoked").write_text("from-dir 0\n")
    meta = EtcdMeta(etcd.url, "c1")
    try:
        store = EtcdAuthStore(meta)
        now = time.time()
        with pytest.raises(InvalidRequest, match="auth push"):  # nothing published yet
            await store.revoke("t1", 0, now)
        await store.push(dir_push(d))
        assert await store.revoke("t1", int(now) + 100, now) == int(now) + 100
        assert await store.revoke("t1", int(now) + 50, now) == int(now) + 100  # the later until wins
        assert await store.revoke("t1", 0, now) == 0
        assert await store.revoke("t1", int(now) + 500, now) == 0  # for good stays for good
        await store.revoke("long-gone", int(now) - 100, now)
        await store.revoke("in-leeway", int(now) - 10, now)
        await store.revoke("t2", 0, now)  # rewrites nothing else, prunes what is past
        revoked = {n for n in await store.read() if n.startswith("revoked/")}
        assert revoked == {"revoked/from-dir", "revoked/t1", "revoked/in-leeway", "revoked/t2"}
        with pytest.raises(InvalidRequest):
            await store.revoke("has space", 0, now)

        old_kid = next(n for n in await store.read() if n.startswith("keys/"))
        (d.root / "revoked").unlink()
        new_signing_key(d)
        retire_key(d, old_kid.removeprefix("keys/"))
        counts = await store.push(dir_push(d))
        held = await store.read()
        assert counts == {"keys": 1, "removed": 1, "revoked": 0}
        assert old_kid not in held and sum(n.startswith("keys/") for n in held) == 1
        assert {n for n in held if n.startswith("revoked/")} == revoked  # a push lifts no revocation
    finally:
        await meta.close()


def test_a_cluster_bus_without_published_data_or_a_directory_does_not_start(fleet, tmp_path):
    cli("cluster", "init", "--etcd", fleet.etcd.url, "--cluster", "nothing-published", "--shards", "1")
    bus = cluster_bus(tmp_path, fleet.etcd.url, name="bus-nothing")
    bus.args += ["--cluster", "nothing-published", "--auth", str(tmp_path / "missing")]
    bus.start()
    try:
        assert bus.wait_exit(30) != 0
    finally:
        bus.stop()
    assert "nor is any auth data published under /oribus/nothing-published/auth/" in bus.log_tail(20)
