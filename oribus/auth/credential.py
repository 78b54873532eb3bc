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
