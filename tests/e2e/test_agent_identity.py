"""Agents prove who they are, over real processes (issue 16, specs/auth.md §7).

One ``oribus up --processes --auth D`` (a bus process and two shard processes) on free
ports in a temporary directory, its tokens issued by the ``oribus auth`` command line:

* for each transport (the SDK over gRPC, over the stream transport, HTTP ``/v1``, the CLI)
  and each operation, an agent whose token grants ``team/a/*`` cannot read, write, watch,
  see the history of or roll back ``team/b/x``, and the state is unchanged;
* forged, expired, revoked, wrong-key and ``alg``-swapped tokens are refused;
* a token for agent A cannot commit in, reset or forget from B's session;
* rotation keeps old tokens valid until their key is retired; revocation and a policy edit
  apply without a restart;
* every refusal is in the bus's log (agent, operation, key, rule) and in /metrics;
* a bus without ``--auth`` on a non-loopback address says so at start-up.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from processes import Cluster, ServerProcess, free_port, run_cli, up

import oribus
from oribus.errors import PermissionDenied, Unauthenticated

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
"""


def cli(*args: str) -> str:
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def token(auth: Path, agent: str, role: str, ttl: str = "1h") -> str:
    return cli("auth", "token", "--dir", str(auth), "--agent", agent, "--role", role, "--ttl", ttl)


def jti(tok: str) -> str:
    return jwt.decode(tok, options={"verify_signature": False})["jti"]


class Bus:
    def __init__(self, server: ServerProcess, auth: Path) -> None:
        self.server = server
        self.auth = auth
        self.ops = token(auth, "ops", "ops")

    def state(self) -> dict:
        with oribus.Client(self.server.address, agent="ops", token=self.ops) as c:
            got = c.get_many(["team/a/x", "team/b/x"])
            return {k: (v.value, v.version) for k, v in got.items()}

    def http(self, method: str, path: str, tok: str | None, body: dict | None = None) -> tuple[int, dict | str]:
        req = urllib.request.Request(f"http://{self.server.http_address}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {tok}"} if tok else {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        return status, json.loads(raw) if raw[:1] == b"{" else raw.decode()


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    tmp = tmp_path_factory.mktemp("auth")
    auth = tmp / "auth"
    cli("auth", "init", "--dir", str(auth))
    (auth / "policy.yaml").write_text(POLICY)
    cluster = Cluster()
    server = cluster.add(up(tmp, tmp / "data", processes=True, shards=2))
    server.args += ["--auth", str(auth)]
    try:
        server.start().wait_serving()
        b = Bus(server, auth)
        with oribus.Client(server.address, agent="ops", token=b.ops) as c:
            c.commit({"team/a/x": "a0", "team/b/x": "b0"})
        yield b
    finally:
        cluster.stop()


def eventually(check, timeout: float = 10.0) -> None:
    """``check()`` passes within ``timeout`` seconds (the bus looks at its directory once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ---- every transport x every operation ------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "auto"])
def test_sdk_team_a_cannot_touch_team_b(bus, transport):
    before = bus.state()
    tok = token(bus.auth, "a1", "team-a")
    with oribus.Client(bus.server.address, agent="a1", token=tok, transport=transport) as a:
        assert a.get("team/a/x").value == "a0"
        attempts = {
            "read": lambda: a.get("team/b/x"),
            "write": lambda: a.put("team/b/x", "evil"),
            "commit with one forbidden key": lambda: a.commit({"team/a/x": "half", "team/b/x": "half"}),
            "history": lambda: a.history("team/b/x"),
            "rollback": lambda: a.rollback({"team/b/x": 1}),
            "watch": lambda: a.watch("team/b/"),
            "watch wider than the grant": lambda: a.watch("team/"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(PermissionDenied) as e:
                attempt()
            # the message names the agent and the key (a gRPC watch's error carries no details)
            assert e.value.message.startswith("a1 may not ") and "'team/" in e.value.message, what
        if transport == "auto":
            assert a._inner._bus.using == "stream"  # noqa: SLF001 - the stream transport was the one tried
    assert bus.state() == before
    log = bus.server.log_path.read_text()
    assert "auth refused agent=a1 op=read key=team/b/x rule=no role of [team-a] grants read on 'team/b/x'" in log


def test_http_team_a_cannot_touch_team_b(bus):
    before = bus.state()
    tok = token(bus.auth, "a1", "team-a")
    assert bus.http("GET", "/v1/keys/team/a/x?agent=a1", tok)[0] == 200
    for method, path, body in [
        ("GET", "/v1/keys/team/b/x?agent=a1", None),
        ("POST", "/v1/get", {"agent": "a1", "keys": ["team/b/x"]}),
        ("POST", "/v1/commit", {"agent": "a1", "writes": {"team/b/x": "evil"}}),
        ("POST", "/v1/commit", {"agent": "a1", "writes": {"team/a/x": "half", "team/b/x": "half"}}),
        ("GET", "/v1/history/team/b/x", None),
        ("POST", "/v1/rollback", {"agent": "a1", "versions": {"team/b/x": 1}}),
        ("GET", "/v1/watch?prefix=team/b/", None),
        ("POST", "/commit", {"key": "team/b/x", "delta": "evil", "agent_id": "a1", "read_set": []}),  # S-Bus
    ]:
        status, out = bus.http(method, path, tok, body)
        assert status == 403 and out["code"] == "PermissionDenied", (method, path, status, out)
    assert bus.state() == before
    status, metrics = bus.http("GET", "/metrics", None)
    assert status == 200 and 'oribus_auth_refused_total{reason="denied",operation="commit"}' in metrics


def test_cli_token_and_refusals(bus):
    tok = token(bus.auth, "a1", "team-a")
    base = ("--addr", bus.server.address, "--agent", "a1", "--token", tok)
    assert json.loads(cli("get", "team/a/x", *base))["value"] == "a0"
    for args in (("get", "team/b/x"), ("put", "team/b/x", '"evil"'), ("history", "team/b/x"),
                 ("rollback", "team/b/x", "1"), ("watch", "team/b/", "--count", "1")):
        done = run_cli(*args, *base)
        assert done.returncode == 1 and json.loads(done.stderr)["error"] == "PermissionDenied", (args, done.stderr)
    done = run_cli("get", "team/a/x", "--addr", bus.server.address, "--agent", "a1")
    assert done.returncode == 1 and json.loads(done.stderr)["error"] == "Unauthenticated"
    assert bus.state()["team/b/x"] == ("b0", 1)


# ---- tokens the bus refuses -----------------------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_forged_expired_wrong_key_and_alg_swapped_tokens_are_refused(bus, tmp_path):
    good = token(bus.auth, "a1", "team-a")
    head, body, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["roles"] = ["ops"]  # the agent promotes itself
    forged = f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
    cli("auth", "init", "--dir", str(tmp_path / "other"))
    (tmp_path / "other" / "policy.yaml").write_text(POLICY)
    wrong_key = token(tmp_path / "other", "a1", "ops")
    kid = jwt.get_unverified_header(good)["kid"]
    unsigned = f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT', 'kid': kid}).encode())}.{b64(json.dumps(claims).encode())}."
    expired = token(bus.auth, "a1", "team-a", ttl="1s")
    time.sleep(32)  # past the expiry and its 30 s leeway
    cases = {"forged": (forged, "signature"), "wrong key": (wrong_key, "unknown_key"),
             "alg none": (unsigned, "algorithm"), "expired": (expired, "expired")}
    for what, (tok, reason) in cases.items():
        with oribus.Client(bus.server.address, agent="a1", token=tok) as c, pytest.raises(Unauthenticated) as e:
            c.put("team/a/x", what)
        assert e.value.details.get("reason") == reason or reason in e.value.message, (what, e.value)
        status, out = bus.http("POST", "/v1/commit", tok, {"agent": "a1", "writes": {"team/a/x": what}})
        assert status == 401 and out["details"]["reason"] == reason, (what, out)
    assert bus.state()["team/a/x"] == ("a0", 1)


def test_a_token_for_a_cannot_use_b_s_session(bus):
    b_tok, a_tok = token(bus.auth, "b1", "team-a"), token(bus.auth, "a1", "team-a")
    with oribus.Client(bus.server.address, agent="b1", session_id="work", token=b_tok) as b:
        b.get("team/a/x")
    with oribus.Client(bus.server.address, agent="b1", session_id="work", token=a_tok) as a_as_b:
        for attempt in (lambda: a_as_b.put("team/a/x", "as b1"), a_as_b.reset_session,
                        lambda: a_as_b.forget(["team/a/x"])):
            with pytest.raises(PermissionDenied, match="may not act for agent 'b1'"):
                attempt()
    for path, body in (("/v1/commit", {"agent": "b1", "session": "work", "writes": {"team/a/x": "as b1"}}),
                       ("/v1/reset", {"agent": "b1", "session": "work"}),
                       ("/v1/forget", {"agent": "b1", "session": "work", "keys": ["team/a/x"]})):
        status, out = bus.http("POST", path, a_tok, body)
        assert status == 403 and out["code"] == "PermissionDenied", (path, out)
    assert bus.state()["team/a/x"] == ("a0", 1)


# ---- the directory followed without a restart -------------------------------------------------------


def can_read(bus: Bus, tok: str) -> bool:
    try:
        with oribus.Client(bus.server.address, agent="a1", token=tok, transport="grpc") as c:
            c.get("team/a/x")
        return True
    except Unauthenticated:
        return False


def test_revocation_applies_without_restart(bus):
    tok = token(bus.auth, "a1", "team-a")
    assert can_read(bus, tok)
    cli("auth", "revoke", "--dir", str(bus.auth), jti(tok))

    def refused() -> None:
        assert not can_read(bus, tok)

    eventually(refused)
    assert bus.http("GET", "/v1/keys/team/a/x?agent=a1", tok)[0] == 401
    assert can_read(bus, token(bus.auth, "a1", "team-a"))


def test_rotation_keeps_old_tokens_until_their_key_is_retired(bus):
    old = token(bus.auth, "a1", "team-a")
    rotated = json.loads(cli("auth", "rotate", "--dir", str(bus.auth)))
    new = token(bus.auth, "a1", "team-a")
    assert jwt.get_unverified_header(new)["kid"] == rotated["kid"] != rotated["previous"]

    def both_valid() -> None:
        assert can_read(bus, old) and can_read(bus, new)

    eventually(both_valid)
    time.sleep(1.5)  # the bus has looked at the directory again since the rotation
    both_valid()
    cli("auth", "retire", "--dir", str(bus.auth), rotated["previous"])

    def old_refused() -> None:
        assert not can_read(bus, old)

    eventually(old_refused)
    assert can_read(bus, new)
    # the ops token of the fixture was signed by the retired key: issue the fixture a new one
    bus.ops = token(bus.auth, "ops", "ops")


def test_a_policy_edit_applies_without_restart_and_a_broken_one_is_ignored(bus):
    tok = token(bus.auth, "a1", "team-a")
    policy = bus.auth / "policy.yaml"
    try:
        policy.write_text(POLICY.replace('read: ["team/a/*"]', 'read: ["team/a/*", "team/b/*"]', 1))

        def b_readable() -> None:
            with oribus.Client(bus.server.address, agent="a1", token=tok) as c:
                try:
                    item = c.get("team/b/x")
                except oribus.PermissionDenied as e:  # the edit not seen yet: eventually() tries again
                    raise AssertionError(str(e)) from e
                assert item.value == "b0"

        eventually(b_readable)
        policy.write_text("roles: [not, a, map]\n")
        time.sleep(2.5)
        b_readable()  # the previous rules stay
        assert "auth: policy not reloaded" in bus.server.log_path.read_text()
    finally:
        policy.write_text(POLICY)


# ---- start-up -----------------------------------------------------------------------------------------------


def test_a_bus_without_auth_on_a_non_loopback_address_warns(tmp_path):
    cluster = Cluster()
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False, shards=1))
    port = free_port()
    server.args[server.args.index("--listen") + 1] = f"0.0.0.0:{port}"
    server.address = f"127.0.0.1:{port}"
    try:
        server.start().wait_serving()
        log = server.log_path.read_text()
        assert "NO AUTHENTICATION: 0.0.0.0:" in log and "--auth" in log
        assert f"127.0.0.1:{server.http_address.rpartition(':')[2]}" not in log.split("NO AUTHENTICATION")[1].split("\n")[0]
    finally:
        cluster.stop()


def test_a_bus_with_an_unusable_auth_directory_does_not_start(tmp_path):
    (tmp_path / "auth").mkdir()
    done = run_cli("up", "--data-dir", str(tmp_path / "data"), "--listen", f"127.0.0.1:{free_port()}",
                   "--no-http", "--auth", str(tmp_path / "auth"), timeout=60)
    assert done.returncode == 1 and "verification keys" in done.stderr


# ---- the checker's workloads with auth on -------------------------------------------------------------------


def test_verify_with_auth_finds_no_anomaly(bus, tmp_path):
    """``oribus verify --token`` (SDK and HTTP clients, each its own agent, acted for by one
    orchestrator token): 0 anomalies; without the token every client is refused."""
    tok = cli("auth", "token", "--dir", str(bus.auth), "--agent", "verifier", "--role", "ops", "--act-for", "*")
    common = ("--addr", bus.server.address, "--http", f"http://{bus.server.http_address}", "--duration", "5s",
              "--clients", "4", "--seed", "7")
    done = run_cli("verify", *common, "--token", tok, "--out", str(tmp_path / "with"), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "with" / "report.json").read_text())
    assert report["ok"] and report["anomalies"] == [], report["by_kind"]
    assert sum(p["ok"] for p in report["series"]) > 0  # transactions committed, not all refused
    refused = run_cli("verify", *common, "--out", str(tmp_path / "without"), timeout=180)
    assert refused.returncode != 0 and "credential refused (missing)" in refused.stderr
