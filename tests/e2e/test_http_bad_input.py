"""Bad input over HTTP: a 4xx with a JSON error body, nothing changed, the server still serves.

Against a real ``oribus up`` (in-process shards and ``--processes``: a value that
the gateway lets through may still fail where the bus encodes it for a shard).
Every bad request is sent raw with ``http.client`` and is *almost* valid: it
aims at ``bad/target`` (version 0, content ``t0``) with the right expected
version, from an agent that read nothing, so that if the gateway let it through
the commit would succeed and the state would show it. Around each request the
whole state is snapshotted — every key with version and value (``/v1/keys``,
including S-Bus metadata keys), every S-Bus shard object with its counters
(``/shards``) and the S-Bus totals (``/stats``) — and compared; then
``/healthz`` must answer and a good tracked GET + commit must work.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

import pytest
from processes import up

from oribus.gateway import GatewayConfig
from oribus.types import DEFAULT_MAX_VALUE_BYTES

TARGET = "bad/target"  # every bad request aims at it; it must stay at version 0, "t0"
SENTINEL = "bad/sentinel"  # a key for read_set entries; never changes
GOOD = "bad/good"  # the good commit after every case writes it
VALUE_LIMIT = DEFAULT_MAX_VALUE_BYTES  # the servers run with the default
MAX_BODY = GatewayConfig.max_body_bytes  # the servers run with the default
NO_BODY = object()


def call(address: str, method: str, path: str, body: Any = NO_BODY,
         headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any]:
    """One request on a fresh connection; ``body`` bytes go as they are, anything else as JSON."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = None if body is NO_BODY else body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw


def snapshot(address: str) -> dict:
    status, keys = call(address, "GET", "/v1/keys?limit=10000")
    assert status == 200, keys
    assert keys["next_after"] is None
    status, listed = call(address, "GET", "/shards")
    assert status == 200, listed
    shards = []
    for key in listed["shards"]:  # key strings, as S-Bus lists them; each object with its counters
        status, shard = call(address, "GET", f"/shard/{key}")
        assert status == 200, shard
        shards.append(shard)
    status, stats = call(address, "GET", "/stats")
    assert status == 200, stats
    return {"keys": keys["items"], "shards": shards, "stats": stats}


def check_good_commit(address: str) -> None:
    status, health = call(address, "GET", "/healthz")
    assert (status, health["status"]) == (200, "ok")
    status, got = call(address, "GET", f"/shard/{GOOD}?agent_id=good-agent")
    assert status == 200, got
    status, done = call(address, "POST", "/commit/v2", {
        "key": GOOD, "expected_version": got["version"], "delta": f"good {got['version'] + 1}",
        "agent_id": "good-agent"})
    assert (status, done.get("new_version")) == (200, got["version"] + 1), done
    status, target = call(address, "GET", f"/shard/{TARGET}")
    assert (status, target["version"], target["content"]) == (200, 0, "t0")


def commit(**over: Any) -> dict:
    """A commit of TARGET that would succeed; ``over`` changes fields (``...`` drops one)."""
    body = {"key": TARGET, "expected_version": 0, "delta": "pwned", "agent_id": "mallory"}
    body.update(over)
    return {k: v for k, v in body.items() if v is not ...}


def create(**over: Any) -> dict:
    body = {"key": "bad/new", "content": "pwned", "goal_tag": "g"}
    body.update(over)
    return {k: v for k, v in body.items() if v is not ...}


def native(**over: Any) -> dict:
    body = {"agent": "mallory", "writes": {TARGET: "pwned"}, "expect": {TARGET: 1}}
    body.update(over)
    return {k: v for k, v in body.items() if v is not ...}


def rs(*entries: Any) -> dict:
    return commit(read_set=list(entries))


LONG = "a" * 257
DEEP = b"[" * 5000 + b"]" * 5000  # valid JSON nested deeper than a recursive parser can go

# (method, path, body, status, error code)
CASES = {
    # ---- not JSON, or not a JSON object
    "commit: truncated JSON": ("POST", "/commit/v2", b'{"key": "bad/target", ', 400, "InvalidRequest"),
    "commit: empty body": ("POST", "/commit", b"", 400, "InvalidRequest"),
    "commit: no body at all": ("POST", "/commit", NO_BODY, 400, "InvalidRequest"),
    "create: not JSON": ("POST", "/shard", b"key=bad/new&content=x", 400, "InvalidRequest"),
    "session: unquoted names": ("POST", "/session", b"{agent_id: mallory}", 400, "InvalidRequest"),
    "rollback: invalid UTF-8": ("POST", "/rollback", b"\xff\xfe{}", 400, "InvalidRequest"),
    "commit: invalid UTF-8 in a string": (
        "POST", "/commit/v2", b'{"key": "bad/target", "expected_version": 0, "delta": "\xff", '
        b'"agent_id": "mallory"}', 400, "InvalidRequest"),
    "commit: trailing garbage": ("POST", "/commit/v2", json.dumps(commit()).encode() + b"}", 400,
                                 "InvalidRequest"),
    "commit: a list": ("POST", "/commit/v2", [commit()], 422, "InvalidRequest"),
    "commit: a string": ("POST", "/commit/v2", "commit", 422, "InvalidRequest"),
    "commit: a number": ("POST", "/commit", 42, 422, "InvalidRequest"),
    "commit: null": ("POST", "/commit", None, 422, "InvalidRequest"),
    "create: true": ("POST", "/shard", True, 422, "InvalidRequest"),
    "register: a list": ("POST", "/delivery_log/register", [TARGET], 422, "InvalidRequest"),
    "commit: nested 5000 deep": ("POST", "/commit/v2", DEEP, 400, "InvalidRequest"),
    # ---- missing fields
    "commit: no key": ("POST", "/commit/v2", commit(key=...), 422, "InvalidRequest"),
    "commit: no expected_version": ("POST", "/commit/v2", commit(expected_version=...), 422, "InvalidRequest"),
    "commit: no delta": ("POST", "/commit/v2", commit(delta=...), 422, "InvalidRequest"),
    "commit: no agent_id": ("POST", "/commit", commit(agent_id=...), 422, "InvalidRequest"),
    "commit: empty agent_id": ("POST", "/commit", commit(agent_id=""), 422, "InvalidRequest"),
    "commit: empty object": ("POST", "/commit", {}, 422, "InvalidRequest"),
    "create: no key": ("POST", "/shard", create(key=...), 422, "InvalidRequest"),
    "create: no content": ("POST", "/shard", create(content=...), 422, "InvalidRequest"),
    "rollback: no target_version": ("POST", "/rollback", {"key": TARGET, "agent_id": "m"}, 422,
                                    "InvalidRequest"),
    "rollback: no agent_id": ("POST", "/rollback", {"key": TARGET, "target_version": 0}, 422,
                              "InvalidRequest"),
    "session: no agent_id": ("POST", "/session", {}, 422, "InvalidRequest"),
    "register: no shards_used": ("POST", "/delivery_log/register", {"agent_id": "m"}, 422,
                                 "InvalidRequest"),
    "register: no agent_id": ("POST", "/delivery_log/register", {"shards_used": [TARGET]}, 422,
                              "InvalidRequest"),
    # ---- wrong types and out-of-range values
    "commit: key is an int": ("POST", "/commit/v2", commit(key=7), 422, "InvalidRequest"),
    "commit: key is null": ("POST", "/commit/v2", commit(key=None), 422, "InvalidRequest"),
    "commit: key is a list": ("POST", "/commit/v2", commit(key=[TARGET]), 422, "InvalidRequest"),
    "commit: expected_version is a string": ("POST", "/commit/v2", commit(expected_version="0"), 422,
                                             "InvalidRequest"),
    "commit: expected_version is negative": ("POST", "/commit/v2", commit(expected_version=-1), 422,
                                             "InvalidRequest"),
    "commit: expected_version is false": ("POST", "/commit/v2", commit(expected_version=False), 422,
                                          "InvalidRequest"),
    "commit: expected_version is 0.0": ("POST", "/commit/v2", commit(expected_version=0.0), 422,
                                        "InvalidRequest"),
    "commit: expected_version is null": ("POST", "/commit/v2", commit(expected_version=None), 422,
                                         "InvalidRequest"),
    "commit: expected_version is 2**64": ("POST", "/commit/v2", commit(expected_version=1 << 64), 422,
                                          "InvalidRequest"),
    "commit: expected_version is NaN": ("POST", "/commit/v2", b'{"key": "bad/target", "expected_version": '
                                        b'NaN, "delta": "x", "agent_id": "m"}', 400, "InvalidRequest"),
    "commit: expected_ver alias is a string": (
        "POST", "/commit", commit(expected_version=..., expected_ver="0"), 422, "InvalidRequest"),
    "commit: delta is an int": ("POST", "/commit/v2", commit(delta=5), 422, "InvalidRequest"),
    "commit: delta is an object": ("POST", "/commit/v2", commit(delta={"text": "x"}), 422, "InvalidRequest"),
    "commit: content alias is null": ("POST", "/commit", commit(delta=..., content=None), 422,
                                      "InvalidRequest"),
    "commit: delta with a lone surrogate": ("POST", "/commit/v2", commit(delta="\ud800"), 400,
                                            "InvalidRequest"),
    "commit: agent_id is an int": ("POST", "/commit/v2", commit(agent_id=5), 422, "InvalidRequest"),
    "commit: agent_id of 257 chars": ("POST", "/commit/v2", commit(agent_id=LONG), 422, "InvalidRequest"),
    "commit: agent_id with a lone surrogate": ("POST", "/commit/v2", commit(agent_id="a\udc00"), 422,
                                               "InvalidRequest"),
    "commit: rationale is an int": ("POST", "/commit/v2", commit(rationale=1), 422, "InvalidRequest"),
    "commit: read_set is a string": ("POST", "/commit/v2", commit(read_set=SENTINEL), 422, "InvalidRequest"),
    "commit: read_set is an object": ("POST", "/commit/v2",
                                      commit(read_set={"key": SENTINEL, "version_at_read": 0}), 422,
                                      "InvalidRequest"),
    "read_set: an int entry": ("POST", "/commit/v2", rs(1), 422, "InvalidRequest"),
    "read_set: a pair, not an object": ("POST", "/commit/v2", rs([SENTINEL, 0]), 422, "InvalidRequest"),
    "read_set: no version_at_read": ("POST", "/commit/v2", rs({"key": SENTINEL}), 422, "InvalidRequest"),
    "read_set: no key": ("POST", "/commit/v2", rs({"version_at_read": 0}), 422, "InvalidRequest"),
    "read_set: key is an int": ("POST", "/commit/v2", rs({"key": 7, "version_at_read": 0}), 422,
                                "InvalidRequest"),
    "read_set: version is negative": ("POST", "/commit/v2", rs({"key": SENTINEL, "version_at_read": -1}),
                                      422, "InvalidRequest"),
    "read_set: version is a string": ("POST", "/commit/v2", rs({"key": SENTINEL, "version_at_read": "0"}),
                                      422, "InvalidRequest"),
    "read_set: version is true": ("POST", "/commit/v2", rs({"key": SENTINEL, "version_at_read": True}),
                                  422, "InvalidRequest"),
    "read_set: version is 2**64": ("POST", "/commit/v2",
                                   rs({"key": SENTINEL, "version_at_read": 1 << 64}), 422, "InvalidRequest"),
    "read_set: invalid key": ("POST", "/commit/v2", rs({"key": "/bad", "version_at_read": 0}), 400,
                              "InvalidRequest"),
    "create: key is an int": ("POST", "/shard", create(key=7), 422, "InvalidRequest"),
    "create: content is an int": ("POST", "/shard", create(content=7), 422, "InvalidRequest"),
    "create: goal_tag is a list": ("POST", "/shard", create(goal_tag=["g"]), 422, "InvalidRequest"),
    "create: goal_tag with a lone surrogate": ("POST", "/shard", create(goal_tag="\udfff"), 400,
                                               "InvalidRequest"),
    "rollback: target_version is a string": (
        "POST", "/rollback", {"key": TARGET, "target_version": "0", "agent_id": "m"}, 422, "InvalidRequest"),
    "rollback: target_version is negative": (
        "POST", "/rollback", {"key": TARGET, "target_version": -1, "agent_id": "m"}, 422, "InvalidRequest"),
    "rollback: target_version is 2**64": (
        "POST", "/rollback", {"key": TARGET, "target_version": 1 << 64, "agent_id": "m"}, 422,
        "InvalidRequest"),
    "session: agent_id is an int": ("POST", "/session", {"agent_id": 7}, 422, "InvalidRequest"),
    "session: agent_id of 257 chars": ("POST", "/session", {"agent_id": LONG}, 422, "InvalidRequest"),
    "session: agent_id with a lone surrogate": ("POST", "/session", {"agent_id": "\ud800"}, 422,
                                                "InvalidRequest"),
    "rollback: agent_id with a lone surrogate": (
        "POST", "/rollback", {"key": TARGET, "target_version": 0, "agent_id": "m\udfff"}, 422, "InvalidRequest"),
    "register: agent_id with a lone surrogate": (
        "POST", "/delivery_log/register", {"agent_id": "\udbff", "shards_used": [TARGET]}, 422, "InvalidRequest"),
    "register: shards_used is a string": ("POST", "/delivery_log/register",
                                          {"agent_id": "m", "shards_used": TARGET}, 422, "InvalidRequest"),
    "register: a key is an int": ("POST", "/delivery_log/register", {"agent_id": "m", "shards_used": [7]},
                                  400, "InvalidRequest"),
    "get: agent_id of 257 chars": ("GET", f"/shard/{TARGET}?agent_id={LONG}", NO_BODY, 422, "InvalidRequest"),
    # ---- invalid keys
    "commit: key with a leading /": ("POST", "/commit/v2", commit(key="/bad/target"), 400, "InvalidRequest"),
    "commit: key with a trailing /": ("POST", "/commit/v2", commit(key="bad/target/"), 400, "InvalidRequest"),
    "commit: key with //": ("POST", "/commit/v2", commit(key="bad//target"), 400, "InvalidRequest"),
    "commit: key with a control char": ("POST", "/commit/v2", commit(key="bad/tar\x01get"), 400,
                                        "InvalidRequest"),
    "commit: empty key": ("POST", "/commit/v2", commit(key=""), 400, "InvalidRequest"),
    "commit: key of 1025 bytes": ("POST", "/commit/v2", commit(key="k" * 1025), 400, "InvalidRequest"),
    "create: key with a leading /": ("POST", "/shard", create(key="/bad/new"), 400, "InvalidRequest"),
    "create: key with NUL": ("POST", "/shard", create(key="bad/n\x00ew"), 400, "InvalidRequest"),
    "create: key with a lone surrogate": ("POST", "/shard", create(key="bad/\ud800"), 400, "InvalidRequest"),
    "create: key of 1026 bytes": ("POST", "/shard", create(key="é" * 513), 400, "InvalidRequest"),
    "rollback: key with a leading /": ("POST", "/rollback", {"key": "/bad/target", "target_version": 0,
                                                              "agent_id": "m"}, 400, "InvalidRequest"),
    "register: key with a leading /": ("POST", "/delivery_log/register",
                                       {"agent_id": "m", "shards_used": ["/bad/target"]}, 400, "InvalidRequest"),
    "get: key with a leading /": ("GET", "/shard//bad/target?agent_id=m", NO_BODY, 400, "InvalidRequest"),
    "get: key with a control char": ("GET", "/shard/bad/tar%01get?agent_id=m", NO_BODY, 400, "InvalidRequest"),
    "get: key with NUL": ("GET", "/shard/bad%00target?agent_id=m", NO_BODY, 400, "InvalidRequest"),
    # ---- too large
    "commit: body over --max-body": ("POST", "/commit/v2", b'{"delta": "' + b"x" * MAX_BODY + b'"}', 413,
                                     "BodyTooLarge"),
    "create: body over --max-body": ("POST", "/shard", b" " * (MAX_BODY + 1), 413, "BodyTooLarge"),
    "commit: delta over the value limit": ("POST", "/commit/v2", commit(delta="x" * (VALUE_LIMIT + 1)), 413,
                                           "DeltaTooLarge"),
    "create: content over the value limit": ("POST", "/shard", create(content="x" * (VALUE_LIMIT + 1)), 413,
                                             "DeltaTooLarge"),
    # ---- unknown routes, wrong methods
    "unknown route": ("GET", "/nope", NO_BODY, 404, "NotFound"),
    "unknown POST route": ("POST", "/commit/v3", commit(), 404, "NotFound"),
    "unknown /v1 route": ("POST", "/v1/put", native(), 404, "NotFound"),
    "unknown admin route": ("POST", "/admin/drop-everything", {}, 404, "NotFound"),
    "GET /commit": ("GET", "/commit", NO_BODY, 405, "MethodNotAllowed"),
    "GET /commit/v2": ("GET", "/commit/v2", NO_BODY, 405, "MethodNotAllowed"),
    "PUT /shard": ("PUT", "/shard", create(), 405, "MethodNotAllowed"),
    "DELETE /shard/target": ("DELETE", f"/shard/{TARGET}", NO_BODY, 405, "MethodNotAllowed"),
    "PUT /shard/target": ("PUT", f"/shard/{TARGET}", commit(), 405, "MethodNotAllowed"),
    "GET /rollback": ("GET", "/rollback", NO_BODY, 405, "MethodNotAllowed"),
    "GET /session": ("GET", "/session", NO_BODY, 405, "MethodNotAllowed"),
    "POST /stats": ("POST", "/stats", {}, 405, "MethodNotAllowed"),
    "POST /shards": ("POST", "/shards", create(), 405, "MethodNotAllowed"),
    "POST /healthz": ("POST", "/healthz", {}, 405, "MethodNotAllowed"),
    "GET /v1/commit": ("GET", "/v1/commit", NO_BODY, 405, "MethodNotAllowed"),
    "POST /v1/keys": ("POST", "/v1/keys", native(), 405, "MethodNotAllowed"),
    "DELETE /v1/keys/target": ("DELETE", f"/v1/keys/{TARGET}", NO_BODY, 405, "MethodNotAllowed"),
    # ---- the native API
    "v1 commit: truncated JSON": ("POST", "/v1/commit", b'{"agent": "m", "writes": {', 400, "InvalidRequest"),
    "v1 commit: a list": ("POST", "/v1/commit", [native()], 422, "InvalidRequest"),
    "v1 commit: empty body": ("POST", "/v1/commit", b"", 400, "InvalidRequest"),
    "v1 commit: no agent": ("POST", "/v1/commit", native(agent=...), 400, "InvalidRequest"),
    "v1 commit: agent is an int": ("POST", "/v1/commit", native(agent=5), 400, "InvalidRequest"),
    "v1 commit: session is an int": ("POST", "/v1/commit", native(session=5), 400, "InvalidRequest"),
    "v1 commit: writes is a list": ("POST", "/v1/commit", native(writes=[TARGET]), 400, "InvalidRequest"),
    "v1 commit: expect is a string": ("POST", "/v1/commit", native(expect={TARGET: "1"}), 400,
                                      "InvalidRequest"),
    "v1 commit: expect is negative": ("POST", "/v1/commit", native(expect={TARGET: -1}), 400,
                                      "InvalidRequest"),
    "v1 commit: expect is true": ("POST", "/v1/commit", native(expect={TARGET: True}), 400, "InvalidRequest"),
    "v1 commit: read_set is a list": ("POST", "/v1/commit", native(read_set=[SENTINEL]), 400,
                                      "InvalidRequest"),
    "v1 commit: read_set version is a string": ("POST", "/v1/commit", native(read_set={SENTINEL: "1"}), 400,
                                                "InvalidRequest"),
    "v1 commit: deletes is a string": ("POST", "/v1/commit", native(writes=..., deletes=TARGET), 400,
                                       "InvalidRequest"),
    "v1 commit: deletes has an int": ("POST", "/v1/commit", native(deletes=[7]), 400, "InvalidRequest"),
    "v1 commit: unknown scope": ("POST", "/v1/commit", native(scope="global"), 400, "InvalidRequest"),
    "v1 commit: since is not shard ids": ("POST", "/v1/commit", native(since={"a": "b"}), 400,
                                          "InvalidRequest"),
    "v1 commit: since names an unknown shard": ("POST", "/v1/commit",
                                                native(scope="transaction", since={"99": 1}), 400,
                                                "InvalidRequest"),
    "v1 commit: strict is a string": ("POST", "/v1/commit", native(strict="yes"), 400, "InvalidRequest"),
    "v1 commit: commit_id is an int": ("POST", "/v1/commit", native(commit_id=5), 400, "InvalidRequest"),
    "v1 commit: commit_id of 129 chars": ("POST", "/v1/commit", native(commit_id="c" * 129), 400,
                                          "InvalidRequest"),
    "v1 commit: invalid key": ("POST", "/v1/commit", native(writes={"/bad": 1}, expect=...), 400,
                               "InvalidRequest"),
    "v1 commit: key with a control char": ("POST", "/v1/commit", native(writes={"bad/\x7f": 1}, expect=...),
                                           400, "InvalidRequest"),
    "v1 commit: bad $bytes": ("POST", "/v1/commit", native(writes={TARGET: {"$bytes": "!!"}}), 400,
                              "InvalidRequest"),
    "v1 commit: value over the limit": ("POST", "/v1/commit", native(writes={TARGET: "x" * (VALUE_LIMIT + 1)}),
                                        413, "ValueTooLarge"),
    "v1 commit: body over --max-body": ("POST", "/v1/commit", b"[" + b" " * MAX_BODY + b"]", 413,
                                        "BodyTooLarge"),
    "v1 commit: nested 5000 deep": ("POST", "/v1/commit", DEEP, 400, "InvalidRequest"),
    "v1 commit: value nested 700 deep": (
        "POST", "/v1/commit", b'{"agent": "m", "writes": {"bad/target": ' + b"[" * 700 + b"]" * 700 + b"}}",
        400, "InvalidRequest"),
    "v1 rollback: no versions": ("POST", "/v1/rollback", {"agent": "m", "versions": {}}, 400, "InvalidRequest"),
    "v1 rollback: version is a string": ("POST", "/v1/rollback", {"agent": "m", "versions": {TARGET: "1"}},
                                         400, "InvalidRequest"),
    "v1 get: keys is a string": ("POST", "/v1/get", {"agent": "m", "keys": TARGET}, 400, "InvalidRequest"),
    "v1 get: a key is an int": ("POST", "/v1/get", {"agent": "m", "keys": [7]}, 400, "InvalidRequest"),
    "v1 get: record is a string": ("POST", "/v1/get", {"agent": "m", "keys": [TARGET], "record": "no"}, 400,
                                   "InvalidRequest"),
    "v1 forget: no keys": ("POST", "/v1/forget", {"agent": "m"}, 400, "InvalidRequest"),
    "v1 reset: no agent": ("POST", "/v1/reset", {}, 400, "InvalidRequest"),
    "v1 keys: limit=abc": ("GET", "/v1/keys?limit=abc", NO_BODY, 400, "InvalidRequest"),
    "v1 keys: limit=0": ("GET", "/v1/keys?limit=0", NO_BODY, 400, "InvalidRequest"),
    "v1 keys: limit=-5": ("GET", "/v1/keys?limit=-5", NO_BODY, 400, "InvalidRequest"),
    "v1 keys: limit=10001": ("GET", "/v1/keys?limit=10001", NO_BODY, 400, "InvalidRequest"),
    "v1 key: no agent": ("GET", f"/v1/keys/{TARGET}", NO_BODY, 400, "InvalidRequest"),
    "v1 key: invalid key": ("GET", "/v1/keys/bad/%01?agent=m", NO_BODY, 400, "InvalidRequest"),
    "v1 history: limit=abc": ("GET", f"/v1/history/{TARGET}?limit=abc", NO_BODY, 400, "InvalidRequest"),
    "v1 history: limit=0": ("GET", f"/v1/history/{TARGET}?limit=0", NO_BODY, 400, "InvalidRequest"),
    "v1 sessions: not an admin": ("GET", "/v1/sessions?limit=0", NO_BODY, 403, "Forbidden"),
    "v1 watch: from_version=abc": ("GET", "/v1/watch?from_version=abc", NO_BODY, 400, "InvalidRequest"),
    "v1 watch: since=abc": ("GET", "/v1/watch?since=abc", NO_BODY, 400, "InvalidRequest"),
}


@pytest.fixture(scope="module", params=["up", "up --processes"])
def address(request: pytest.FixtureRequest) -> str:
    server = request.getfixturevalue("up_processes" if request.param == "up --processes" else "up_embedded")
    for key, content in ((TARGET, "t0"), (SENTINEL, "s0"), (GOOD, "g0")):
        status, body = call(server.http_address, "POST", "/shard", {"key": key, "content": content})
        assert status == 201, body
    return server.http_address


@pytest.mark.parametrize("method, path, body, status, code", CASES.values(), ids=CASES.keys())
def test_bad_request_is_refused_and_changes_nothing(address, method, path, body, status, code):
    before = snapshot(address)
    got_status, got = call(address, method, path, body)
    assert got_status == status, got
    assert isinstance(got, dict) and got.get("error") == code, got
    assert snapshot(address) == before
    check_good_commit(address)


def test_huge_integers_on_the_native_api_are_refused(address, request):
    """Versions beyond 64 bits cannot cross the wire to a shard process. (In-process shards
    may refuse such a commit as a Conflict — counted in /stats, so only keys are compared.)"""
    for over in ({"expect": {TARGET: 1 << 64}}, {"read_set": {SENTINEL: 1 << 64}}, {"writes": ...,
                 "rollback": {TARGET: 1 << 64}}):
        before = snapshot(address)
        status, got = call(address, "POST", "/v1/commit", native(**over))
        assert 400 <= status < 500 and isinstance(got, dict) and "error" in got, (over, status, got)
        after = snapshot(address)
        assert (after["keys"], after["shards"]) == (before["keys"], before["shards"])
    check_good_commit(address)


def test_sbus_max_delta(cluster, tmp_path):
    """``--sbus-max-delta 100``: S-Bus's DeltaTooLarge at 101 characters, for creates and commits."""
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False, name="up-max-delta"))
    server.args += ["--sbus-max-delta", "100"]
    server.start().wait_serving()
    address = server.http_address

    status, got = call(address, "POST", "/shard", {"key": "delta/k", "content": "c" * 101})
    assert (status, got["error"], got["max"]) == (413, "DeltaTooLarge", 100), got
    status, got = call(address, "GET", "/shard/delta/k")
    assert (status, got["error"]) == (404, "ShardNotFound")
    status, got = call(address, "POST", "/shard", {"key": "delta/k", "content": "c" * 100})
    assert status == 201, got

    before = snapshot(address)
    for delta in ("d" * 101, "d" * (VALUE_LIMIT + 1)):
        status, got = call(address, "POST", "/commit/v2",
                           {"key": "delta/k", "expected_version": 0, "delta": delta, "agent_id": "a"})
        assert (status, got["error"], got["key"], got["len"], got["max"]) == (
            413, "DeltaTooLarge", "delta/k", len(delta), 100), got
        assert isinstance(got["detail"], str)
        assert snapshot(address) == before
    status, got = call(address, "POST", "/commit/v2",
                       {"key": "delta/k", "expected_version": 0, "delta": "d" * 100, "agent_id": "a"})
    assert (status, got) == (200, {"new_version": 1, "shard_id": got.get("shard_id")}), got
    status, got = call(address, "GET", "/shard/delta/k")
    assert (status, got["version"], got["content"]) == (200, 1, "d" * 100)


# ---- cases that damage the state today: each on a server of its own ----------------------------


def _scratch_server(cluster, tmp_path, processes: bool) -> str:
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=processes, name="up-scratch"))
    server.start().wait_serving()
    for key, content in ((TARGET, "t0"), (SENTINEL, "s0"), (GOOD, "g0")):
        status, body = call(server.http_address, "POST", "/shard", {"key": key, "content": content})
        assert status == 201, body
    return server.http_address


def test_non_json_number_literals_are_refused(cluster, tmp_path):
    address = _scratch_server(cluster, tmp_path, processes=False)
    wrong = []
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        before = snapshot(address)
        status, got = call(address, "POST", "/v1/commit",
                           b'{"agent": "m", "writes": {"bad/target": ' + literal + b"}}")
        if not (400 <= status < 500 and isinstance(got, dict) and "error" in got):
            wrong.append((literal, status, got))
        elif snapshot(address) != before:
            wrong.append((literal, "state changed"))
    assert wrong == []
    check_good_commit(address)


@pytest.mark.parametrize("mode", ["up", "up --processes"])
def test_unencodable_session_names_are_refused(cluster, tmp_path, mode):
    address = _scratch_server(cluster, tmp_path, processes=mode == "up --processes")
    wrong = []
    before = snapshot(address)
    for field in ("agent", "session", "commit_id"):
        status, got = call(address, "POST", "/v1/commit", native(**{field: "m\udc00"}))
        if not (400 <= status < 500 and isinstance(got, dict) and "error" in got):
            wrong.append((field, status, got))
    assert wrong == []
    assert snapshot(address) == before
    # and the key still works: nothing was left locked
    try:
        status, got = call(address, "GET", f"/shard/{TARGET}?agent_id=after", timeout=3)
        if status != 200:
            wrong.append(("GET after", status, got))
    except TimeoutError:
        wrong.append(("GET after", "no answer in 3 s"))
    status, got = call(address, "POST", "/commit/v2", commit(agent_id="after"), timeout=3)
    if status != 200:
        wrong.append(("commit after", status, got))
    assert wrong == []


# ---- requests a web page on another site can make a browser send (specs/http.md, "Browsers") ----

EVIL = {"Origin": "http://evil.example"}
TEXT = {"Content-Type": "text/plain"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

# (method, path, body, headers, status, error code)
CROSS_SITE = {
    "commit: text/plain from evil.example": ("POST", "/commit/v2", commit(), {**TEXT, **EVIL}, 403,
                                             "CrossOriginRefused"),
    "commit: JSON from evil.example": ("POST", "/commit/v2", commit(), EVIL, 403, "CrossOriginRefused"),
    "commit: Origin null": ("POST", "/commit/v2", commit(), {"Origin": "null"}, 403, "CrossOriginRefused"),
    "commit: text/plain": ("POST", "/commit/v2", commit(), TEXT, 415, "UnsupportedMediaType"),
    "commit: a form": ("POST", "/commit", commit(), FORM, 415, "UnsupportedMediaType"),
    "create: multipart": ("POST", "/shard", create(), {"Content-Type": "multipart/form-data; boundary=x"},
                          415, "UnsupportedMediaType"),
    "v1 commit: text/plain;charset=UTF-8": ("POST", "/v1/commit", native(),
                                            {"Content-Type": "text/plain;charset=UTF-8"}, 415,
                                            "UnsupportedMediaType"),
    "v1 commit: from evil.example": ("POST", "/v1/commit", native(), EVIL, 403, "CrossOriginRefused"),
    "tracked read from evil.example": ("GET", f"/shard/{TARGET}?agent_id=mallory", NO_BODY, EVIL, 403,
                                       "CrossOriginRefused"),
    "dashboard rollback from evil.example": ("POST", "/dashboard/rollback", {"key": TARGET, "version": 1},
                                             {**TEXT, **EVIL}, 403, "CrossOriginRefused"),
}


@pytest.mark.parametrize("method, path, body, headers, status, code", CROSS_SITE.values(), ids=CROSS_SITE.keys())
def test_cross_site_request_is_refused_and_changes_nothing(address, method, path, body, headers, status, code):
    before = snapshot(address)
    got_status, got = call(address, method, path, body, headers=headers)
    assert got_status == status, got
    assert isinstance(got, dict) and got.get("error") == code, got
    assert snapshot(address) == before
    check_good_commit(address)


def test_untyped_json_is_refused_and_typed_or_empty_same_origin_requests_are_served(address):
    """A body must say it is JSON (browsers send untyped bodies cross-site without a preflight);
    an empty POST passes untyped, as S-Bus's smoke test sends /admin/reset; the dashboard sends
    its own Origin."""
    status, got = call(address, "GET", f"/shard/{GOOD}?agent_id=plain-agent")
    assert status == 200, got
    host, port = address.rsplit(":", 1)

    def raw_post(path: str, body: bytes | None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", path, body=body)  # http.client sends no Content-Type
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    status, out = raw_post("/commit/v2", json.dumps({
        "key": GOOD, "expected_version": got["version"], "delta": "no header", "agent_id": "plain-agent"}).encode())
    assert (status, out["error"]) == (415, "UnsupportedMediaType"), out
    assert "Content-Type: application/json" in out["message"], out
    status, now = call(address, "GET", f"/shard/{GOOD}?agent_id=plain-agent")
    assert (status, now["version"], now["content"]) == (200, got["version"], got["content"])
    status, out = raw_post("/admin/reset", None)  # empty and untyped: reaches the route (403 without --admin)
    assert (status, out.get("error")) == (403, "Forbidden"), out
    # as `curl -X POST URL` sends it: no Content-Length, no Content-Type, no body
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /admin/reset HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    status, done = call(address, "POST", "/commit/v2", {
        "key": GOOD, "expected_version": got["version"], "delta": "same origin", "agent_id": "plain-agent"},
        headers={"Origin": f"http://{address}", "Content-Type": "application/json; charset=utf-8"})
    assert status == 200, done
