"""S-Bus compatibility: the S-Bus routes driven exactly as an S-Bus client drives them.

A plain synchronous HTTP client (``http.client``, one keep-alive connection per
thread, like the ``requests`` sessions of S-Bus harnesses) talks to a real
``oribus up`` process — in-process shards and ``up --processes`` — and checks
statuses, bodies and version numbering (S-Bus numbers a key from 0; oribus's
``/v1/history`` shows the same version + 1).

The flows: create, tracked GETs, commit v1/v2 with and without ``read_set``,
the full ORI rule (logged and explicit entries both checked, an agent's own
write never stale to it, write skew refused), rollback, session reset,
``/delivery_log/register``, ``/stats``, admin routes (403 without ``--admin``).

The concurrency test runs the S-Bus agent loop (GET 2-3 keys, commit one of
them with the version it read) on 8 threads while an injector commits to
random keys (S-Bus's StaleInjector), records every request with its
client-side send/receive times, and audits the outcome against the final
per-key histories with an independent checker (``audit``): it builds the
graph of every accepted commit (version order per key, read-from, "read
before overwritten" and real-time order) and reports any accepted commit that
lies on a cycle through one of its reads — i.e. a commit accepted although a
key it had read had already changed. Every HTTP request is counted; the
totals are printed at the end of the concurrency test and of the module.
"""

from __future__ import annotations

import bisect
import hashlib
import http.client
import itertools
import json
import random
import socket
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import _live, keys_on_shard
from processes import Cluster, up

SHARD_FIELDS = {
    "key", "id", "version", "content", "owner", "goal_tag", "attempt_count",
    "conflict_count", "delta_log_depth", "created_at", "updated_at",
}
STALE_CODES = ("VersionMismatch", "CrossShardStale")  # a refusal because something read had changed
COMMIT_PATHS = ("/commit", "/commit/v2", "/rollback")

_names = itertools.count()


# ---- the counting S-Bus client -------------------------------------------------------------


class Tally:
    """Every request this module sends, and what the commits it sent were told."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.statuses: Counter[int] = Counter()
        self.refusals: Counter[str] = Counter()  # commit refusals by error code
        self.accepted_commits = 0
        self.audited_commits = 0
        self.stale_accepted = 0
        self.concurrency_runs = 0

    def count(self, method: str, path: str, status: int, body: Any) -> None:
        with self._lock:
            self.requests += 1
            self.statuses[status] += 1
            if method == "POST" and path in COMMIT_PATHS:
                if status == 200:
                    self.accepted_commits += 1
                elif isinstance(body, dict) and "error" in body:
                    self.refusals[body["error"]] += 1

    @property
    def stale_rejected(self) -> int:
        return sum(self.refusals[c] for c in STALE_CODES)

    def summary(self) -> str:
        return (
            f"S-Bus compat: {self.requests} requests, {self.stale_rejected} stale commits rejected "
            f"({', '.join(f'{c} {self.refusals[c]}' for c in STALE_CODES)}; "
            f"TokenConflict {self.refusals['TokenConflict']}), {self.stale_accepted} accepted "
            f"(audited {self.audited_commits} accepted commits in {self.concurrency_runs} concurrency runs)"
        )


TALLY = Tally()


@dataclass
class Reply:
    status: int
    body: Any
    sent: float  # time.monotonic() just before the request was sent
    received: float  # ... and just after the whole response was read


class SbusHttp:
    """A synchronous S-Bus client: one keep-alive connection per thread, every request counted."""

    def __init__(self, address: str, tally: Tally = TALLY) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.tally = tally
        self._local = threading.local()

    def request(self, method: str, path: str, body: Any = None) -> Reply:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        sent = time.monotonic()
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except Exception:
            conn.close()
            self._local.conn = None
            raise  # never retried: a commit sent twice would corrupt the audit
        received = time.monotonic()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        route = path.split("?", 1)[0]
        self.tally.count(method, route, response.status, parsed)
        return Reply(response.status, parsed, sent, received)

    # S-Bus calls, as a harness makes them

    def create(self, key: str, content: str, goal_tag: str = "") -> Reply:
        return self.request("POST", "/shard", {"key": key, "content": content, "goal_tag": goal_tag})

    def get(self, key: str, agent: str | None = None) -> Reply:
        query = f"?agent_id={urllib.parse.quote(agent)}" if agent else ""
        return self.request("GET", f"/shard/{urllib.parse.quote(key)}{query}")

    def commit(self, key: str, expected: int, delta: str, agent: str,
               read_set: list[dict] | None = None, v2: bool = True, aliases: bool = False,
               rationale: str | None = None) -> Reply:
        body: dict[str, Any] = {"key": key, "agent_id": agent}
        body.update({"expected_ver": expected, "content": delta} if aliases
                    else {"expected_version": expected, "delta": delta})
        if read_set is not None:
            body["read_set"] = read_set
        if rationale is not None:
            body["rationale"] = rationale
        return self.request("POST", "/commit/v2" if v2 else "/commit", body)

    def rollback(self, key: str, target: int, agent: str) -> Reply:
        return self.request("POST", "/rollback", {"key": key, "target_version": target, "agent_id": agent})

    def session(self, agent: str) -> Reply:
        return self.request("POST", "/session", {"agent_id": agent})

    def register(self, agent: str, keys: list[str]) -> Reply:
        return self.request("POST", "/delivery_log/register", {"agent_id": agent, "shards_used": keys})

    def stats(self) -> dict:
        r = self.request("GET", "/stats")
        assert r.status == 200, r.body
        return r.body

    def history(self, key: str) -> list[dict]:
        """The key's versions in oribus numbering (S-Bus version + 1), oldest first."""
        r = self.request("GET", f"/v1/history/{urllib.parse.quote(key)}")
        assert r.status == 200, r.body
        return list(reversed(r.body["versions"]))

    def version(self, key: str) -> int:
        r = self.get(key)  # no agent_id: a peek, nothing recorded
        assert r.status == 200, r.body
        return r.body["version"]


def ok(reply: Reply, status: int = 200) -> Any:
    assert reply.status == status, reply.body
    return reply.body


def refused(reply: Reply, status: int, code: str) -> dict:
    assert reply.status == status, reply.body
    assert isinstance(reply.body, dict) and reply.body.get("error") == code, reply.body
    assert isinstance(reply.body.get("detail"), str) and reply.body["detail"], reply.body
    return reply.body


# ---- fixtures ------------------------------------------------------------------------------


def _print_past_capture(config: pytest.Config, text: str) -> None:
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(text)
        return
    with capman.global_and_fixture_disabled():
        print(f"\n{text}")


@pytest.fixture(scope="module", autouse=True)
def tally(request: pytest.FixtureRequest):
    yield TALLY
    _print_past_capture(request.config, TALLY.summary())


@pytest.fixture(scope="module", params=["up", "up --processes"])
def server(request: pytest.FixtureRequest):
    return request.getfixturevalue("up_processes" if request.param == "up --processes" else "up_embedded")


@pytest.fixture
def sbus(server) -> SbusHttp:
    assert server.http_address is not None
    return SbusHttp(server.http_address)


def _admin_server(tmp_path_factory: pytest.TempPathFactory, processes: bool):
    root = tmp_path_factory.mktemp("up-admin")
    c = Cluster()
    server = c.add(up(root, root / "data", processes=processes, admin=True, name="up-admin"))
    _live.append(c)
    try:
        server.start().wait_serving()
        yield SbusHttp(server.http_address)
    finally:
        _live.remove(c)
        c.stop()


@pytest.fixture(scope="module")
def admin_sbus(tmp_path_factory: pytest.TempPathFactory):
    """``oribus up --admin`` (in-process shards), for the admin routes."""
    yield from _admin_server(tmp_path_factory, processes=False)


@pytest.fixture(scope="module")
def admin_sbus_processes(tmp_path_factory: pytest.TempPathFactory):
    """``oribus up --admin --processes``."""
    yield from _admin_server(tmp_path_factory, processes=True)


@pytest.fixture(params=["up", "up --processes"])
def any_admin_sbus(request: pytest.FixtureRequest) -> SbusHttp:
    return request.getfixturevalue("admin_sbus_processes" if request.param == "up --processes" else "admin_sbus")


def two_shard_keys(name: str, sbus: SbusHttp, content: str = "c0") -> tuple[str, str]:
    """A key on shard 0 and one on shard 1 (two processes under ``--processes``), created."""
    prefix = f"compat/{name}/{next(_names)}"
    x = keys_on_shard(0, f"{prefix}/x")[0]
    y = keys_on_shard(1, f"{prefix}/y")[0]
    for k in (x, y):
        ok(sbus.create(k, f"{content}:{k}"), 201)
    return x, y


# ---- create, GET, commit v1/v2, version numbering ------------------------------------------


def test_create_get_commit_and_version_numbering(sbus: SbusHttp):
    key = f"compat/basic/{next(_names)}"
    created = ok(sbus.create(key, "first draft", goal_tag="plan"), 201)
    assert SHARD_FIELDS <= created.keys()
    assert created["key"] == key and created["version"] == 0 and created["content"] == "first draft"
    assert created["goal_tag"] == "plan" and created["owner"] is None
    assert created["id"] == hashlib.sha256(b"first draft").hexdigest()
    assert (created["attempt_count"], created["conflict_count"], created["delta_log_depth"]) == (0, 0, 0)

    again = refused(sbus.create(key, "other"), 409, "ShardAlreadyExists")
    assert again["key"] == key
    assert ok(sbus.get(key))["content"] == "first draft"  # the refused create changed nothing

    got = ok(sbus.get(key, agent="writer"))
    assert {k: got[k] for k in ("key", "id", "version", "content", "goal_tag")} == {
        k: created[k] for k in ("key", "id", "version", "content", "goal_tag")
    }

    # v1 with the canonical field names, v2 with the aliases; +1 per commit
    c1 = ok(sbus.commit(key, 0, "second draft", "writer", v2=False, rationale="tighten"))
    assert c1 == {"new_version": 1, "shard_id": created["id"]}
    c2 = ok(sbus.commit(key, 1, "third draft", "writer", aliases=True))
    assert c2 == {"new_version": 2, "shard_id": created["id"]}

    now = ok(sbus.get(key, agent="writer"))
    assert (now["version"], now["content"], now["delta_log_depth"]) == (2, "third draft", 2)
    assert (now["attempt_count"], now["conflict_count"]) == (2, 0)
    assert now["created_at"] == created["created_at"] and now["updated_at"] >= now["created_at"]

    # a commit with an old expected_version: VersionMismatch, nothing written
    stale = refused(sbus.commit(key, 1, "lost update", "writer"), 409, "VersionMismatch")
    assert (stale["key"], stale["expected_version"], stale["current_version"]) == (key, 1, 2)
    after = ok(sbus.get(key))
    assert (after["version"], after["content"], after["conflict_count"]) == (2, "third draft", 1)

    # oribus numbering is S-Bus's + 1, and the history holds exactly the three commits
    assert [(h["version"], h["value"]) for h in sbus.history(key)] == [
        (1, "first draft"), (2, "second draft"), (3, "third draft"),
    ]
    listed = ok(sbus.request("GET", "/shards"))
    assert key in listed["shards"] and all(isinstance(k, str) for k in listed["shards"])  # keys, as S-Bus
    assert listed["count"] == len(listed["shards"])

    refused(sbus.get(f"{key}-missing", agent="writer"), 404, "ShardNotFound")
    missing = refused(sbus.commit(f"{key}-missing", 0, "x", "writer"), 404, "ShardNotFound")
    assert missing["key"] == f"{key}-missing"


# ---- the ORI rule ------------------------------------------------------------------------


def test_commit_refused_when_a_logged_read_changed(sbus: SbusHttp):
    """No read_set in the request: the server rebuilds it from the agent's GETs."""
    x, y = two_shard_keys("logged", sbus)
    agent, other = f"a{next(_names)}", f"b{next(_names)}"
    assert ok(sbus.get(x, agent))["version"] == 0
    assert ok(sbus.get(y, agent))["version"] == 0
    ok(sbus.commit(y, 0, "y by other", other))

    body = refused(sbus.commit(x, 0, "x from a stale y", agent), 409, "CrossShardStale")
    assert (body["key"], body["version_at_read"], body["current_version"]) == (y, 0, 1)
    assert [(s["key"], s["version_at_read"], s["current_version"]) for s in body["stale"]] == [(y, 0, 1)]
    assert sbus.version(x) == 0

    assert ok(sbus.get(y, agent))["version"] == 1  # re-read what the work depends on
    assert ok(sbus.commit(x, 0, "x from y@1", agent))["new_version"] == 1


def test_explicit_read_set_never_masks_a_stale_logged_read(sbus: SbusHttp):
    x, y = two_shard_keys("masking", sbus)
    agent, other, fresh = f"a{next(_names)}", f"b{next(_names)}", f"c{next(_names)}"
    ok(sbus.get(x, agent))
    ok(sbus.get(y, agent))
    ok(sbus.commit(y, 0, "y by other", other))

    # the agent claims it read y at the current version: its logged read (y@0) still counts
    body = refused(sbus.commit(x, 0, "masked", agent, read_set=[{"key": y, "version_at_read": 1}]),
                   409, "CrossShardStale")
    assert (body["key"], body["version_at_read"], body["current_version"]) == (y, 0, 1)
    assert sbus.version(x) == 0

    # an explicit entry is checked even for a key the agent never GET
    body = refused(sbus.commit(x, 0, "explicit stale", fresh, read_set=[{"key": y, "version_at_read": 0}]),
                   409, "CrossShardStale")
    assert (body["key"], body["version_at_read"], body["current_version"]) == (y, 0, 1)
    # one key listed at two versions: one of them is stale
    refused(sbus.commit(x, 0, "two versions", fresh, read_set=[
        {"key": y, "version_at_read": 0}, {"key": y, "version_at_read": 1}]), 409, "CrossShardStale")
    assert sbus.version(x) == 0

    # the control: current explicit entries pass
    assert ok(sbus.commit(x, 0, "explicit current", fresh,
                          read_set=[{"key": y, "version_at_read": 1}]))["new_version"] == 1


def test_own_commit_never_makes_the_next_commit_fail(sbus: SbusHttp):
    x, y = two_shard_keys("own", sbus)
    agent, bystander = f"a{next(_names)}", f"b{next(_names)}"
    ok(sbus.get(x, agent))
    ok(sbus.get(y, agent))
    ok(sbus.get(x, bystander))
    assert ok(sbus.commit(x, 0, "x1", agent))["new_version"] == 1
    assert ok(sbus.commit(y, 0, "y1", agent))["new_version"] == 1  # x@1 is its own write
    assert ok(sbus.commit(x, 1, "x2", agent))["new_version"] == 2
    # the control: for anyone else who read x@0, x did change
    body = refused(sbus.commit(y, 1, "y from x@0", bystander), 409, "CrossShardStale")
    assert (body["key"], body["version_at_read"], body["current_version"]) == (x, 0, 2)


def test_write_skew_is_refused_for_one_of_the_two_agents(sbus: SbusHttp):
    x, y = two_shard_keys("skew", sbus)
    a, b = f"a{next(_names)}", f"b{next(_names)}"
    for agent in (a, b):
        ok(sbus.get(x, agent))
        ok(sbus.get(y, agent))
    ok(sbus.commit(x, 0, "x by a", a))
    body = refused(sbus.commit(y, 0, "y by b", b), 409, "CrossShardStale")
    assert (body["key"], body["version_at_read"], body["current_version"]) == (x, 0, 1)
    assert (sbus.version(x), sbus.version(y)) == (1, 0)


def test_concurrent_write_skew_never_commits_both(sbus: SbusHttp):
    """A reads x and y and writes x; B reads both and writes y; both commits race."""
    rounds, both, accepted = 12, [], 0
    for r in range(rounds):
        x, y = two_shard_keys("skew-race", sbus)
        a, b = f"a{next(_names)}", f"b{next(_names)}"
        for agent in (a, b):
            ok(sbus.get(x, agent))
            ok(sbus.get(y, agent))
        barrier = threading.Barrier(2)
        replies: dict[str, Reply] = {}

        def run(agent: str, key: str, barrier: threading.Barrier, replies: dict[str, Reply]) -> None:
            barrier.wait()
            replies[agent] = sbus.commit(key, 0, f"{agent} writes {key}", agent)

        threads = [threading.Thread(target=run, args=(agent, key, barrier, replies))
                   for agent, key in ((a, x), (b, y))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(replies) == 2, "a commit did not answer"
        for reply in replies.values():
            assert reply.status in (200, 409), reply.body
        ok_count = sum(reply.status == 200 for reply in replies.values())
        accepted += ok_count
        if ok_count == 2:
            both.append(r)
        assert sbus.version(x) + sbus.version(y) == ok_count  # refused commits left no trace
    assert both == [], f"write skew committed both sides in rounds {both}"
    assert accepted > 0, "no round committed anything: the test would not see write skew"


# ---- rollback, session reset, register ---------------------------------------------------------


def test_rollback(sbus: SbusHttp):
    key = f"compat/rollback/{next(_names)}"
    ok(sbus.create(key, "v0"), 201)
    ok(sbus.commit(key, 0, "v1", "w"))
    ok(sbus.commit(key, 1, "v2", "w"))

    rolled = ok(sbus.rollback(key, 0, "fixer"))
    assert SHARD_FIELDS <= rolled.keys()
    assert (rolled["key"], rolled["version"], rolled["content"]) == (key, 3, "v0")
    assert [h["value"] for h in sbus.history(key)] == ["v0", "v1", "v2", "v0"]

    refused(sbus.rollback(key, 99, "fixer"), 404, "VersionNotFound")
    refused(sbus.rollback(f"{key}-missing", 0, "fixer"), 404, "ShardNotFound")
    assert sbus.version(key) == 3

    # a rollback is checked like any commit: the agent read key@3, then it changed
    reader = f"r{next(_names)}"
    ok(sbus.get(key, reader))
    ok(sbus.commit(key, 3, "v4", "another writer"))
    body = refused(sbus.rollback(key, 1, reader), 409, "VersionMismatch")
    assert (body["key"], body["current_version"]) == (key, 4)
    assert ok(sbus.get(key))["content"] == "v4"
    ok(sbus.get(key, reader))
    assert ok(sbus.rollback(key, 1, reader))["content"] == "v1"
    assert sbus.version(key) == 5


def test_session_reset_and_untracked_reads(sbus: SbusHttp):
    x, y = two_shard_keys("session", sbus)
    agent, other = f"a{next(_names)}", f"b{next(_names)}"
    opened = ok(sbus.session(agent))  # a session nobody uses yet: its opener gets the token
    assert opened["status"] == "created" and opened["session_token"] and not opened["next_commit_refused"]
    ok(sbus.get(x, agent))
    ok(sbus.get(y, agent))
    ok(sbus.commit(y, 0, "y by other", other))
    refused(sbus.commit(x, 0, "stale", agent), 409, "CrossShardStale")

    again = ok(sbus.request("POST", "/session", {"agent_id": agent, "session_token": opened["session_token"]}))
    assert again == {"agent_id": agent, "status": "created", "session_token": opened["session_token"],
                     "next_commit_refused": False}
    # the reset dropped y@0 from the agent's reads: the commit depends on nothing stale now
    assert ok(sbus.commit(x, 0, "after reset", agent))["new_version"] == 1

    # without the token (anyone can name any agent) the reads go too, but the next commit
    # is refused rather than passing on reads the agent no longer has
    ok(sbus.get(y, agent))
    ok(sbus.commit(y, 1, "y again by other", other))
    assert ok(sbus.session(agent))["next_commit_refused"] is True
    body = refused(sbus.commit(x, 1, "on a stale y", agent), 410, "SessionExpired")
    assert "session_token" in body["detail"]
    assert ok(sbus.commit(x, 1, "told; read set afresh", agent))["new_version"] == 2
    ok(sbus.commit(y, 2, "y once more", other))

    # a GET without agent_id is a peek: it is not part of anybody's read set
    peeker = f"p{next(_names)}"
    ok(sbus.get(x, peeker))
    ok(sbus.get(y))
    ok(sbus.commit(y, 3, "y again", other))
    assert ok(sbus.commit(x, 2, "peeked y only", peeker))["new_version"] == 3


def test_delivery_log_register_keeps_read_time_versions(sbus: SbusHttp):
    x, y = two_shard_keys("register", sbus)
    agent, other = f"a{next(_names)}", f"b{next(_names)}"
    missing = f"compat/register/missing-{next(_names)}"
    ok(sbus.get(x, agent))
    ok(sbus.commit(x, 0, "x by other", other))

    got = ok(sbus.register(agent, [x, y, missing]))
    assert got == {"ok": True, "registered": 1, "skipped_existing": [x], "skipped_no_shard": [missing]}
    # x kept its read-time version (0), so a commit of y is refused; y@0 was registered
    body = refused(sbus.commit(y, 0, "y", agent), 409, "CrossShardStale")
    assert (body["key"], body["version_at_read"], body["current_version"]) == (x, 0, 1)
    ok(sbus.get(x, agent))
    ok(sbus.commit(y, 0, "y by other", other))
    body = refused(sbus.commit(x, 1, "x", agent), 409, "CrossShardStale")  # y@0 registered
    assert (body["key"], body["version_at_read"], body["current_version"]) == (y, 0, 1)
    assert ok(sbus.register(agent, [])) == {"ok": True, "registered": 0, "skipped_existing": [],
                                             "skipped_no_shard": []}


def test_commit_to_a_deleted_shard_is_shard_not_found(sbus: SbusHttp):
    key = f"compat/deleted/{next(_names)}"
    ok(sbus.create(key, "v0"), 201)
    deleted = ok(sbus.request("POST", "/v1/commit", {"agent": "deleter", "deletes": [key]}))
    assert deleted["versions"] == {key: 2}  # oribus numbering: the tombstone is S-Bus version 1
    refused(sbus.get(key, "late"), 404, "ShardNotFound")
    refused(sbus.commit(key, 1, "onto the tombstone", "late"), 404, "ShardNotFound")
    refused(sbus.commit(key, 0, "into the void", "late"), 404, "ShardNotFound")
    refused(sbus.get(key), 404, "ShardNotFound")


# ---- admin -----------------------------------------------------------------------------------


ADMIN_ROUTES = [
    ("POST", "/admin/reset", {}),
    ("GET", "/admin/config", None),
    ("POST", "/admin/config", {"ori_enabled": False}),
    ("GET", "/admin/delivery-log", None),
    ("GET", "/admin/health", None),
]


def test_admin_routes_are_forbidden_without_admin(sbus: SbusHttp):
    key = f"compat/admin-off/{next(_names)}"
    ok(sbus.create(key, "keep me"), 201)
    for method, path, body in ADMIN_ROUTES:
        refused(sbus.request(method, path, body), 403, "Forbidden")
    stats = sbus.stats()
    assert stats["ori_enabled"] is True and stats["total_shards"] >= 1
    assert ok(sbus.get(key))["content"] == "keep me"  # the reset did not run


def test_admin_routes_work_with_admin(admin_sbus: SbusHttp):
    sbus = admin_sbus
    ok(sbus.request("POST", "/admin/reset", {}))  # whatever other tests left: counters from 0
    x, y = two_shard_keys("admin", sbus)
    agent, other = "admin-a", "admin-b"

    health = ok(sbus.request("GET", "/admin/health"))
    assert health["status"] == "ok" and health["total_shards"] == 2
    assert ok(sbus.request("GET", "/admin/config")) == {"ori_enabled": True}

    ok(sbus.get(x, agent))
    ok(sbus.get(y, agent))
    ok(sbus.commit(y, 0, "y by other", other))
    log = ok(sbus.request("GET", "/admin/delivery-log"))
    mine = log["agents"][agent]
    assert (mine[x]["version"], mine[x]["stale"]) == (0, False)
    assert (mine[y]["version"], mine[y]["current_version"], mine[y]["stale"]) == (0, 1, True)

    # ORI off: S-Bus's unchecked mode accepts the stale commit; back on, it is refused again
    refused(sbus.request("POST", "/admin/config", {"ori_enabled": "no"}), 422, "InvalidRequest")
    assert ok(sbus.request("POST", "/admin/config", {"ori_enabled": False})) == {"ok": True, "ori_enabled": False}
    assert sbus.stats()["ori_enabled"] is False
    assert ok(sbus.commit(x, 0, "unchecked", agent))["new_version"] == 1
    assert ok(sbus.request("POST", "/admin/config", {"ori_enabled": True}))["ori_enabled"] is True
    ok(sbus.commit(y, 1, "y again", other))
    refused(sbus.commit(x, 1, "checked", agent), 409, "CrossShardStale")

    stats = sbus.stats()
    assert (stats["total_shards"], stats["total_commits"], stats["total_conflicts"]) == (2, 3, 1)
    assert ok(sbus.request("POST", "/admin/reset", {})) == {"cleared": 2}
    assert ok(sbus.request("GET", "/shards")) == {"shards": [], "count": 0}
    stats = sbus.stats()
    assert (stats["total_shards"], stats["total_commits"], stats["total_conflicts"]) == (0, 0, 0)
    assert ok(sbus.request("GET", "/admin/delivery-log"))["total_deliveries"] == 0  # every read log empty
    refused(sbus.get(x, agent), 404, "ShardNotFound")

    # as in S-Bus, x created again starts at version 0 and the agents' read logs are empty
    # (oribus versions never go back: only the S-Bus numbering restarts from the key's base)
    recreated = ok(sbus.create(x, "reborn"), 201)
    assert recreated["version"] == 0
    body = refused(sbus.commit(x, 1, "from x@1", agent), 409, "VersionMismatch")
    assert (body["key"], body["current_version"]) == (x, 0)
    assert ok(sbus.get(x))["content"] == "reborn"
    # the history keeps what came before (the reset's delete is a tombstone)
    assert [h["value"] for h in sbus.history(x)] == [f"c0:{x}", "unchecked", None, "reborn"]

    # the admin's own earlier deletes are not reads: a second reset works, and so do creates
    ok(sbus.commit(x, 0, "changed", "admin-c"))
    assert ok(sbus.request("POST", "/admin/reset", {})) == {"cleared": 1}
    assert ok(sbus.create(y, "y reborn"), 201)["version"] == 0
    assert ok(sbus.request("GET", "/shards")) == {"shards": [y], "count": 1}


# ---- concurrency: the S-Bus agent loop with a stale injector, audited ---------------------------


@dataclass
class ReadEvent:
    agent: str
    key: str
    version: int  # S-Bus numbering
    content: Any
    sent: float
    received: float


@dataclass
class CommitEvent:
    agent: str
    key: str
    expected: int  # S-Bus numbering
    delta: str
    reads: list[tuple[str, int]]  # its read set by the ORI rule: logged reads + explicit entries
    sent: float
    received: float
    status: int
    error: str | None = None
    new_version: int | None = None

    @property
    def accepted(self) -> bool:
        return self.status == 200


@dataclass
class Creation:
    key: str
    content: str
    sent: float
    received: float


@dataclass
class Audit:
    stale_accepted: list[str] = field(default_factory=list)  # accepted although a read had changed
    anomalies: list[str] = field(default_factory=list)  # anything else that cannot be right


def audit(histories: dict[str, list[dict]], creations: list[Creation],
          commits: list[CommitEvent], reads: list[ReadEvent]) -> Audit:
    """Check recorded client events against the final histories (oribus numbering, oldest first).

    Nodes: the creations and the accepted commits. Edges that must follow the
    commit-point order if the server is right:
    * version order: the writer of k@v before the writer of k@v+1;
    * read-from: the writer of every version C read (logged or explicit) before C;
    * read-before-overwrite (ORI): C before the writer of the version after each one it
      read — at C's commit point every key it read still had the version it read;
    * real time: a commit whose response arrived before C was sent is before C.
    A commit-point order exists iff the graph has no cycle. An accepted commit in a
    strongly connected component with the next writer of one of its reads was
    accepted on a stale read. Reads are checked against real time on their own.
    """
    out = Audit()
    by_delta: dict[str, int] = {}
    for i, c in enumerate(commits):
        assert c.delta not in by_delta, f"deltas must be unique, {c.delta!r} is not"
        by_delta[c.delta] = i
    created = {c.key: c for c in creations}
    Node = tuple  # ("create", key) | ("commit", index) | ("time", index)
    writer: dict[tuple[str, int], Node] = {}  # (key, oribus version) -> node
    seen: set[int] = set()
    for key, versions in histories.items():
        numbers = [h["version"] for h in versions]
        if numbers != list(range(1, len(numbers) + 1)):
            out.anomalies.append(f"{key}: history is not versions 1..n (truncated?): {numbers}")
            continue
        if versions[0]["value"] != created[key].content:
            out.anomalies.append(f"{key}@1 is {versions[0]['value']!r}, not its creation")
        writer[(key, 1)] = ("create", key)
        for h in versions[1:]:
            i = by_delta.get(h["value"])
            if i is None or commits[i].key != key:
                out.anomalies.append(f"{key}@{h['version']} = {h['value']!r} was written by no commit of {key}")
                continue
            c = commits[i]
            if not c.accepted:
                out.anomalies.append(f"refused commit {c.delta!r} ({c.error}) is visible as {key}@{h['version']}")
            elif c.new_version is not None and c.new_version + 1 != h["version"]:
                out.anomalies.append(f"{c.delta!r} was told new_version {c.new_version}, history has "
                                     f"{h['version'] - 1}")
            if i in seen:
                out.anomalies.append(f"{c.delta!r} appears twice in the histories")
            seen.add(i)
            writer[(key, h["version"])] = ("commit", i)
    for i, c in enumerate(commits):
        if c.accepted and i not in seen:
            out.anomalies.append(f"accepted commit {c.delta!r} is missing from {c.key}'s history")

    def times(node: Node) -> tuple[float, float]:
        if node[0] == "create":
            return created[node[1]].sent, created[node[1]].received
        c = commits[node[1]]
        return c.sent, c.received

    edges: dict[Node, list[Node]] = {}

    def edge(a: Node, b: Node) -> None:
        edges.setdefault(a, []).append(b)

    for (key, v), node in writer.items():
        nxt = writer.get((key, v + 1))
        if nxt is not None:
            edge(node, nxt)
    stale: dict[int, str] = {}  # accepted commit -> why it was stale (the first reason found)
    overwriters: dict[int, list[Node]] = {}
    for i, c in enumerate(commits):
        if not c.accepted or i not in seen:
            continue
        me: Node = ("commit", i)
        for key, sv in [(c.key, c.expected), *c.reads]:
            src = writer.get((key, sv + 1))
            if src is None:
                stale.setdefault(i, f"{c.delta!r} accepted after reading {key}@{sv}, a version "
                                    f"that was never written")
                continue
            edge(src, me)
            nxt = writer.get((key, sv + 2))
            if nxt is not None and nxt != me:
                edge(me, nxt)
                overwriters.setdefault(i, []).append(nxt)
                if key == c.key:  # its own key got another version between read and commit
                    stale.setdefault(i, f"{c.delta!r} wrote {key} expecting {sv}, "
                                        f"but {key}@{sv + 1} is someone else's")
    # real time, through a chain of time points: O(n) edges instead of O(n^2)
    finished = sorted({times(n)[1] for n in writer.values()})
    for k in range(len(finished) - 1):
        edge(("time", k), ("time", k + 1))
    for node in writer.values():
        sent, received = times(node)
        edge(node, ("time", bisect.bisect_left(finished, received)))
        before = bisect.bisect_left(finished, sent) - 1
        if before >= 0:
            edge(("time", before), node)

    component = _strongly_connected(edges)
    cyclic = Counter(component.values())
    blamed = set()
    for i, nxts in overwriters.items():
        me = ("commit", i)
        for nxt in nxts:
            if component[me] == component[nxt]:
                c = commits[i]
                w = commits[nxt[1]] if nxt[0] == "commit" else None
                stale.setdefault(i, f"{c.agent}'s commit {c.delta!r} of {c.key} was accepted after "
                                    f"{w.delta if w else nxt} had overwritten a version it read "
                                    f"(reads {c.reads})")
                blamed.add(component[me])
                break
    out.stale_accepted = list(stale.values())
    for comp, size in cyclic.items():
        members = [n for n, cc in component.items() if cc == comp and n[0] != "time"]
        if size > 1 and comp not in blamed and len(members) > 1:
            out.anomalies.append(f"no commit-point order exists for {members}")

    for r in reads:
        src = writer.get((r.key, r.version + 1))
        if src is None:
            out.anomalies.append(f"{r.agent} read {r.key}@{r.version}, which was never written")
            continue
        if times(src)[0] > r.received:
            out.anomalies.append(f"{r.agent} read {r.key}@{r.version} before it was written")
        if histories[r.key][r.version]["value"] != r.content:
            out.anomalies.append(f"{r.agent} read {r.key}@{r.version} as {r.content!r}")
        nxt = writer.get((r.key, r.version + 2))
        if nxt is not None and times(nxt)[1] < r.sent:
            out.anomalies.append(f"{r.agent} read {r.key}@{r.version} after {r.key}@{r.version + 1} "
                                 f"had been acknowledged (a stale read)")
    return out


def _strongly_connected(edges: dict[tuple, list[tuple]]) -> dict[tuple, int]:
    """Tarjan's algorithm, iteratively: node -> component id."""
    nodes = set(edges) | {b for bs in edges.values() for b in bs}
    index: dict[tuple, int] = {}
    low: dict[tuple, int] = {}
    on_stack: set[tuple] = set()
    stack: list[tuple] = []
    component: dict[tuple, int] = {}
    counter, component_ids = itertools.count(), itertools.count()
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(edges.get(root, ())))]
        index[root] = low[root] = next(counter)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = next(counter)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                cid = next(component_ids)
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component[member] = cid
                    if member == node:
                        break
    return component


def _history(key: str, *values: str) -> list[dict]:
    return [{"version": v, "value": value} for v, value in enumerate(values, start=1)]


@pytest.mark.parametrize("case", ["stale accepted", "overlapping (legal)", "refused visible", "stale read"])
def test_audit_detects_what_it_must(case):
    """The checker itself: it flags a stale commit, and only when no legal order explains it."""
    creations = [Creation("x", "x0", 0, 1), Creation("y", "y0", 0, 1)]
    reads = [ReadEvent("a", "x", 0, "x0", 2, 3), ReadEvent("a", "y", 0, "y0", 2, 3)]
    b_y = CommitEvent("b", "y", 0, "y1", [], 4, 5, 200, new_version=1)
    a_x = CommitEvent("a", "x", 0, "x1", [("x", 0), ("y", 0)], 6, 7, 200, new_version=1)
    histories = {"x": _history("x", "x0", "x1"), "y": _history("y", "y0", "y1")}
    if case == "overlapping (legal)":
        b_y.received = 8  # b may have committed after a: a's commit was not necessarily stale
    if case == "refused visible":
        a_x.reads = [("x", 0)]
        b_y.status, b_y.error, b_y.new_version = 409, "VersionMismatch", None
    if case == "stale read":
        a_x.reads = [("x", 0)]
        reads.append(ReadEvent("a", "y", 0, "y0", 5.5, 5.8))  # y@1 was acknowledged at 5
    got = audit(histories, creations, [b_y, a_x], reads)
    if case == "stale accepted":
        assert len(got.stale_accepted) == 1 and "'x1'" in got.stale_accepted[0], got
        assert got.anomalies == []
    elif case == "overlapping (legal)":
        assert got == Audit()
    elif case == "refused visible":
        assert got.stale_accepted == [] and len(got.anomalies) == 1 and "refused" in got.anomalies[0]
    else:
        assert got.stale_accepted == [] and len(got.anomalies) == 1 and "stale read" in got.anomalies[0]


N_AGENTS = 8
STEPS = 40
N_KEYS = 8


@dataclass
class Workload:
    """What the clients of one run of the S-Bus agent loop sent and were told."""

    keys: list[str]
    creations: list[Creation] = field(default_factory=list)
    reads: list[ReadEvent] = field(default_factory=list)
    commits: list[CommitEvent] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # any answer an S-Bus client must not get
    elapsed: float = 0.0

    @property
    def accepted(self) -> list[CommitEvent]:
        return [c for c in self.commits if c.accepted]

    @property
    def refusals(self) -> Counter[str]:
        return Counter(c.error for c in self.commits if not c.accepted)

    @property
    def masking(self) -> list[CommitEvent]:
        """Commits with an explicit entry fresher than the agent's logged read of that key."""
        return [c for c in self.commits
                if any(k == k2 and v2 > v for k, v in c.reads for k2, v2 in c.reads)]


def run_agent_loop(sbus: SbusHttp, name: str, agents: int = N_AGENTS, steps: int = STEPS) -> Workload:
    """``agents`` S-Bus agents x ``steps`` on N_KEYS keys (half on each shard) and an injector.

    An agent step: maybe start a new task (POST /session: its read set starts afresh;
    otherwise it keeps growing, as an LLM's context does), GET 2 or 3 keys with its
    agent_id, think a few ms, POST /commit/v2 (sometimes v1, sometimes with the field
    aliases) writing the first with the version it read; sometimes with an explicit
    read_set: the reads as made, a fresher version of another key it read (peeked: an
    attempt to mask its logged read), or a key it never read. The injector (S-Bus's
    StaleInjector) peeks a random key and commits over it, until the agents are done.
    Each client keeps its own model of its delivery log, so every commit event carries
    the read set the ORI rule must check: logged reads + explicit entries.
    """
    w = Workload(keys=keys_on_shard(0, f"{name}/s0", N_KEYS // 2) + keys_on_shard(1, f"{name}/s1", N_KEYS // 2))
    for k in w.keys:
        assert ok(sbus.create(k, f"init:{k}"), 201)["version"] == 0
    created = time.monotonic()
    w.creations = [Creation(k, f"init:{k}", 0.0, created) for k in w.keys]
    lock = threading.Lock()
    stop = threading.Event()

    def fail(what: str) -> None:
        with lock:
            w.unexpected.append(what)

    def get(agent: str | None, key: str, log: dict[str, int] | None) -> int | None:
        r = sbus.get(key, agent)
        if r.status != 200:
            fail(f"GET {key} by {agent}: {r.status} {r.body}")
            return None
        if log is not None:
            log[key] = r.body["version"]
        with lock:
            w.reads.append(ReadEvent(agent or "(peek)", key, r.body["version"], r.body["content"],
                                     r.sent, r.received))
        return r.body["version"]

    tokens: dict[str, str] = {}  # agent -> the session_token its first POST /session gave

    def reset(agent: str, log: dict[str, int]) -> bool:
        r = sbus.request("POST", "/session", {"agent_id": agent, "session_token": tokens.get(agent)})
        if (r.status != 200 or r.body.get("status") != "created" or r.body.get("next_commit_refused")
                or not r.body.get("session_token")):
            fail(f"POST /session {agent}: {r.status} {r.body}")
            return False
        tokens[agent] = r.body["session_token"]
        log.clear()
        return True

    def commit(agent: str, key: str, expected: int, delta: str, log: dict[str, int],
               explicit: list[dict] | None = None, v2: bool = True, aliases: bool = False) -> None:
        read_set = sorted(log.items()) + [(e["key"], e["version_at_read"]) for e in explicit or ()]
        r = sbus.commit(key, expected, delta, agent, read_set=explicit, v2=v2, aliases=aliases)
        event = CommitEvent(agent, key, expected, delta, read_set, r.sent, r.received, r.status)
        if r.status == 200:
            event.new_version = r.body["new_version"]
            log[key] = r.body["new_version"]  # its own write is current for it
        elif r.status == 409 and r.body.get("error") in (*STALE_CODES, "TokenConflict"):
            event.error = r.body["error"]
        else:
            fail(f"commit {delta!r}: {r.status} {r.body}")
        with lock:
            w.commits.append(event)

    def agent_loop(n: int) -> None:
        agent = f"{name}/agent{n}"
        rng = random.Random(f"{name}/{n}")
        log: dict[str, int] = {}  # what the server's delivery log holds for this agent
        try:
            for step in range(steps):
                if (step == 0 or rng.random() < 0.7) and not reset(agent, log):
                    return
                chosen = rng.sample(w.keys, rng.choice((2, 3)))
                versions = {k: get(agent, k, log) for k in chosen}
                if None in versions.values():
                    return
                time.sleep(rng.random() * 0.004)  # "thinking"
                explicit = None
                roll = rng.random()
                if roll < 0.25:  # the read set spelled out, as read
                    explicit = [{"key": k, "version_at_read": v} for k, v in versions.items()]
                elif roll < 0.5:  # a fresher version of another key read, or of a key never read
                    other = chosen[1] if roll < 0.4 else rng.choice([k for k in w.keys if k not in chosen])
                    fresh = get(None, other, None)
                    if fresh is None:
                        return
                    explicit = [{"key": other, "version_at_read": fresh}]
                commit(agent, chosen[0], versions[chosen[0]], f"{agent}:step{step}", log, explicit,
                       v2=rng.random() < 0.8, aliases=rng.random() < 0.3)
        except Exception as e:  # noqa: BLE001 - reported by the test
            fail(f"{agent} crashed: {type(e).__name__}: {e}")

    def injector() -> None:
        agent = f"{name}/injector"
        rng = random.Random(agent)
        log: dict[str, int] = {}
        try:
            for i in itertools.count():
                if stop.is_set():
                    return
                key = rng.choice(w.keys)
                version = get(None, key, None)
                # its own earlier writes are deliveries to it: start afresh, it depends on nothing
                if version is None or not reset(agent, log):
                    return
                commit(agent, key, version, f"{agent}:{i}", log)
                time.sleep(0.0005 + rng.random() * 0.002)
        except Exception as e:  # noqa: BLE001 - reported by the test
            fail(f"injector crashed: {type(e).__name__}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=agent_loop, args=(n,), name=f"agent-{n}") for n in range(agents)]
    inject = threading.Thread(target=injector, name="injector")
    inject.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    inject.join(30)
    w.elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in [*threads, inject]), "a client thread hung"
    return w


def test_concurrent_agents_with_stale_injector_accept_no_stale_commit(sbus: SbusHttp, request):
    stats_before = sbus.stats()
    w = run_agent_loop(sbus, f"compat/conc/{next(_names)}")
    assert w.unexpected == []
    histories = {k: sbus.history(k) for k in w.keys}
    result = audit(histories, w.creations, w.commits, w.reads)
    accepted, refusals = w.accepted, w.refusals
    stale_refused = sum(refusals[c] for c in STALE_CODES)

    with TALLY._lock:
        TALLY.audited_commits += len(accepted)
        TALLY.stale_accepted += len(result.stale_accepted)
        TALLY.concurrency_runs += 1
    by_code = ", ".join(f"{k} {v}" for k, v in sorted(refusals.items()))
    _print_past_capture(request.config, (
        f"S-Bus compat concurrency [{request.node.callspec.id}]: {len(w.commits)} commits in "
        f"{w.elapsed:.1f}s, {len(accepted)} accepted, {len(w.commits) - len(accepted)} refused "
        f"({by_code}), {stale_refused} stale rejected, {len(result.stale_accepted)} stale accepted; "
        f"{len(w.masking)} masking attempts, {sum(c.accepted for c in w.masking)} accepted; "
        f"module so far: {TALLY.requests} requests"))

    assert result.anomalies == []
    assert result.stale_accepted == []
    assert [c.delta for c in w.masking if c.accepted] == []
    assert len(accepted) > 0 and stale_refused > 0, refusals
    injected = sum(1 for c in w.commits if c.agent.endswith("injector"))
    assert injected > 0 and len(w.commits) == N_AGENTS * STEPS + injected
    for c in accepted:
        assert c.new_version == c.expected + 1

    # the server's counters say what the clients saw
    stats = sbus.stats()
    delta = {k: stats[k] - stats_before[k] for k in
             ("total_commits", "total_conflicts", "cross_shard_stale", "total_attempts", "session_expired")}
    assert delta == {
        "total_commits": len(accepted),
        "total_conflicts": len(w.commits) - len(accepted),
        "cross_shard_stale": refusals["CrossShardStale"],
        "total_attempts": len(w.commits),
        "session_expired": 0,
    }
    assert stats["scr"] == pytest.approx(stats["total_conflicts"] / stats["total_attempts"])
    assert stats["total_shards"] >= N_KEYS
    assert stats["delivery_log"]["agents"] >= N_AGENTS
    # and every key's S-Bus object agrees with its history and with the clients' count
    for k in w.keys:
        got = ok(sbus.get(k))
        assert (got["version"], got["content"]) == (len(histories[k]) - 1, histories[k][-1]["value"])
        mine = [c for c in w.commits if c.key == k]
        assert (got["attempt_count"], got["conflict_count"]) == (
            len(mine), sum(1 for c in mine if not c.accepted))


def test_audit_flags_stale_commits_when_ori_is_off(admin_sbus: SbusHttp, request):
    """The negative control on a real server: with validation off (S-Bus's unchecked mode,
    /admin/config) the same workload commits on stale reads, and the audit must see it."""
    ok(admin_sbus.request("POST", "/admin/config", {"ori_enabled": False}))
    try:
        w = run_agent_loop(admin_sbus, f"compat/ori-off/{next(_names)}", steps=15)
    finally:
        ok(admin_sbus.request("POST", "/admin/config", {"ori_enabled": True}))
    assert w.unexpected == []
    result = audit({k: admin_sbus.history(k) for k in w.keys}, w.creations, w.commits, w.reads)
    _print_past_capture(request.config, (
        f"S-Bus compat, ORI off (control): {len(result.stale_accepted)} of {len(w.accepted)} accepted "
        f"commits flagged stale by the audit"))
    assert result.anomalies == []
    assert len(result.stale_accepted) > 0, "the audit saw no stale commit with ORI off"


def _curl_post_without_body(sbus: SbusHttp, path: str) -> Reply:
    """``curl -sS -X POST URL``: no Content-Length, no Content-Type, no body."""
    with socket.create_connection((sbus.host, sbus.port), timeout=30) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {sbus.host}:{sbus.port}\r\n"
                     "Accept: */*\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return Reply(int(head.split()[1]), json.loads(body) if body else None, 0.0, 0.0)


def test_sbus_smoke_script_cases(any_admin_sbus: SbusHttp):
    """S-Bus's own smoke test (test_proxy_cross_shard_stale.sh) step by step, as it sends
    each request: a reset before each case, case A (a proxy-registered read made stale is
    refused as CrossShardStale) and case B (without it, the same commit passes), twice."""
    sbus = any_admin_sbus

    def reset_and_create() -> None:
        assert ok(_curl_post_without_body(sbus, "/admin/reset")).keys() == {"cleared"}
        assert ok(sbus.request("GET", "/shards")) == {"shards": [], "count": 0}
        for key in ("models_state", "orm_query"):
            assert ok(sbus.create(key, "v0", "test"), 201)["version"] == 0

    def case_a() -> None:
        reset_and_create()
        reg = ok(sbus.request("POST", "/delivery_log/register", {
            "agent_id": "worker-demo", "session_id": "test", "shards_used": ["models_state"],
            "source": "proxy", "timestamp_ms": 0}))
        assert (reg["ok"], reg["registered"]) == (True, 1), reg
        assert ok(sbus.commit("models_state", 0, "test-write", "other-agent", read_set=[]))["new_version"] == 1
        body = refused(sbus.commit("orm_query", 0, "test-write", "worker-demo", read_set=[]), 409, "CrossShardStale")
        assert (body["key"], body["version_at_read"], body["current_version"]) == ("models_state", 0, 1)

    def case_b() -> None:
        reset_and_create()
        assert ok(sbus.commit("models_state", 0, "test-write", "other-agent", read_set=[]))["new_version"] == 1
        assert ok(sbus.commit("orm_query", 0, "test-write", "worker-demo", read_set=[]))["new_version"] == 1

    for case in (case_a, case_b, case_a, case_b):
        case()
