"""The auth core (oribus/auth/, specs/auth.md): tokens and every refusal reason, the policy
file, following the directory (rotation, retirement, revocation, a broken file), the
``oribus auth`` commands, and the decisions against a reference model written apart from
the rule engine (Hypothesis)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time

import jwt
import pytest
from auth_dirs import init_auth_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from oribus.auth import Authority, Identity, Operation, SessionOwners, decide
from oribus.auth.credential import bearer
from oribus.auth.keys import AuthDir, load_signing_key, new_signing_key, retire_key
from oribus.auth.policy import STARTER_POLICY, load_policy_text, parse_policy
from oribus.auth.revocation import load_revoked, parse_revoked, revoke
from oribus.auth.rules import Access, may_act_for
from oribus.auth.tokens import issue, parse_ttl, verify
from oribus.cli import main
from oribus.errors import InvalidRequest, PermissionDenied, Unauthenticated, error_from_dict
from oribus.metrics import AUTH_REFUSED
from oribus.types import SessionRef

POLICY = """
roles:
  team-a:
    read: ["team/a/*", "shared/*"]
    write: ["team/a/*"]
    watch: ["team/a/*"]
    history: ["team/a/*"]
    rollback: ["team/a/*"]
  ops:
    admin: true
  boss:
    read: ["*"]
    act_for: ["*"]
"""


@pytest.fixture
def authdir(tmp_path) -> AuthDir:
    return init_auth_dir(tmp_path / "auth", POLICY)


def token(d: AuthDir, agent: str = "a1", roles=("team-a",), ttl: float = 3600, now: float | None = None,
          **kw) -> str:
    kid, key = load_signing_key(d)
    return issue(key, kid, agent=agent, roles=roles, now=time.time() if now is None else now, ttl=ttl, **kw)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256(claims: dict, secret: bytes, kid: str) -> str:
    """A token MACed with ``secret`` (PyJWT itself refuses to use a public key as one)."""
    signing = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode()) + "." + b64(json.dumps(claims).encode())
    return signing + "." + b64(hmac.new(secret, signing.encode(), hashlib.sha256).digest())


def refused(authority: Authority, tok: str | None) -> str:
    with pytest.raises(Unauthenticated) as e:
        authority.authenticate(tok, "read")
    return e.value.reason


# ---- tokens ---------------------------------------------------------------------------------


def test_a_token_proves_its_agent_and_roles(authdir):
    a = Authority(authdir.root)
    ident = a.authenticate(token(authdir, "planner", ("team-a", "ops"), act_for=["w1"]))
    assert (ident.agent, ident.roles, ident.act_for) == ("planner", ("team-a", "ops"), ("w1",))
    assert ident.expires > time.time() + 3000 and ident.token_id


def test_every_refusal_names_its_reason(authdir, tmp_path):
    a = Authority(authdir.root)
    good = token(authdir)
    head, body, sig = good.split(".")
    assert refused(a, None) == "missing"
    assert refused(a, "") == "missing"
    assert refused(a, "not-a-jwt") == "malformed"
    # forged: the claims changed (another agent), the signature kept
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["sub"] = "intruder"
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert refused(a, f"{head}.{forged_body}.{sig}") == "signature"
    # a signature bit flipped
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert refused(a, f"{head}.{body}.{flipped}") == "signature"
    assert refused(a, token(authdir, ttl=10, now=time.time() - 3600)) == "expired"
    # signed by a key this bus does not hold (another directory's)
    main(["auth", "init", "--dir", str(tmp_path / "other")])
    assert refused(a, token(AuthDir(tmp_path / "other"))) == "unknown_key"
    # alg none, and HMAC keyed with the public key's bytes (the classic confusion)
    kid = load_signing_key(authdir)[0]
    unsigned = jwt.encode({"sub": "a1", "roles": ["ops"], "exp": time.time() + 60}, None, algorithm="none",
                          headers={"kid": kid})
    assert refused(a, unsigned) == "algorithm"
    pub = authdir.public_key_path(kid).read_bytes()
    assert refused(a, hs256({"iss": "oribus", "sub": "a1", "roles": ["ops"], "exp": int(time.time()) + 60,
                             "iat": int(time.time()), "jti": "x"}, pub, kid)) == "algorithm"
    assert refused(a, token(authdir, roles=("nobody",))) == "unknown_role"
    assert refused(a, token(authdir, issuer="someone-else")) == "issuer"
    assert refused(a, token(authdir, now=time.time() + 3600 * 2)[:-1] + "x") in ("signature", "malformed")


def test_a_token_without_expiry_is_refused(authdir):
    kid, key = load_signing_key(authdir)
    raw = jwt.encode({"iss": "oribus", "sub": "a1", "roles": ["team-a"], "iat": 1, "jti": "j"}, key,
                     algorithm="EdDSA", headers={"kid": kid})
    assert refused(Authority(authdir.root), raw) == "malformed"


def test_refusals_are_counted(authdir):
    child = AUTH_REFUSED.labels(reason="expired", operation="read")
    before = child.value
    refused(Authority(authdir.root), token(authdir, ttl=1, now=time.time() - 600))
    assert child.value == before + 1


def test_errors_cross_the_wire_as_themselves():
    e = Unauthenticated("credential refused (expired): x", reason="expired")
    back = error_from_dict(e.to_dict())
    assert isinstance(back, Unauthenticated) and back.reason == "expired"
    d = PermissionDenied("no", agent="a", operation="read", key="k", rule="r").to_dict()
    assert isinstance(error_from_dict(d), PermissionDenied) and error_from_dict(d).details["rule"] == "r"


def test_ttl_and_bearer_parsing():
    assert parse_ttl("24h") == 86400 and parse_ttl("90") == 90 and parse_ttl("30m") == 1800 and parse_ttl("2d") == 172800
    for bad in ("", "0", "-1h", "1w", "h"):
        with pytest.raises(InvalidRequest):
            parse_ttl(bad)
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer ") is None and bearer(None) is None


def test_verify_is_pure_over_what_it_is_given(authdir):
    kid, key = load_signing_key(authdir)
    tok = issue(key, kid, agent="a", roles=["r"], now=1000.0, ttl=100)
    keys = {kid: key.public_key()}
    # PyJWT's own clock would call this expired; the caller's ``now`` is not consulted past exp either
    with pytest.raises(Unauthenticated, match="expired"):
        verify(tok, keys, now=time.time())


# ---- the directory: rotation, retirement, revocation, reload --------------------------------


def fast(d: AuthDir) -> Authority:
    return Authority(d.root, reload_every=0.0)


def test_rotation_keeps_old_tokens_until_their_key_is_retired(authdir):
    a = fast(authdir)
    old_kid = load_signing_key(authdir)[0]
    old = token(authdir)
    assert main(["auth", "rotate", "--dir", str(authdir.root)]) == 0
    new = token(authdir)
    assert jwt.get_unverified_header(new)["kid"] != old_kid
    assert a.authenticate(old).agent == a.authenticate(new).agent == "a1"
    with pytest.raises(InvalidRequest, match="current signing key"):
        retire_key(authdir, load_signing_key(authdir)[0])
    assert main(["auth", "retire", "--dir", str(authdir.root), old_kid]) == 0
    assert refused(a, old) == "unknown_key"  # the cached verification went with the reload
    assert a.authenticate(new).agent == "a1"


def test_revocation_applies_without_restart(authdir, capsys):
    a = fast(authdir)
    tok = token(authdir)
    ident = a.authenticate(tok)
    capsys.readouterr()
    assert main(["auth", "revoke", "--dir", str(authdir.root), ident.token_id]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] == ident.token_id
    assert refused(a, tok) == "revoked"
    assert a.authenticate(token(authdir)).agent == "a1"  # other tokens unaffected


def test_the_revoked_file_drops_past_lines_and_refuses_bad_ones(tmp_path):
    path = tmp_path / "revoked"
    revoke(path, "old", 100, now=50)
    revoke(path, "forever", 0, now=50)
    assert load_revoked(path) == {"old": 100, "forever": 0}
    revoke(path, "new", 10_000, now=200)  # "old" is past its until: dropped
    assert load_revoked(path) == {"forever": 0, "new": 10_000}
    with pytest.raises(InvalidRequest, match="revoked:2"):
        parse_revoked("a 1\nno-until\n")
    with pytest.raises(InvalidRequest):
        revoke(path, "has space", 0, now=0)


def test_a_revoked_line_is_kept_while_its_token_is_still_accepted(authdir):
    """A bus accepts a token up to LEEWAY_SECONDS past its exp: the revocation must last as long."""
    now = time.time()
    tok = token(authdir, ttl=10, now=now - 15)  # exp 5 s ago: inside the leeway
    a = fast(authdir)
    ident = a.authenticate(tok)
    revoke(authdir.revoked, ident.token_id, int(ident.expires), now)
    revoke(authdir.revoked, "another", 0, now)  # rewrites the file
    assert ident.token_id in load_revoked(authdir.revoked)
    assert refused(a, tok) == "revoked"


def test_a_broken_file_keeps_the_previous_rules(authdir, caplog):
    a = fast(authdir)
    tok = token(authdir)
    ident = a.authenticate(tok)
    assert a.decide(ident, Operation.WRITE, "team/a/x").allowed
    authdir.policy.write_text("roles: [this is not a map]\n")
    assert a.authenticate(tok).agent == "a1"
    assert a.decide(ident, Operation.WRITE, "team/a/x").allowed  # previous policy kept
    assert "policy not reloaded" in caplog.text
    authdir.revoked.write_text(f"{ident.token_id}\n")  # malformed: no until
    assert a.authenticate(tok).agent == "a1"
    authdir.revoked.write_text(f"{ident.token_id} 0\n")
    assert refused(a, tok) == "revoked"
    # and then a broken revocation list does not un-revoke it
    authdir.revoked.write_text("garbage line here\n")
    assert refused(a, tok) == "revoked"


def test_a_policy_edit_applies_without_restart(authdir):
    a = fast(authdir)
    ident = a.authenticate(token(authdir))
    assert not a.decide(ident, Operation.WRITE, "team/b/x").allowed
    authdir.policy.write_text(POLICY.replace('write: ["team/a/*"]', 'write: ["team/a/*", "team/b/*"]'))
    os.utime(authdir.policy, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    a.maybe_reload()
    assert a.decide(ident, Operation.WRITE, "team/b/x").allowed


def test_a_bus_refuses_to_start_on_an_unusable_directory(tmp_path, authdir):
    with pytest.raises(InvalidRequest, match="not a directory"):
        Authority(tmp_path / "nothing")
    authdir.policy.write_text("roles: {r: {raed: ['*']}}\n")
    with pytest.raises(InvalidRequest, match="unknown fields"):
        Authority(authdir.root)


def test_init_refuses_to_overwrite_and_token_refuses_unknown_roles(authdir, capsys):
    assert main(["auth", "init", "--dir", str(authdir.root)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["auth", "token", "--dir", str(authdir.root), "--agent", "a", "--role", "nope"]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["auth", "token", "--dir", str(authdir.root), "--agent", "a", "--role", "team-a",
                 "--ttl", "2h"]) == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", out)  # the token and nothing else
    claims = jwt.decode(out, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 7200 and claims["roles"] == ["team-a"]
    assert oct(authdir.signing_key.stat().st_mode & 0o777) == "0o600"


def test_a_public_key_under_another_kid_is_refused(authdir):
    kid = load_signing_key(authdir)[0]
    authdir.public_key_path(kid).rename(authdir.public_key_path("0" * 16))
    with pytest.raises(InvalidRequest, match="holds the key"):
        Authority(authdir.root)
    new_signing_key(authdir)  # one good key does not make the bad file acceptable
    with pytest.raises(InvalidRequest, match="holds the key"):
        Authority(authdir.root)


# ---- the policy file --------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("- a\n", "one field, roles"),
    ("roles: {r: {read: 'x*'}}\n", "must be a list"),
    ("roles: {r: {read: ['a*b']}}\n", "other than at its end"),
    ("roles: {r: {read: ['']}}\n", "non-empty string"),
    ("roles: {r: {admin: 'yes'}}\n", "admin must be true or false"),
    ("roles: {r: {write: ['*'], delete: ['*']}}\n", "unknown fields"),
    ("roles: {r: [read]}\n", "must be a map"),
    ("roles: {r: {act_for: 'x'}}\n", "act_for"),
    ("users: {}\n", "one field, roles"),
    ("roles: {r: {read: [x}\n", "not valid YAML"),
])
def test_a_bad_policy_is_refused_naming_the_problem(text, message):
    with pytest.raises(InvalidRequest, match=message):
        load_policy_text(text)


def test_the_starter_policy_parses():
    p = load_policy_text(STARTER_POLICY)
    assert set(p.roles) == {"reader", "writer", "admin"} and p.roles["admin"].admin


def test_reserved_keys_are_granted_by_no_pattern():
    p = parse_policy({"roles": {"all": {"read": ["*"], "write": ["*"]}}})
    me = Identity("a", ("all",))
    assert decide(p, me, Operation.READ, "x").allowed
    assert not decide(p, me, Operation.READ, ".sbus/x").allowed
    assert not decide(p, me, Operation.WRITE, ".sbus/x").allowed


def test_a_watch_needs_a_pattern_covering_the_whole_prefix():
    p = parse_policy({"roles": {"r": {"watch": ["team/a/*", "one/key"]}}})
    me = Identity("a", ("r",))
    assert decide(p, me, Operation.WATCH, "team/a/").allowed
    assert decide(p, me, Operation.WATCH, "team/a/sub/").allowed
    assert not decide(p, me, Operation.WATCH, "team/").allowed
    assert not decide(p, me, Operation.WATCH, "").allowed
    assert not decide(p, me, Operation.WATCH, "one/key").allowed  # also covers one/key2


# ---- the decisions against a reference model ----------------------------------------------------

# a small universe of keys, so that patterns and the keys asked about often meet
KEYS = st.sampled_from(["a", "ab", "a/b", "team/a/x", "team/a/", "team/b/x", "team/", "t"])
PATTERNS = st.one_of(KEYS, KEYS.map(lambda k: k + "*"), st.just("*"))
OPS = ["read", "write", "watch", "history", "rollback"]
ROLE = st.fixed_dictionaries({}, optional={**{op: st.lists(PATTERNS, max_size=3) for op in OPS},
                                           "admin": st.booleans(),
                                           "act_for": st.lists(st.sampled_from(["a1", "a2", "*"]), max_size=2)})
POLICIES = st.dictionaries(st.sampled_from(["r1", "r2", "r3"]), ROLE, max_size=3)
IDENTITIES = st.builds(Identity, st.sampled_from(["a1", "a2", "a3"]),
                       st.lists(st.sampled_from(["r1", "r2", "r3", "ghost"]), max_size=3).map(tuple),
                       st.lists(st.sampled_from(["a1", "a2", "*"]), max_size=1).map(tuple))


def model_allows(roles: dict, identity: Identity, op: str, key: str) -> bool:
    """The rules of specs/auth.md §4 read literally, with regular expressions."""
    if op != "admin" and key.startswith(".sbus/"):
        return False
    for name in identity.roles:
        role = roles.get(name)
        if role is None:
            continue
        if op == "admin":
            if role.get("admin"):
                return True
            continue
        for pattern in role.get(op, []):
            if pattern.endswith("*"):
                rx = re.escape(pattern[:-1]) + ".*"
                # a watch on prefix P sees every key P + anything: the pattern must match them all
                if op == "watch" and re.fullmatch(rx, key) and (pattern[:-1] == "" or key.startswith(pattern[:-1])):
                    return True
                if op != "watch" and re.fullmatch(rx, key, re.S):
                    return True
            elif op != "watch" and pattern == key:
                return True
    return False


def model_acts_for(roles: dict, identity: Identity, agent: str) -> bool:
    grants = set(identity.act_for)
    for name in identity.roles:
        grants |= set(roles.get(name, {}).get("act_for", []))
    return agent == identity.agent or agent in grants or "*" in grants


@settings(max_examples=500, deadline=None)
@given(POLICIES, IDENTITIES, st.sampled_from([*OPS, "admin"]), st.one_of(KEYS, st.just(".sbus/x")),
       st.sampled_from(["a1", "a2", "a3"]))
def test_decisions_agree_with_the_reference_model(roles, identity, op, key, agent):
    policy = parse_policy({"roles": roles})
    decision = decide(policy, identity, Operation(op), key)
    assert decision.allowed == model_allows(roles, identity, op, key), decision.rule
    # the bus's hot path: the roles' grants merged and compiled (rules.Access) agree too
    assert Access(policy, identity.roles, Operation(op)).allows(key) == decision.allowed
    assert may_act_for(policy, identity, agent) == model_acts_for(roles, identity, agent)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a1", "a2", "boss"]), st.sampled_from(["a1", "a2"]),
                          st.sampled_from(["s1", "s2"])), max_size=30))
def test_a_session_belongs_to_the_first_identity_that_used_it(steps):
    owners = SessionOwners()
    model: dict[tuple[str, str], str] = {}
    for who, agent, sid in steps:
        session = SessionRef(agent, sid)
        expect = model.setdefault((agent, sid), who)
        got = owners.claim(Identity(who, ("r",)), session)
        assert got == (None if expect == who else expect)
        assert owners.visible(Identity(who, ("r",)), session) == (expect == who)


def test_session_owners_are_bounded():
    owners = SessionOwners(capacity=2)
    for i in range(3):
        owners.claim(Identity(f"o{i}", ()), SessionRef("a", str(i)))
    assert len(owners) == 2 and owners.owner(SessionRef("a", "0")) is None
