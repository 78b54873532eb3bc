"""The cluster's auth data as a bus reads it (oribus.auth.published, Authority.apply_published;
specs/auth.md §3): each part parsed on its own, a part that does not parse refused with the
last good one kept in force, a deleted prefix never opening the bus, a bus on a directory
switching to etcd at the first complete push. The etcd side runs in
tests/e2e/test_auth_cluster.py."""

from __future__ import annotations

import time

import pytest
from auth_dirs import init_auth_dir

from oribus.auth import Authority, Operation
from oribus.auth.keys import AuthDir, load_signing_key, new_signing_key
from oribus.auth.published import dir_push, parse_snapshot
from oribus.auth.tokens import issue
from oribus.errors import InvalidRequest, Unauthenticated

POLICY = 'roles:\n  team-a:\n    read: ["team/a/*"]\n'


@pytest.fixture
def authdir(tmp_path) -> AuthDir:
    return init_auth_dir(tmp_path / "auth", POLICY)


def snapshot(d: AuthDir) -> dict[str, bytes]:
    push = dir_push(d)
    return {**push.replace, **push.revoked}


def token(d: AuthDir, agent: str = "a1", token_id: str | None = None) -> str:
    kid, key = load_signing_key(d)
    return issue(key, kid, agent=agent, roles=["team-a"], now=time.time(), ttl=3600, token_id=token_id)


def refused(a: Authority, tok: str) -> str:
    with pytest.raises(Unauthenticated) as e:
        a.authenticate(tok, "read")
    return e.value.reason


def test_a_directory_publishes_its_public_keys_policy_and_config_never_the_signing_key(authdir):
    snap = snapshot(authdir)
    kid = load_signing_key(authdir)[0]
    assert sorted(snap) == ["config", f"keys/{kid}", "policy"]
    assert b"PRIVATE" not in b"".join(snap.values())
    published = parse_snapshot(snap)
    assert published.present and not published.errors and published.issuer == "oribus"
    assert parse_snapshot({}).present is False


def test_every_part_is_checked_on_its_own(authdir):
    snap = snapshot(authdir)
    kid = load_signing_key(authdir)[0]
    bad = {**snap, "policy": b"roles: [x", f"keys/{'0' * 16}": snap[f"keys/{kid}"], "revoked/t1": b"soon",
           "config": b"issuer: ''\n", "surprise": b"1"}
    published = parse_snapshot(bad)
    assert set(published.errors) == {"policy", "keys", "revoked", "config"}
    assert "holds the key" in published.errors["keys"]  # a key stored under another key's id
    assert published.unknown == ["surprise"]
    only_keys = {n: v for n, v in snap.items() if n.startswith("keys/")}
    assert "policy is missing" in parse_snapshot(only_keys).errors["policy"]
    assert "no verification key" in parse_snapshot({"policy": snap["policy"]}).errors["keys"]


def test_a_bus_does_not_start_on_unusable_data(authdir):
    snap = snapshot(authdir)
    with pytest.raises(InvalidRequest, match="policy"):
        Authority.from_published({**snap, "policy": b"roles: 3\n"})
    with pytest.raises(InvalidRequest, match="no auth data"):
        Authority.from_published({})


def test_revocations_apply_and_a_broken_part_keeps_the_last_good_one(authdir, caplog):
    snap = snapshot(authdir)
    a = Authority.from_published(snap)
    tok = token(authdir, token_id="t1")
    assert a.authenticate(tok).agent == "a1"
    snap["revoked/t1"] = b"0"
    assert a.apply_published(snap)
    assert refused(a, tok) == "revoked"  # the cache of verified tokens was emptied
    # a revocation list that does not parse: the last good one (t1 revoked) stays
    assert not a.apply_published({**snap, "revoked/t2": b"not a number"})
    assert a.stale == {"revoked": "auth/revoked/t2: the value is the token's exp in seconds (0: for good), "
                                  "not 'not a number'"}
    assert refused(a, tok) == "revoked"
    assert "revoked in etcd refused, the last good one stays in force" in caplog.text
    # the policy edited while the revocations are broken: the policy applies, t1 stays revoked
    a.apply_published({**snap, "revoked/t2": b"x", "policy": b'roles:\n  team-a:\n    read: ["*"]\n'})
    assert a.allowed(a.authenticate(token(authdir, "a2")), Operation.READ, "team/b/x")
    assert refused(a, tok) == "revoked"
    a.apply_published(snap)
    assert a.stale == {}


def test_auth_data_deleted_from_etcd_keeps_the_rules_in_force(authdir, caplog):
    snap = snapshot(authdir)
    a = Authority.from_published({**snap, "revoked/t1": b"0"})
    tok = token(authdir, token_id="t1")
    assert not a.apply_published({})  # the whole prefix deleted
    assert "all" in a.stale and refused(a, tok) == "revoked"
    assert a.authenticate(token(authdir, token_id="t9")).agent == "a1"
    # the keys deleted (and the revocation with them): none of that snapshot is used
    assert not a.apply_published({n: v for n, v in snap.items() if not n.startswith("keys/")})
    assert "incomplete" in a.stale["all"]
    assert refused(a, tok) == "revoked"
    assert a.authenticate(token(authdir, token_id="t8")).agent == "a1"


def test_a_bus_on_a_directory_switches_to_etcd_at_the_first_complete_push(authdir, tmp_path):
    a = Authority(authdir.root, reload_every=0.0)
    old = token(authdir)
    assert a.authenticate(old).agent == "a1"
    snap = snapshot(authdir)
    assert not a.apply_published({**snap, "policy": b"roles: 3\n"})  # broken: stays on the directory
    assert a.source.startswith("directory") and "policy" in a.stale
    new_signing_key(authdir)  # a rotation in the directory, then the old key retired in etcd
    fresh = snapshot(authdir)
    old_kid = next(n for n in snap if n.startswith("keys/"))
    del fresh[old_kid]
    assert a.apply_published(fresh)
    assert a.source == "etcd" and a.stale == {}
    assert refused(a, old) == "unknown_key"
    assert a.authenticate(token(authdir)).agent == "a1"
    # from now on the directory is not followed: a revocation there does nothing on this bus
    (authdir.root / "revoked").write_text(f"{a.authenticate(token(authdir, token_id='t5')).token_id} 0\n")
    a.maybe_reload()
    assert a.authenticate(token(authdir, token_id="t5")).agent == "a1"
