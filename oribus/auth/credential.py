"""Where a credential travels (specs/auth.md §2, "Where the credential travels").

The transports read the caller's bearer token — gRPC metadata ``authorization``, the
stream transport's hello, HTTP's ``Authorization`` header — and set ``CREDENTIAL`` for the
call they run; the bus's guard (``oribus.bus.guarded``) reads it there. A context variable
rather than a parameter: every transport already runs each call in a context of its own
(a task, or ``wire.start_eagerly``'s copy), and the operations' signatures stay those of
``BusService`` on every transport.
"""

from __future__ import annotations

from contextvars import ContextVar

# The bearer token the call in progress presented ("" or None: none).
CREDENTIAL: ContextVar[str | None] = ContextVar("oribus_credential", default=None)
# The agent and roles of the call's client certificate, when its subject is CN=agent:NAME with
# OU=role:R entries (mutual TLS; None: no such certificate). Used when there is no token.
CERTIFICATE: ContextVar[tuple[str, tuple[str, ...]] | None] = ContextVar("oribus_certificate", default=None)

AGENT_PREFIX = "agent:"
ROLE_PREFIX = "role:"

METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
ENV_TOKEN = "ORIBUS_TOKEN"  # the SDK's and the CLI's token when none is passed


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer T`` value, None if there is none. Any other
    scheme is no credential (the bus then refuses the call as ``missing``)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorization(token: str) -> str:
    """The header value (and gRPC metadata value) that carries ``token``."""
    return f"Bearer {token}"


def agent_of_subject(attributes: list[tuple[str, str]]) -> tuple[str, tuple[str, ...]] | None:
    """(agent, roles) of a certificate subject given as (attribute, value) pairs, with the
    attribute names of the ``ssl`` module (``commonName``, ``organizationalUnitName``); None
    unless its CN is ``agent:NAME`` (the bus's and the shards' own certificates are not)."""
    cns = [v for k, v in attributes if k == "commonName"]
    if len(cns) != 1 or not cns[0].startswith(AGENT_PREFIX) or len(cns[0]) == len(AGENT_PREFIX):
        return None
    roles = tuple(v[len(ROLE_PREFIX):] for k, v in attributes
                  if k == "organizationalUnitName" and v.startswith(ROLE_PREFIX))
    return cns[0][len(AGENT_PREFIX):], roles


def agent_of_peercert(peercert: dict | None) -> tuple[str, tuple[str, ...]] | None:
    """As ``agent_of_subject`` for ``ssl.SSLSocket.getpeercert()`` (the stream transport)."""
    if not peercert:
        return None
    return agent_of_subject([pair for rdn in peercert.get("subject", ()) for pair in rdn])


def agent_of_pem(pem: bytes) -> tuple[str, tuple[str, ...]] | None:
    """As ``agent_of_subject`` for a PEM certificate (gRPC's ``x509_pem_cert``)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        subject = x509.load_pem_x509_certificate(pem).subject
    except ValueError:
        return None
    names = {NameOID.COMMON_NAME: "commonName", NameOID.ORGANIZATIONAL_UNIT_NAME: "organizationalUnitName"}
    return agent_of_subject([(names[a.oid], str(a.value)) for a in subject if a.oid in names])
