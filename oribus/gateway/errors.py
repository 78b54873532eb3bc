"""The one table that maps oribus errors to HTTP statuses, and the error bodies.

Native API (``/v1``) error body — the wire form of the error (``OribusError.to_dict``)
with the code repeated under ``error`` for clients that only look there::

    {"error": "Conflict", "code": "Conflict", "message": "...", "details": {...},
     "stale": [[key, version_read_or_expected, current, reason], ...]}   # Conflict only

Requests the gateway cannot parse (malformed JSON, missing fields, wrong types,
oversized bodies, unknown routes) get the same shape with the codes below;
nothing reaches the bus for them.

The S-Bus routes answer in S-Bus's shape (``oribus.gateway.sbus``), but an oribus
error gets its status from this table there too, and so does each S-Bus code that
stands for an oribus error (``sbus.SBUS_ERRORS``).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from oribus.errors import (
    Aborted,
    Conflict,
    DataCorrupted,
    DataDirLocked,
    HistoryTruncated,
    InvalidRequest,
    LimitExceeded,
    OribusError,
    PermissionDenied,
    SessionExpired,
    Unauthenticated,
    Unavailable,
    ValueTooLarge,
    WatchLagged,
)

# What a route adds to its request's log line (agent, commit_id). Here, not in app.py,
# because the route modules set it and app.py imports the route modules.
LOG_FIELDS = web.RequestKey("log_fields", dict)


class RequestError(Exception):
    """A request the gateway refuses before asking the bus (bad JSON, wrong field types...)."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


# Most specific first: the first class an error is an instance of decides.
HTTP_STATUS: tuple[tuple[type[OribusError], int], ...] = (
    (Aborted, 409),
    (Conflict, 409),
    (SessionExpired, 410),
    (ValueTooLarge, 413),
    (HistoryTruncated, 410),
    (InvalidRequest, 400),
    (LimitExceeded, 429),
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (WatchLagged, 503),
    (Unavailable, 503),
    (DataCorrupted, 500),
    (DataDirLocked, 503),
    (OribusError, 500),
)


def status_of(error_class: type[OribusError]) -> int:
    """The HTTP status of an error class: that of the first entry it is a subclass of."""
    for cls, status in HTTP_STATUS:
        if issubclass(error_class, cls):
            return status
    return 500


def http_status(e: OribusError) -> int:
    return status_of(type(e))


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_body(e: OribusError) -> dict[str, Any]:
    d = e.to_dict()
    return {"error": e.code, **d}


def error_response(e: OribusError) -> web.Response:
    # RFC 6750 §3: a refused bearer token is answered with the challenge naming why
    headers = ({"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{e.details.get("reason", "")}"'}
               if isinstance(e, Unauthenticated) else None)
    return json_response(error_body(e), http_status(e), headers)


def request_error(status: int, code: str, message: str, **details: Any) -> web.Response:
    """An error found before the bus was asked (bad JSON, unknown route, body too large)."""
    return json_response({"error": code, "code": code, "message": message, "details": details}, status)
