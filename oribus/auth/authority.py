"""``Authority``: one auth directory loaded and followed, as a bus uses it (specs/auth.md §3).

It holds the verification keys, the policy, the revoked ids and the issuer, and answers
two questions: who does this token prove (``authenticate``, cached by the token until its
``exp``), and may that identity do this (``access``: the grants of its roles for one
operation merged and compiled once, ``rules.Access``, then a set lookup and one
``str.startswith`` per key; ``decide`` names the rule when it refuses; the refusals are counted in
``oribus_auth_refused_total`` and logged on ``oribus.auth`` as
``auth refused agent=… op=… key=… rule=…``).

Following the directory: at most once per ``reload_every`` seconds a call compares the
files' sizes and modification times with the last load, and reloads what changed — a
rotated or retired key, a policy edit, a revocation take effect within a second, without a
restart. A file that does not parse is logged and ignored: the previous keys, policy and
revocations stay (fail closed; a broken revocation list must not un-revoke a token). The
cache of verified tokens (by the token itself, until its ``exp``) and the compiled grants
are emptied on every reload.

Cluster mode (``oribus.auth.published``): the same state comes from the cluster's etcd
instead of a directory. A bus's follower hands each snapshot it reads to
``apply_published``; from the first complete one on, the authority stops following the
directory and follows etcd alone. A part of a snapshot that does not parse — or a
snapshot with no auth data left at all — is refused the same way, loudly (an ERROR per
change, ``oribus_auth_stale{part}`` at 1) and the last good part stays in force: an
unreadable policy or revocation list in etcd never opens the bus.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from oribus.auth.keys import AuthDir, load_verification_keys, parse_config
from oribus.auth.policy import Policy, load_policy_text
from oribus.auth.published import Published, parse_snapshot
from oribus.auth.revocation import load_revoked
from oribus.auth.rules import Access, Decision, Operation, decide, may_act_for
from oribus.auth.tokens import (
    DEFAULT_ISSUER,
    LEEWAY_SECONDS,
    Identity,
    verify,
)
from oribus.errors import InvalidRequest, PermissionDenied, Unauthenticated
from oribus.metrics import AUTH_REFUSED, AUTH_STALE

log = logging.getLogger("oribus.auth")

RELOAD_EVERY_SECONDS = 1.0  # how often a bus looks for changed auth files
_CACHE_MAX = 100_000  # verified tokens kept; past it the cache starts afresh


def load_config(d: AuthDir) -> dict[str, Any]:
    """``config.yaml``: ``issuer`` and ``default_ttl`` (seconds), with their defaults."""
    try:
        text: str | None = d.config.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
    return parse_config(text, str(d.config))


def _fingerprint(paths: list[Path]) -> tuple:
    out: list[tuple[str, int | None, int | None]] = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append((str(p), None, None))
    return tuple(out)


class Authority:
    """The auth directory ``root``, loaded now (InvalidRequest if it is not usable) and
    followed on use. ``clock``: seconds since the epoch (tests pass their own)."""

    def __init__(self, root: str | Path, *, clock: Callable[[], float] = time.time,
                 reload_every: float = RELOAD_EVERY_SECONDS) -> None:
        self._init_state(clock, reload_every)
        self.dir = AuthDir(Path(root))
        self.source = f"directory {self.dir.root}"  # until apply_published takes a snapshot of etcd
        if not self.dir.root.is_dir():
            raise InvalidRequest(f"--auth {root}: not a directory (create it with `oribus auth init --dir {root}`)")
        self._load(initial=True)

    def _init_state(self, clock: Callable[[], float], reload_every: float) -> None:
        self.clock = clock
        self.reload_every = reload_every
        self.keys: dict[str, Ed25519PublicKey] = {}
        self.policy = Policy()
        self.revoked: dict[str, int] = {}
        self.issuer = DEFAULT_ISSUER
        # token -> identity: a str caches its hash, so a connection's later calls cost one lookup
        self._cache: dict[str, Identity] = {}
        # (roles, operation) -> what they are granted, compiled (rules.Access); emptied on reload
        self._access: dict[tuple[tuple[str, ...], Operation], Access] = {}
        self._seen: dict[str, tuple] = {}
        self._checked_at = 0.0
        self.reloads = 0
        self.source = ""  # what the rules come from: "directory D", or "etcd"
        self._published: dict[str, tuple] = {}  # part -> the bytes last applied (or refused) from etcd
        self.stale: dict[str, str] = {}  # part -> why etcd's is refused and the last good one is kept

    # ---- following the directory ------------------------------------------------------------

    def _parts(self) -> dict[str, tuple[list[Path], Callable[[], None]]]:
        d = self.dir
        return {
            "config": ([d.config], self._load_config),
            "keys": ([d.keys, *sorted(d.keys.glob("*.pub"))] if d.keys.is_dir() else [d.keys], self._load_keys),
            "policy": ([d.policy], self._load_policy),
            "revoked": ([d.revoked], self._load_revoked),
        }

    def _load_config(self) -> None:
        self.issuer = load_config(self.dir)["issuer"]

    def _load_keys(self) -> None:
        self.keys = load_verification_keys(self.dir)

    def _load_policy(self) -> None:
        try:
            text = self.dir.policy.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InvalidRequest(f"no policy at {self.dir.policy}") from None
        self.policy = load_policy_text(text, str(self.dir.policy))

    def _load_revoked(self) -> None:
        self.revoked = load_revoked(self.dir.revoked)

    def _load(self, initial: bool = False) -> None:
        changed = False
        for name, (paths, load) in self._parts().items():
            fp = _fingerprint(paths)
            if self._seen.get(name) == fp:
                continue
            try:
                load()
            except (InvalidRequest, OSError) as e:
                if initial:
                    raise InvalidRequest(f"--auth {self.dir.root}: {e}") from None
                log.error("auth: %s not reloaded, the previous one stays: %s", name, e)
                self._seen[name] = fp  # logged once per change of the file, not once a second
                continue
            self._seen[name] = fp
            changed = True
            if not initial:
                log.warning("auth: %s reloaded from %s", name, self.dir.root)
        if changed:
            self._cache.clear()
            self._access.clear()
            self.reloads += 1

    def maybe_reload(self) -> None:
        """Reload what changed, at most once per ``reload_every`` seconds (from etcd: never
        here; the follower calls ``apply_published``)."""
        now = time.monotonic()
        if now - self._checked_at >= self.reload_every and not self.follows_etcd:
            self._checked_at = now
            self._load()

    # ---- following etcd (cluster mode) ------------------------------------------------------

    @property
    def follows_etcd(self) -> bool:
        return self.source == "etcd"

    @classmethod
    def from_published(cls, snapshot: dict[str, bytes], *, clock: Callable[[], float] = time.time) -> Authority:
        """An authority on the cluster's auth data (``oribus.auth.published``); InvalidRequest
        if there is none or any part of it does not parse (a bus does not start on it)."""
        published = parse_snapshot(snapshot)
        if not published.present:
            raise InvalidRequest("no auth data in etcd (publish it with `oribus auth push --dir D --etcd ...`)")
        if published.errors:
            raise InvalidRequest("the auth data in etcd is not usable: " + "; ".join(
                f"{part}: {why}" for part, why in published.errors.items()))
        self = cls.__new__(cls)
        self._init_state(clock, RELOAD_EVERY_SECONDS)
        self.dir = None  # type: ignore[assignment]  # never read when following etcd
        self.source = "etcd"
        self.apply_published(snapshot, parsed=published)
        return self

    def apply_published(self, snapshot: dict[str, bytes], *, parsed: Published | None = None) -> bool:
        """Install what changed in ``snapshot`` (every key under the cluster's ``auth/``), part
        by part; a part that does not parse is refused (logged, counted as stale) and the last
        good one stays. Returns whether the rules in force changed."""
        published = parsed or parse_snapshot(snapshot)
        if not published.present:
            if self.follows_etcd:  # a deleted prefix must not open the bus, nor silently keep it
                self._refuse_part("all", "no auth data in etcd any more (deleted?)", ("gone",))
            return False
        if not published.complete:  # half deleted: its revocations may be half gone too
            why = "; ".join(published.errors[p] for p in ("policy", "keys") if p in published.errors)
            self._refuse_part("all", f"incomplete, none of it is used: {why}", tuple(sorted(published.raw.items())))
            return False
        if not self.follows_etcd and published.errors:
            for part, why in published.errors.items():
                self._refuse_part(part, why, published.raw[part])
            log.critical("auth: the auth data published in etcd is not usable; still following %s", self.source)
            return False
        self._clear_stale("all")
        if published.unknown and published.raw != self._published:
            log.warning("auth: ignoring keys not understood under auth/ in etcd: %s", published.unknown[:5])
        values = {"config": published.issuer, "keys": published.keys, "policy": published.policy,
                  "revoked": published.revoked}
        changed = False
        for part in Published.PARTS:
            raw = published.raw[part]
            if part in published.errors:
                self._refuse_part(part, published.errors[part], raw)
                continue
            self._clear_stale(part)
            if self._published.get(part) == raw and self.follows_etcd:
                continue
            setattr(self, {"config": "issuer"}.get(part, part), values[part])
            self._published[part] = raw
            changed = True
        if not self.follows_etcd:
            log.warning("auth: following the auth data in etcd from now on (not %s)", self.source)
            self.source = "etcd"
        if changed:
            self._cache.clear()
            self._access.clear()
            self.reloads += 1
            log.warning("auth: reloaded from etcd")
        return changed

    def _refuse_part(self, part: str, why: str, raw: tuple) -> None:
        if self._published.get(f"refused {part}") != raw:  # once per change in etcd, not per read
            self._published[f"refused {part}"] = raw
            log.error("auth: %s in etcd refused, the last good one stays in force: %s", part, why)
        self.stale[part] = why
        AUTH_STALE.labels(part=part).set(1)

    def _clear_stale(self, part: str) -> None:
        if self.stale.pop(part, None) is not None:
            log.warning("auth: %s in etcd is usable again", part)
        self._published.pop(f"refused {part}", None)
        AUTH_STALE.labels(part=part).set(0)

    # ---- the two questions -------------------------------------------------------------------

    def authenticate(self, token: str | None, operation: str = "",
                     certificate: tuple[str, tuple[str, ...]] | None = None) -> Identity:
        """The identity ``token`` proves, or Unauthenticated (counted and logged). Without a
        token, ``certificate`` — (agent, roles) of a client certificate ``CN=agent:NAME`` the
        TLS handshake verified — is the identity, if its roles are in the policy."""
        self.maybe_reload()
        if not token and certificate is not None:
            return self._certificate_identity(certificate, operation)
        hit = self._cache.get(token) if token else None
        if hit is not None and hit.expires + LEEWAY_SECONDS >= self.clock():
            return hit
        try:
            identity = verify(token or "", self.keys, now=self.clock(), issuer=self.issuer,
                              revoked=self.revoked, roles=self.policy.roles)
        except Unauthenticated as e:
            self.count_refusal(e.reason, operation)
            log.warning("auth refused agent=- op=%s key=- rule=%s", operation or "-", e.message)
            raise
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = identity  # type: ignore[index]  # verify refused an empty one
        return identity

    def _certificate_identity(self, certificate: tuple[str, tuple[str, ...]], operation: str) -> Identity:
        agent, roles = certificate
        unknown = [r for r in roles if r not in self.policy.roles]
        if not roles or unknown:
            raise self.unauthenticated("unknown_role", operation, f"the certificate of agent {agent!r} names roles "
                                       f"not in the policy: {unknown or 'none'}", agent)
        return Identity(agent, roles)

    def decide(self, identity: Identity, operation: Operation, key: str = "") -> Decision:
        return decide(self.policy, identity, operation, key)

    def may_act_for(self, identity: Identity, agent: str) -> bool:
        return may_act_for(self.policy, identity, agent)

    def access(self, identity: Identity, operation: Operation) -> Access:
        """What ``identity``'s roles are granted for ``operation`` (rules.Access), compiled once
        per set of roles and operation until the next reload."""
        memo = (identity.roles, operation)
        hit = self._access.get(memo)
        if hit is None:
            if len(self._access) >= _CACHE_MAX:
                self._access.clear()
            hit = self._access[memo] = Access(self.policy, identity.roles, operation)
        return hit

    def allowed(self, identity: Identity, operation: Operation, key: str = "") -> bool:
        """``decide(...).allowed``, through the compiled ``access``."""
        return self.access(identity, operation).allows(key)

    def require(self, identity: Identity, operation: Operation, key: str = "", *, op: str = "") -> None:
        """PermissionDenied (counted and logged) unless ``identity`` may do ``operation`` on
        ``key``. ``op``: the bus operation asked for, for the count and the log."""
        if not self.access(identity, operation).allows(key):
            raise self.refusal(identity, operation, key, op)

    def refusal(self, identity: Identity, operation: Operation, key: str, op: str = "") -> PermissionDenied:
        """The PermissionDenied for a refused ``operation`` on ``key``, naming the rule
        (``decide``), counted and logged."""
        return self.denied(identity, op or operation.value, key, decide(self.policy, identity, operation, key).rule)

    def denied(self, identity: Identity, op: str, key: str, rule: str) -> PermissionDenied:
        """The PermissionDenied to raise for a refusal, counted and logged."""
        self.count_refusal("denied", op)
        log.warning("auth refused agent=%s op=%s key=%s rule=%s", identity.agent, op, key or "-", rule)
        return PermissionDenied(f"{identity.agent} may not {op} {key!r}: {rule}" if key else
                                f"{identity.agent} may not {op}: {rule}",
                                agent=identity.agent, operation=op, key=key, rule=rule)

    def unauthenticated(self, reason: str, op: str, message: str, agent: str = "-") -> Unauthenticated:
        self.count_refusal(reason, op)
        log.warning("auth refused agent=%s op=%s key=- rule=%s", agent, op or "-", message)
        return Unauthenticated(f"credential refused ({reason}): {message}", reason=reason)

    @staticmethod
    def count_refusal(reason: str, operation: str) -> None:
        AUTH_REFUSED.labels(reason=reason, operation=operation or "-").inc()
