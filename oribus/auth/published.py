"""The auth data of a cluster, as kept in etcd (specs/auth.md §3, "Cluster mode").

In cluster mode the buses do not each read an auth directory: ``oribus auth push --dir D
--etcd E`` stores what a bus needs from ``D`` under the cluster's prefix, and every bus
follows it there. The layout, under ``/oribus/<cluster>/auth/`` (the names below are
relative to it; values are bytes)::

    config           D/config.yaml's text (issuer, default_ttl); absent: the defaults
    policy           D/policy.yaml's text (``policy.py``)
    keys/<kid>       one verification key: SubjectPublicKeyInfo PEM, named by its key id
                     (``keys.key_id``). The signing key never leaves ``D``.
    revoked/<jti>    one revoked token id; the value is its ``until`` in decimal (the token's
                     ``exp``, 0: kept for good), as a line of ``D/revoked`` says

One key per revocation, so ``oribus auth revoke --etcd`` is one put and two operators
revoking at once cannot lose either's. ``push`` replaces config, policy and keys in one
etcd transaction (a bus never sees the policy of one push with the keys of another) and
only adds revocations: a push from a directory that does not know a revocation made in
etcd must not lift it.

Reading a snapshot (every key under the prefix, at one revision) is ``parse_snapshot``:
each part parses on its own and a part that does not is reported, never guessed at — the
bus keeps the last good one (``Authority.apply_published``). A snapshot with neither a
policy nor a key is *not published* (the cluster has no auth data yet); one with only
some of them is broken, as a half-deleted prefix would be: none of it is used (its
revocations may be half gone too). Nothing here does IO: the
etcd side is ``oribus.meta.auth_store``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from oribus.auth.keys import AuthDir, key_id, load_verification_keys, parse_config
from oribus.auth.policy import Policy, load_policy_text
from oribus.auth.revocation import load_revoked
from oribus.errors import InvalidRequest

PREFIX = "auth/"  # under the cluster's prefix, /oribus/<cluster>/
CONFIG = "config"
POLICY = "policy"
KEYS = "keys/"
REVOKED = "revoked/"
MAX_TOKEN_ID = 256  # as revocation.revoke allows


@dataclass
class Published:
    """What a snapshot holds, part by part: each is the parsed value, or None with the
    reason in ``errors[part]``. ``present``: whether the cluster has auth data at all."""

    present: bool
    complete: bool = False  # a policy and at least one key: else nothing of it is used
    issuer: str | None = None
    keys: dict[str, Ed25519PublicKey] | None = None
    policy: Policy | None = None
    revoked: dict[str, int] | None = None
    errors: dict[str, str] = field(default_factory=dict)  # part -> why it was not read
    unknown: list[str] = field(default_factory=list)  # names not understood (ignored)
    raw: dict[str, tuple] = field(default_factory=dict)  # part -> its bytes, to tell a change

    PARTS: ClassVar[tuple[str, ...]] = ("config", "keys", "policy", "revoked")


def _text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{where} is not UTF-8 text") from None


def parse_issuer(raw: bytes | None, where: str = "auth/config") -> str:
    """The issuer of a ``config.yaml`` text (absent: the default)."""
    return str(parse_config(None if raw is None else _text(raw, where), where)["issuer"])


def parse_key(kid: str, raw: bytes) -> Ed25519PublicKey:
    where = f"auth/keys/{kid}"
    try:
        key = serialization.load_pem_public_key(raw)
    except ValueError as e:
        raise InvalidRequest(f"{where} is not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidRequest(f"{where} is not an Ed25519 key")
    if key_id(key) != kid:
        raise InvalidRequest(f"{where} holds the key {key_id(key)}, not {kid}")
    return key


def parse_until(jti: str, raw: bytes) -> int:
    text = raw.decode("ascii", "replace").strip()
    if not jti or len(jti) > MAX_TOKEN_ID or any(c.isspace() for c in jti):
        raise InvalidRequest(f"auth/revoked/{jti!r}: not a token id")
    if not text.isdigit() or len(text) > 12:
        raise InvalidRequest(f"auth/revoked/{jti}: the value is the token's exp in seconds (0: for good), "
                             f"not {text[:40]!r}")
    return int(text)


def parse_snapshot(snapshot: Mapping[str, bytes]) -> Published:
    """The parts of ``snapshot`` (names relative to ``PREFIX``), each parsed on its own."""
    policy_raw = snapshot.get(POLICY)
    key_items = {name[len(KEYS):]: raw for name, raw in snapshot.items() if name.startswith(KEYS)}
    out = Published(present=policy_raw is not None or bool(key_items),
                    complete=policy_raw is not None and bool(key_items))
    if not out.present:
        return out
    try:
        out.issuer = parse_issuer(snapshot.get(CONFIG))
    except InvalidRequest as e:
        out.errors["config"] = e.message
    try:
        if policy_raw is None:
            raise InvalidRequest("auth/policy is missing (keys are published without a policy)")
        out.policy = load_policy_text(_text(policy_raw, "auth/policy"), "auth/policy")
    except InvalidRequest as e:
        out.errors["policy"] = e.message
    try:
        if not key_items:
            raise InvalidRequest("no verification key under auth/keys/ (a policy is published without keys)")
        out.keys = {kid: parse_key(kid, raw) for kid, raw in sorted(key_items.items())}
    except InvalidRequest as e:
        out.errors["keys"] = e.message
    try:
        out.revoked = {name[len(REVOKED):]: parse_until(name[len(REVOKED):], raw)
                       for name, raw in snapshot.items() if name.startswith(REVOKED)}
    except InvalidRequest as e:
        out.errors["revoked"] = e.message
    # written by something newer, or by hand: said in the log, the rest is used
    out.unknown = sorted(n for n in snapshot if n not in (CONFIG, POLICY) and not n.startswith((KEYS, REVOKED)))
    out.raw = {
        "config": (snapshot.get(CONFIG),),
        "keys": tuple(sorted(key_items.items())),
        "policy": (policy_raw,),
        "revoked": tuple(sorted((n, v) for n, v in snapshot.items() if n.startswith(REVOKED))),
    }
    return out


@dataclass(frozen=True)
class Push:
    """What ``oribus auth push`` writes: config, policy and keys (replacing what etcd holds)
    and the revocations to add."""

    replace: dict[str, bytes]  # CONFIG (if D has one), POLICY, KEYS + kid
    revoked: dict[str, bytes]  # REVOKED + jti -> until


def dir_push(d: AuthDir) -> Push:
    """What ``d`` publishes; InvalidRequest naming the file if any of it is unusable (then
    nothing is written: a bus must never follow half a directory)."""
    if not d.root.is_dir():
        raise InvalidRequest(f"{d.root} is not an auth directory (create it with `oribus auth init --dir {d.root}`)")
    replace: dict[str, bytes] = {}
    if d.config.exists():
        raw = d.config.read_bytes()
        parse_issuer(raw, str(d.config))
        replace[CONFIG] = raw
    try:
        policy_raw = d.policy.read_bytes()
    except FileNotFoundError:
        raise InvalidRequest(f"no policy at {d.policy}") from None
    load_policy_text(_text(policy_raw, str(d.policy)), str(d.policy))
    replace[POLICY] = policy_raw
    for kid in load_verification_keys(d):
        replace[KEYS + kid] = d.public_key_path(kid).read_bytes()
    revoked = {REVOKED + jti: str(until).encode() for jti, until in load_revoked(d.revoked).items()}
    return Push(replace, revoked)
