"""``Authority``: one auth directory loaded and followed, as a bus uses it (specs/auth.md §3).

It holds the verification keys, the policy, the revoked ids and the issuer, and answers
two questions: who does this token prove (``authenticate``, cached), and may that identity
do this (``decide`` with the current policy; the refusals are counted in
``oribus_auth_refused_total`` and logged on ``oribus.auth`` as
``auth refused agent=… op=… key=… rule=…``).

Following the directory: at most once per ``reload_every`` seconds a call compares the
files' sizes and modification times with the last load, and reloads what changed — a
rotated or retired key, a policy edit, a revocation take effect within a second, without a
restart. A file that does not parse is logged and ignored: the previous keys, policy and
revocations stay (fail closed; a broken revocation list must not un-revoke a token). The
cache of verified tokens (by the token itself, until its ``exp``) is emptied on every
reload.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from oribus.auth.keys import AuthDir, load_verification_keys
from oribus.auth.policy import Policy, load_policy_text
from oribus.auth.revocation import load_revoked
from oribus.auth.rules import Decision, Operation, decide, may_act_for
from oribus.auth.tokens import (
    DEFAULT_ISSUER,
    DEFAULT_TTL_SECONDS,
    LEEWAY_SECONDS,
    Identity,
    parse_ttl,
    verify,
)
from oribus.errors import InvalidRequest, PermissionDenied, Unauthenticated
from oribus.metrics import AUTH_REFUSED

log = logging.getLogger("oribus.auth")

RELOAD_EVERY_SECONDS = 1.0  # how often a bus looks for changed auth files
_CACHE_MAX = 100_000  # verified tokens kept; past it the cache starts afresh


def load_config(d: AuthDir) -> dict[str, Any]:
    """``config.yaml``: ``issuer`` and ``default_ttl`` (seconds), with their defaults."""
    try:
        data = yaml.safe_load(d.config.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        data = {}
    except yaml.YAMLError as e:
        raise InvalidRequest(f"{d.config} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or set(data) - {"issuer", "default_ttl"}:
        raise InvalidRequest(f"{d.config}: the fields are issuer and default_ttl")
    issuer = data.get("issuer", DEFAULT_ISSUER)
    if not isinstance(issuer, str) or not issuer:
        raise InvalidRequest(f"{d.config}: issuer must be a non-empty string")
    ttl = data.get("default_ttl", DEFAULT_TTL_SECONDS)
    return {"issuer": issuer, "default_ttl": parse_ttl(str(ttl))}


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
        self.dir = AuthDir(Path(root))
        self.clock = clock
        self.reload_every = reload_every
        self.keys: dict[str, Ed25519PublicKey] = {}
        self.policy = Policy()
        self.revoked: dict[str, int] = {}
        self.issuer = DEFAULT_ISSUER
        # token -> identity: a str caches its hash, so a connection's later calls cost one lookup
        self._cache: dict[str, Identity] = {}
        # (roles, operation, key) -> allowed: the decisions made since the last reload
        self._decided: dict[tuple[tuple[str, ...], Operation, str], bool] = {}
        self._seen: dict[str, tuple] = {}
        self._checked_at = 0.0
        self.reloads = 0
        if not self.dir.root.is_dir():
            raise InvalidRequest(f"--auth {root}: not a directory (create it with `oribus auth init --dir {root}`)")
        self._load(initial=True)

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
            self._decided.clear()
            self.reloads += 1

    def maybe_reload(self) -> None:
        """Reload what changed, at most once per ``reload_every`` seconds."""
        now = time.monotonic()
        if now - self._checked_at >= self.reload_every:
            self._checked_at = now
            self._load()

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

    def allowed(self, identity: Identity, operation: Operation, key: str = "") -> bool:
        """``decide(...).allowed``, remembered until the next reload: a decision depends only
        on the roles, the operation and the key, and agents ask about the same keys again."""
        memo = (identity.roles, operation, key)
        hit = self._decided.get(memo)
        if hit is None:
            if len(self._decided) >= _CACHE_MAX:
                self._decided.clear()
            hit = self._decided[memo] = decide(self.policy, identity, operation, key).allowed
        return hit

    def require(self, identity: Identity, operation: Operation, key: str = "", *, op: str = "") -> None:
        """PermissionDenied (counted and logged) unless ``identity`` may do ``operation`` on
        ``key``. ``op``: the bus operation asked for, for the count and the log."""
        if not self.allowed(identity, operation, key):
            raise self.denied(identity, op or operation.value, key, decide(self.policy, identity, operation, key).rule)

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
