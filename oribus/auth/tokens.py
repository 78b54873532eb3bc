"""Tokens: JWTs signed with Ed25519 (``alg: EdDSA``, RFC 8037) through PyJWT (specs/auth.md §2).

A token is ``base64url(header).base64url(claims).base64url(signature)``::

    header   {"alg": "EdDSA", "typ": "JWT", "kid": "<16 hex: the key that signed it>"}
    claims   {"iss": issuer, "sub": agent, "roles": [role, ...], "act_for": [agent|"*", ...]
              (optional), "iat": s, "exp": s, "jti": token id, "nbf": s (optional)}

``verify`` checks, in this order, each refusal an ``Unauthenticated`` whose ``reason`` says
which: well-formed (``malformed``); ``alg`` is EdDSA, whatever else the token claims
(``algorithm`` — ``none`` and HMAC are refused before any key is chosen); ``kid`` names a
loaded key (``unknown_key``); the signature (``signature``); ``iss`` (``issuer``); ``exp``
with ``LEEWAY_SECONDS`` (``expired``; a token without ``exp`` is ``malformed``); ``nbf``
(``not_yet_valid``); ``jti`` not revoked (``revoked``); every role in the policy
(``unknown_role``). Nothing here reads a file or a clock of its own: keys, revocations,
roles and ``now`` are passed in.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from oribus.errors import InvalidRequest, Unauthenticated
from oribus.types import parse_duration

ALGORITHM = "EdDSA"
DEFAULT_ISSUER = "oribus"
DEFAULT_TTL_SECONDS = 24 * 3600
# Clock difference tolerated between the issuer and a bus on ``exp``/``nbf``: tokens live
# hours, and an expiry a few seconds late matters less than refusing a fresh token.
LEEWAY_SECONDS = 30.0
MAX_NAME = 256  # an agent name is a SessionRef's agent: at most 256 characters


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified credential says the caller is."""

    agent: str  # ``sub``: the agent name requests must carry
    roles: tuple[str, ...]
    act_for: tuple[str, ...] = ()  # other agents (or "*") this identity may name in requests
    token_id: str = ""  # ``jti`` ("" for a certificate identity)
    expires: float = float("inf")  # ``exp``

    def __str__(self) -> str:
        return self.agent


def parse_ttl(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` -> seconds (``oribus.types.parse_duration``);
    InvalidRequest otherwise."""
    try:
        return parse_duration(text)
    except InvalidRequest:
        raise InvalidRequest(f"a TTL is a positive number with s, m, h or d, not {text!r}") from None


def issue(private: Ed25519PrivateKey, kid: str, *, agent: str, roles: Collection[str], now: float,
          ttl: float = DEFAULT_TTL_SECONDS, issuer: str = DEFAULT_ISSUER,
          act_for: Collection[str] = (), token_id: str | None = None) -> str:
    """A signed token for ``agent`` with ``roles``, valid from ``now`` for ``ttl`` seconds."""
    if not isinstance(agent, str) or not 0 < len(agent) <= MAX_NAME:
        raise InvalidRequest(f"an agent name is 1..{MAX_NAME} characters")
    if not roles or not all(isinstance(r, str) and r for r in roles):
        raise InvalidRequest("a token needs at least one role")
    if ttl <= 0:
        raise InvalidRequest("a token's TTL must be positive")
    claims: dict[str, object] = {
        "iss": issuer, "sub": agent, "roles": list(roles), "iat": int(now),
        "exp": int(now + ttl), "jti": token_id or uuid.uuid4().hex,
    }
    if act_for:
        claims["act_for"] = list(act_for)
    return jwt.encode(claims, private, algorithm=ALGORITHM, headers={"kid": kid})


def _refuse(reason: str, message: str) -> Unauthenticated:
    return Unauthenticated(f"credential refused ({reason}): {message}", reason=reason)


def verify(token: str, keys: Mapping[str, Ed25519PublicKey], *, now: float, issuer: str = DEFAULT_ISSUER,
           revoked: Collection[str] = (), roles: Collection[str] | None = None) -> Identity:
    """The identity ``token`` proves, or Unauthenticated naming why not (module docstring)."""
    if not isinstance(token, str) or not token:
        raise _refuse("missing", "no token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise _refuse("malformed", f"not a JWT: {e}") from None
    if header.get("alg") != ALGORITHM:
        raise _refuse("algorithm", f"alg {header.get('alg')!r} is not accepted (only {ALGORITHM})")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise _refuse("unknown_key", f"signed by key {kid!r}, which this bus does not hold (retired or foreign)")
    try:
        claims = jwt.decode(
            token, key, algorithms=[ALGORITHM], issuer=issuer, leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iat", "iss", "sub", "jti"], "verify_iat": False},
        )
    except jwt.InvalidSignatureError:
        raise _refuse("signature", "the signature does not match") from None
    except jwt.ExpiredSignatureError:
        raise _refuse("expired", "the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise _refuse("not_yet_valid", "the token is not valid yet (nbf)") from None
    except jwt.InvalidIssuerError:
        raise _refuse("issuer", f"the issuer is not {issuer!r}") from None
    except jwt.PyJWTError as e:
        raise _refuse("malformed", str(e)) from None
    # PyJWT checks exp against its own clock; ``now`` is the caller's (tests, cached tokens)
    exp = claims["exp"]
    if not isinstance(exp, int | float) or exp + LEEWAY_SECONDS < now:
        raise _refuse("expired", "the token has expired")
    sub, jti, token_roles = claims["sub"], claims["jti"], claims.get("roles")
    if not isinstance(sub, str) or not 0 < len(sub) <= MAX_NAME or not isinstance(jti, str) or not jti:
        raise _refuse("malformed", "sub and jti must be non-empty strings")
    if (not isinstance(token_roles, list) or not token_roles
            or not all(isinstance(r, str) for r in token_roles)):
        raise _refuse("malformed", "roles must be a non-empty list of strings")
    act_for = claims.get("act_for", [])
    if not isinstance(act_for, list) or not all(isinstance(a, str) for a in act_for):
        raise _refuse("malformed", "act_for must be a list of strings")
    if jti in revoked:
        raise _refuse("revoked", f"token {jti} has been revoked")
    if roles is not None:
        unknown = [r for r in token_roles if r not in roles]
        if unknown:
            raise _refuse("unknown_role", f"roles not in the policy: {unknown}")
    return Identity(sub, tuple(token_roles), tuple(act_for), jti, float(exp))
