"""Errors across gRPC: the one table from error codes to status codes and the one way back.

``GRPC_STATUS`` maps an ``OribusError`` code to the gRPC status a failed RPC carries
(the exact class rides in the ``oribus-error`` trailer); ``error_from_grpc`` turns a
failed RPC back into the error tree; ``error_payload`` / ``raise_error`` carry an error
inside a reply frame (``[call_id, ERROR, payload]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from oribus.errors import (
    DataCorrupted,
    InvalidRequest,
    OribusError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    error_from_dict,
)

GRPC_STATUS: dict[str, grpc.StatusCode] = {
    "Conflict": grpc.StatusCode.ABORTED,
    "Aborted": grpc.StatusCode.ABORTED,
    "SessionExpired": grpc.StatusCode.FAILED_PRECONDITION,
    "InvalidRequest": grpc.StatusCode.INVALID_ARGUMENT,
    "ValueTooLarge": grpc.StatusCode.INVALID_ARGUMENT,
    "LimitExceeded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Unavailable": grpc.StatusCode.UNAVAILABLE,
    "DataCorrupted": grpc.StatusCode.DATA_LOSS,
    "DataDirLocked": grpc.StatusCode.FAILED_PRECONDITION,
    "WatchLagged": grpc.StatusCode.UNAVAILABLE,
    "HistoryTruncated": grpc.StatusCode.OUT_OF_RANGE,
    "Unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "PermissionDenied": grpc.StatusCode.PERMISSION_DENIED,
    "Internal": grpc.StatusCode.INTERNAL,
}


def grpc_status_of(error: OribusError) -> grpc.StatusCode:
    return GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL)


def error_from_grpc(e: grpc.RpcError) -> OribusError:
    """The one client-side mapping from a failed RPC back to the error tree."""
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    # grpc's stubs type the items as a class of their own; grpc itself returns (key,
    # value) pairs (its MetadataType) or None, and grpc.aio's Metadata yields pairs.
    pairs: Iterable[tuple[str, str | bytes]] = trailing or ()  # type: ignore[assignment]
    for k, v in pairs:
        if k == "oribus-error":  # the server named the exact error class
            return error_from_dict({"code": v, "message": details})
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return Unavailable(f"connection failed: {details}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details)
    if code is grpc.StatusCode.DATA_LOSS:
        return DataCorrupted(details)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(details)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(details)
    return OribusError(f"{code.name if code else 'UNKNOWN'}: {details}")


def error_payload(e: BaseException) -> dict:
    if isinstance(e, OribusError):
        return e.to_dict()
    return OribusError(f"internal error: {type(e).__name__}: {e}").to_dict()


def raise_error(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise OribusError(f"malformed error reply: {payload!r}"[:200])
    raise error_from_dict(payload)
