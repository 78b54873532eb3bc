"""The access rules enforced by a real bus (``UpHost --auth``) on free loopback ports, on every
transport: gRPC, the stream transport and HTTP ``/v1`` (specs/auth.md §1, §4, §5).

An agent with a token for ``team/a/*`` cannot read, write, watch, see the history of or
roll back ``team/b/x``, and the state is unchanged; a refused read leaves no delivery; a
commit with one forbidden key changes nothing; a session belongs to the identity that
used it first; refusals are counted."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from http_call import call

import oribus
from oribus.auth import Authority
from oribus.auth.keys import AuthDir, load_signing_key
from oribus.auth.tokens import issue
from oribus.cli import main
from oribus.errors import PermissionDenied, Unauthenticated
from oribus.gateway import GatewayConfig
from oribus.hosts.up import UpHost

POLICY = """
roles:
  team-a:
    read: ["team/a/*"]
    write: ["team/a/*"]
    watch: ["team/a/*"]
    history: ["team/a/*"]
    rollback: ["team/a/*"]
  ops:
    read: ["*"]
    write: ["*"]
    watch: ["*"]
    history: ["*"]
    rollback: ["*"]
    admin: true
  boss:
    read: ["team/*"]
    write: ["team/*"]
    act_for: ["*"]
"""


def mint(d: AuthDir, agent: str, *roles: str) -> str:
    kid, key = load_signing_key(d)
    return issue(key, kid, agent=agent, roles=roles, now=time.time(), ttl=600)


@pytest.fixture
async def bus(tmp_path):
    main(["auth", "init", "--dir", str(tmp_path / "auth")])
    d = AuthDir(tmp_path / "auth")
    d.policy.write_text(POLICY)
    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=2, authority=Authority(d.root),
                  http=GatewayConfig(listen="127.0.0.1:0"))
    await host.start()
    try:
        ops = mint(d, "ops", "ops")
        async with oribus.connect(host.address, agent="ops", token=ops) as admin:
            await admin.commit({"team/a/x": "a0", "team/b/x": "b0"})
        yield host, d
    finally:
        await host.stop()


async def state(host: UpHost, d: AuthDir) -> dict:
    async with oribus.connect(host.address, agent="ops", token=mint(d, "ops", "ops")) as admin:
        got = await admin.get_many(["team/a/x", "team/b/x"])
        return {k: (v.value, v.version) for k, v in got.items()}


@pytest.mark.parametrize("transport", ["grpc", "stream"])
async def test_a_team_a_token_cannot_touch_team_b(bus, transport):
    host, d = bus
    before = await state(host, d)
    target = host.server.stream_address if transport == "stream" else host.address
    async with oribus.connect(target, agent="a1", token=mint(d, "a1", "team-a"), transport=transport) as a:
        assert (await a.get("team/a/x")).value == "a0"  # its own prefix works
        attempts = {
            "read": lambda: a.get("team/b/x"),
            "write": lambda: a.put("team/b/x", "evil"),
            "history": lambda: a.history("team/b/x"),
            "rollback": lambda: a.rollback({"team/b/x": 1}),
        }
        for op, attempt in attempts.items():
            with pytest.raises(PermissionDenied) as e:
                await attempt()
            assert "team/b/x" in e.value.message, op
            assert e.value.details["agent"] == "a1"
        with pytest.raises(PermissionDenied):
            async with a.watch("team/b/") as changes:
                await asyncio.wait_for(changes.__anext__(), 5)
        with pytest.raises(PermissionDenied):  # a watch on a prefix wider than its grant
            async with a.watch("team/") as changes:
                await asyncio.wait_for(changes.__anext__(), 5)
        # a commit with one forbidden key is refused whole
        with pytest.raises(PermissionDenied):
            await a.commit({"team/a/x": "half", "team/b/x": "half"})
    assert await state(host, d) == before


@pytest.mark.parametrize("transport", ["grpc", "stream"])
async def test_missing_and_refused_tokens(bus, transport):
    host, d = bus
    target = host.server.stream_address if transport == "stream" else host.address
    async with oribus.connect(target, agent="a1", transport=transport, token="") as anon:
        with pytest.raises(Unauthenticated) as e:
            await anon.get("team/a/x")
        assert e.value.reason == "missing"
    kid, key = load_signing_key(d)
    expired = issue(key, kid, agent="a1", roles=["team-a"], now=time.time() - 7200, ttl=60)
    async with oribus.connect(target, agent="a1", transport=transport, token=expired) as old:
        with pytest.raises(Unauthenticated) as e:
            await old.get("team/a/x")
        assert e.value.reason == "expired"


async def test_the_agent_named_must_be_the_token_s(bus):
    host, d = bus
    async with oribus.connect(host.address, agent="a2", token=mint(d, "a1", "team-a")) as liar:
        with pytest.raises(PermissionDenied, match="may not act for agent 'a2'"):
            await liar.get("team/a/x")
        with pytest.raises(PermissionDenied):
            await liar.put("team/a/x", "as a2")
    assert (await state(host, d))["team/a/x"] == ("a0", 1)


async def test_a_session_belongs_to_the_identity_that_used_it_first(bus):
    host, d = bus
    boss = mint(d, "boss", "boss")
    async with oribus.connect(host.address, agent="a1", session_id="s", token=mint(d, "a1", "team-a")) as a1:
        await a1.get("team/a/x")
        # the orchestrator may act for a1, but not in the session a1 opened
        async with oribus.connect(host.address, agent="a1", session_id="s", token=boss) as intruder:
            for attempt in (lambda: intruder.put("team/a/x", "boss"), intruder.reset_session,
                            lambda: intruder.forget(["team/a/x"])):
                with pytest.raises(PermissionDenied, match="belongs to a1"):
                    await attempt()
        # a session it opens for a1 is its own: a1 cannot use that one
        async with oribus.connect(host.address, agent="a1", session_id="by-boss", token=boss) as b:
            await b.put("team/a/x", "boss")
        async with oribus.connect(host.address, agent="a1", session_id="by-boss",
                                  token=mint(d, "a1", "team-a")) as a1_there:
            with pytest.raises(PermissionDenied, match="belongs to boss"):
                await a1_there.get("team/a/x")
        await a1.get("team/a/x")  # its own session still works
        await a1.put("team/a/x", "a1 again")


async def test_http_bearer_401_403_and_unchanged_state(bus):
    host, d = bus
    before = await state(host, d)
    a1 = {"Authorization": f"Bearer {mint(d, 'a1', 'team-a')}"}
    async with aiohttp.ClientSession(f"http://{host.gateway.address}") as http:
        st, out = await call(http, "GET", "/v1/keys/team/a/x", params={"agent": "a1"})
        assert st == 401 and out["code"] == "Unauthenticated" and out["details"]["reason"] == "missing"
        async with http.get("/v1/keys/team/a/x", params={"agent": "a1"}) as r:
            assert r.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
        st, out = await call(http, "GET", "/v1/keys/team/a/x", params={"agent": "a1"},
                             headers={"Authorization": "Bearer nonsense"})
        assert st == 401 and out["details"]["reason"] == "malformed"
        st, out = await call(http, "GET", "/v1/keys/team/a/x", params={"agent": "a1"}, headers=a1)
        assert st == 200 and out["value"] == "a0"
        for method, path, kw in [
            ("GET", "/v1/keys/team/b/x", {"params": {"agent": "a1"}}),
            ("POST", "/v1/get", {"json": {"agent": "a1", "keys": ["team/a/x", "team/b/x"]}}),
            ("POST", "/v1/commit", {"json": {"agent": "a1", "writes": {"team/a/x": 1, "team/b/x": 1}}}),
            ("POST", "/v1/rollback", {"json": {"agent": "a1", "versions": {"team/b/x": 1}}}),
            ("GET", "/v1/history/team/b/x", {}),
            ("GET", "/v1/watch", {"params": {"prefix": "team/b/"}}),
            ("POST", "/v1/reset", {"json": {"agent": "a2"}}),
            ("GET", "/shard/team/b/x", {"params": {"agent_id": "a1"}}),  # S-Bus: admin only under --auth
            ("POST", "/dashboard/rollback", {"json": {"key": "team/a/x", "version": 1}}),
        ]:
            st, out = await call(http, method, path, headers=a1, **kw)
            assert st == 403 and out["code"] == "PermissionDenied", (path, st, out)
        # the list of sessions: a1 sees its own, admin sees all
        ops = {"Authorization": f"Bearer {mint(d, 'ops', 'ops')}"}
        st, out = await call(http, "GET", "/v1/sessions", headers=a1)
        assert st == 200 and {s["agent"] for s in out["sessions"]} == {"a1"}
        st, out = await call(http, "GET", "/v1/sessions", headers=ops)
        assert st == 200 and {"a1", "ops"} <= {s["agent"] for s in out["sessions"]}
        st, metrics = await call(http, "GET", "/metrics")
        assert st == 200 and 'oribus_auth_refused_total{reason="denied",operation="commit"}' in metrics
        assert (await call(http, "GET", "/healthz"))[0] == 200  # public
    assert await state(host, d) == before


async def test_a_refused_read_leaves_no_delivery(bus):
    host, d = bus
    ops = mint(d, "ops", "ops")
    async with oribus.connect(host.address, agent="a1", session_id="r", token=mint(d, "a1", "team-a")) as a1:
        with pytest.raises(PermissionDenied):
            await a1.get_many(["team/a/x", "team/b/x"])
    async with aiohttp.ClientSession(f"http://{host.gateway.address}") as http:
        st, out = await call(http, "GET", "/v1/sessions", headers={"Authorization": f"Bearer {ops}"})
    assert st == 200
    assert not [s for s in out["sessions"] if (s["agent"], s["session"]) == ("a1", "r") and s["reads"]]


async def test_a_session_s_owner_is_one_record_across_transports(bus):
    """Claimed over the SDK, refused over HTTP to another identity that may act for the agent
    (the gRPC server and the gateway share one guard)."""
    host, d = bus
    async with oribus.connect(host.address, agent="a1", session_id="x-t", token=mint(d, "a1", "team-a")) as a1:
        await a1.get("team/a/x")
    boss = {"Authorization": f"Bearer {mint(d, 'boss', 'boss')}"}
    async with aiohttp.ClientSession(f"http://{host.gateway.address}") as http:
        st, out = await call(http, "POST", "/v1/commit", headers=boss,
                             json={"agent": "a1", "session": "x-t", "writes": {"team/a/x": "boss"}})
        assert st == 403 and "belongs to a1" in out["message"], out
        st, out = await call(http, "POST", "/v1/commit", headers=boss,
                             json={"agent": "a1", "session": "boss-own", "writes": {"team/a/x": "boss"}})
        assert st == 200, out
    async with oribus.connect(host.address, agent="a1", session_id="boss-own", token=mint(d, "a1", "team-a")) as a1:
        with pytest.raises(PermissionDenied, match="belongs to boss"):
            await a1.get("team/a/x")


async def test_sessions_and_the_dashboard_show_a_non_admin_only_what_it_may_read(bus):
    """/v1/sessions and the dashboard's feed (specs/auth.md §5): an identity without the admin
    grant sees the sessions it owns — not one opened in its agent's name by another identity
    — and of their reads and of the hot keys only the keys it may read; admin sees all."""
    host, d = bus
    a1_token, boss, ops = mint(d, "a1", "team-a"), mint(d, "boss", "boss"), mint(d, "ops", "ops")
    async with oribus.connect(host.address, agent="a1", session_id="mine", token=a1_token) as a1:
        await a1.put("team/a/y", "y0")
        await a1.get_many(["team/a/x", "team/a/y"])
    async with oribus.connect(host.address, agent="a1", session_id="boss-run", token=boss) as as_a1:
        await as_a1.get_many(["team/a/x", "team/b/x"])  # a1's name, boss's session
    for i in range(3):  # sessions more recent than a1's: a listing of one must still find a1's
        async with oribus.connect(host.address, agent="ops", session_id=f"o{i}", token=ops) as o:
            await o.get_many(["team/a/x", "team/b/x"])
    a1_h, ops_h = {"Authorization": f"Bearer {a1_token}"}, {"Authorization": f"Bearer {ops}"}

    def listed(sessions: list[dict]) -> dict[tuple[str, str], list[str]]:
        return {(s["agent"], s["session"]): [r["key"] for r in s["reads"]] for s in sessions}

    async with aiohttp.ClientSession(f"http://{host.gateway.address}") as http:
        st, out = await call(http, "GET", "/v1/sessions", headers=a1_h)
        assert st == 200 and listed(out["sessions"]) == {("a1", "mine"): ["team/a/x", "team/a/y"]}
        st, out = await call(http, "GET", "/v1/sessions", params={"limit": "1"}, headers=a1_h)
        assert st == 200 and list(listed(out["sessions"])) == [("a1", "mine")]
        st, out = await call(http, "GET", "/v1/sessions", headers=ops_h)
        assert listed(out["sessions"])[("a1", "boss-run")] == ["team/a/x", "team/b/x"]

        async def feed(headers: dict) -> dict:
            st, out = await call(http, "GET", "/dashboard/state", headers=headers)
            assert st == 200, out
            return out

        deadline = time.monotonic() + 10  # the hot keys come from a watch the first request starts
        while {"team/a/x", "team/b/x"} - {k["key"] for k in (await feed(ops_h))["hot_keys"]["keys"]}:
            assert time.monotonic() < deadline, "the hot-key watch saw no write"
            await asyncio.sleep(0.1)
        mine = await feed(a1_h)
        assert mine["everything"] is False and mine["admin"] is False and mine["sessions_error"] is None
        assert listed(mine["sessions"]) == {("a1", "mine"): ["team/a/x", "team/a/y"]}
        assert {k["key"] for k in mine["hot_keys"]["keys"]} == {"team/a/x", "team/a/y"}
        everything = await feed(ops_h)
        assert everything["everything"] is True
        assert {("a1", "mine"), ("a1", "boss-run"), ("ops", "o0")} <= set(listed(everything["sessions"]))

        # a key a1 may no longer read leaves its own session's listing (the policy followed within a second)
        d.policy.write_text(POLICY.replace('read: ["team/a/*"]', 'read: ["team/a/x"]'))
        deadline = time.monotonic() + 10
        while True:
            st, out = await call(http, "GET", "/v1/sessions", headers=a1_h)
            if listed(out["sessions"]) == {("a1", "mine"): ["team/a/x"]}:
                break
            assert time.monotonic() < deadline, out
            await asyncio.sleep(0.2)
        assert {k["key"] for k in (await feed(a1_h))["hot_keys"]["keys"]} == {"team/a/x"}
        assert (await call(http, "GET", "/dashboard/state"))[0] == 401  # still no anonymous feed


async def test_a_claim_is_the_owner_s_only_once_journaled(bus, monkeypatch):
    """The first identity to use a session owns it at once for everyone else (another
    identity's call is refused while the record is being written), its own other calls wait
    for the record, and a claim that could not be journaled is no claim."""
    host, d = bus
    guard = host.server.served
    journal = guard.journal
    assert journal is not None
    gate = asyncio.Event()
    own_by = journal.own_by
    writes: list[tuple] = []

    async def slow_own_by(session, identity):
        writes.append((tuple(session), identity))
        await gate.wait()
        await own_by(session, identity)

    monkeypatch.setattr(journal, "own_by", slow_own_by)
    boss, a1_token = mint(d, "boss", "boss"), mint(d, "a1", "team-a")
    async with (oribus.connect(host.address, agent="a1", session_id="race", token=boss) as by_boss,
                oribus.connect(host.address, agent="a1", session_id="race", token=a1_token) as a1):
        first = asyncio.create_task(by_boss.get("team/a/x"))
        while not writes:
            await asyncio.sleep(0.01)
        with pytest.raises(PermissionDenied, match="belongs to boss"):  # claimed, though not yet durable
            await a1.get("team/a/x")
        second = asyncio.create_task(by_boss.get("team/a/x"))
        await asyncio.sleep(0.2)
        assert not first.done() and not second.done()  # both wait for the record
        gate.set()
        assert (await first).value == "a0" and (await second).value == "a0"
    assert journal.identities[("a1", "race")] == "boss"

    async def failing_own_by(session, identity):
        raise OSError("disk full")

    monkeypatch.setattr(journal, "own_by", failing_own_by)
    async with oribus.connect(host.address, agent="a1", session_id="lost", token=boss) as by_boss:
        with pytest.raises(oribus.OribusError):
            await by_boss.get("team/a/x")
    monkeypatch.setattr(journal, "own_by", own_by)
    async with oribus.connect(host.address, agent="a1", session_id="lost", token=a1_token) as a1:
        assert (await a1.get("team/a/x")).value == "a0"  # nobody owned it: a1 may claim it
    assert journal.identities[("a1", "lost")] == "a1"
