"""The OpenAPI 3.1 document of the native ``/v1`` API (served at ``/v1/openapi.json``).

Built here, next to the routes, and kept in ``specs/openapi.json``; a test
checks that the two are the same and that every ``/v1`` route is described.
Regenerate the file with ``python -m oribus.gateway.openapi > specs/openapi.json``.
"""

from __future__ import annotations

import json
from typing import Any

from oribus.gateway.errors import HTTP_STATUS
from oribus.gateway.native import KEYS_PAGE, SESSIONS_PAGE
from oribus.types import MAX_KEYS_PER_REQUEST


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


_SESSION_PARAMS = [
    {"name": "agent", "in": "query", "required": True, "schema": {"type": "string"},
     "description": "The agent whose session reads (a read is a delivery to this session)."},
    {"name": "session", "in": "query", "required": False, "schema": {"type": "string", "default": "http"}},
]

_SESSION_FIELDS = {
    "agent": {"type": "string", "minLength": 1, "maxLength": 256},
    "session": {"type": "string", "default": "http", "maxLength": 256},
}


def document() -> dict[str, Any]:
    versions = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
    schemas = {
        "Value": {"description": "Any JSON value; bytes travel as {\"$bytes\": base64}."},
        "Item": {"type": "object", "required": ["key", "value", "version"], "properties": {
            "key": {"type": "string"}, "value": _ref("Value"),
            "version": {"type": "integer", "description": "0 when the key is absent"},
        }},
        "Seqs": {"type": "object", "additionalProperties": {"type": "integer"},
                 "description": "shard id -> sequence number of this read's first delivery there; "
                                "pass as `since` to commit in transaction scope"},
        "CommitRequest": {"type": "object", "required": ["agent"], "properties": {
            **_SESSION_FIELDS,
            "commit_id": {"type": "string", "maxLength": 128,
                          "description": "idempotency key: a retry with the same id never applies twice"},
            "writes": {"type": "object", "additionalProperties": _ref("Value")},
            "deletes": {"type": "array", "items": {"type": "string"}},
            "expect": {**versions, "description": "key -> version it must have at the commit point"},
            "read_set": {**versions, "description": "explicit read entries; checked in addition to "
                                                    "the logged deliveries, never instead of them"},
            "rollback": {**versions, "description": "key -> earlier version whose value to restore"},
            "scope": {"type": "string", "enum": ["session", "transaction"], "default": "session"},
            "since": {"$ref": "#/components/schemas/Seqs"},
            "strict": {"type": "boolean", "default": False, "description": "refuse blind writes"},
        }},
        "CommitResult": {"type": "object", "properties": {
            "commit_id": {"type": "string"}, "versions": versions, "two_phase": {"type": "boolean"},
        }},
        "Version": {"type": "object", "properties": {
            "version": {"type": "integer"}, "value": _ref("Value"), "deleted": {"type": "boolean"},
            "agent": {"type": "string"}, "session": {"type": "string"}, "commit_id": {"type": "string"},
            "committed_at": {"type": "number"},
        }},
        "Error": {"type": "object", "required": ["error", "code", "message"], "properties": {
            "error": {"type": "string"}, "code": {"type": "string", "enum": sorted(
                {cls.code for cls, _ in HTTP_STATUS} | {"BodyTooLarge", "NotFound", "MethodNotAllowed"})},
            "message": {"type": "string"}, "details": {"type": "object"},
            "stale": {"type": "array", "description": "Conflict only: [key, version read or expected, "
                                                      "current version, reason]",
                      "items": {"type": "array", "prefixItems": [
                          {"type": "string"}, {"type": ["integer", "null"]}, {"type": "integer"},
                          {"type": "string", "enum": ["stale_read", "expected_version", "locked", "aborted"]},
                      ]}},
        }},
    }
    by_status: dict[int, list[str]] = {}
    for cls, status in HTTP_STATUS:
        by_status.setdefault(status, []).append(cls.code)
    by_status.setdefault(404, []).append("NotFound")
    by_status.setdefault(413, []).append("BodyTooLarge")
    by_status.setdefault(403, []).append("Forbidden")
    responses = {
        f"E{status}": _json(_ref("Error"), "error: " + ", ".join(codes))
        for status, codes in sorted(by_status.items())
    }
    body = lambda name: {"required": True, "content": {"application/json": {"schema": _ref(name)}}}  # noqa: E731
    inline = lambda schema: {"required": True, "content": {"application/json": {"schema": schema}}}  # noqa: E731
    owner = {"session_token": {"type": "string", "description": "what POST /v1/session gave when the "
                               "session was opened; without it the session is marked and its next commit "
                               "is refused (410)"}}
    session_body = {"type": "object", "required": ["agent"], "properties": {**_SESSION_FIELDS, **owner}}
    cleared = _json({"type": "object", "properties": {
        "ok": {"type": "boolean"},
        "next_commit_refused": {"type": "boolean", "description": "the caller did not prove it owns the "
                                "session: its next commit fails closed (410 SessionExpired)"}}})
    paths = {
        "/v1/keys/{key}": {"get": {
            "summary": "Read one key (a delivery to the session unless record=false)",
            "parameters": [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}},
                           *_SESSION_PARAMS,
                           {"name": "record", "in": "query", "schema": {"type": "boolean", "default": True}}],
            "responses": {"200": _json({"allOf": [_ref("Item"), {"properties": {"seqs": _ref("Seqs")}}]}),
                          **_errors(400, 410, 429, 503)},
        }},
        "/v1/get": {"post": {
            "summary": "Read several keys at once",
            "requestBody": inline({"type": "object", "required": ["agent", "keys"], "properties": {
                **_SESSION_FIELDS, "keys": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_KEYS_PER_REQUEST},
                "record": {"type": "boolean", "default": True}}}),
            "responses": {"200": _json({"type": "object", "properties": {
                "items": {"type": "array", "items": _ref("Item")}, "seqs": _ref("Seqs")}}),
                **_errors(400, 410, 429, 503)},
        }},
        "/v1/keys": {"get": {
            "summary": "List live keys in key order (records no delivery)",
            "parameters": [{"name": "prefix", "in": "query", "schema": {"type": "string"}},
                           {"name": "after", "in": "query", "schema": {"type": "string"}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "default": KEYS_PAGE,
                                                                       "minimum": 1, "maximum": MAX_KEYS_PER_REQUEST}}],
            "responses": {"200": _json({"type": "object", "properties": {
                "items": {"type": "array", "items": _ref("Item")},
                "next_after": {"type": ["string", "null"]}}}), **_errors(400, 503)},
        }},
        "/v1/commit": {"post": {
            "summary": "Commit writes atomically, checked by ORI against what the session read",
            "requestBody": body("CommitRequest"),
            "responses": {"200": _json(_ref("CommitResult")), **_errors(400, 409, 410, 413, 429, 503)},
        }},
        "/v1/rollback": {"post": {
            "summary": "Restore keys to earlier versions' values (an ordinary checked commit)",
            "requestBody": inline({"type": "object", "required": ["agent", "versions"], "properties": {
                **_SESSION_FIELDS, "versions": versions, "commit_id": {"type": "string"}}}),
            "responses": {"200": _json(_ref("CommitResult")), **_errors(400, 409, 410, 503)},
        }},
        "/v1/history/{key}": {"get": {
            "summary": "Kept versions of a key, newest first",
            "parameters": [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
            "responses": {"200": _json({"type": "object", "properties": {
                "key": {"type": "string"}, "versions": {"type": "array", "items": _ref("Version")}}}),
                **_errors(400, 503)},
        }},
        "/v1/forget": {"post": {
            "summary": "Drop deliveries of some keys from the session's read set",
            "requestBody": inline({"type": "object", "required": ["agent", "keys"], "properties": {
                **_SESSION_FIELDS, **owner, "keys": {"type": "array", "items": {"type": "string"}}}}),
            "responses": {"200": cleared, **_errors(400, 503)},
        }},
        "/v1/reset": {"post": {
            "summary": "Drop every delivery of the session (start a new read set)",
            "requestBody": inline(session_body),
            "responses": {"200": cleared, **_errors(400, 503)},
        }},
        "/v1/session": {"post": {
            "summary": "Start the session afresh (as /v1/reset); a session nobody uses yet gets a "
                       "session_token proving ownership to later resets and forgets",
            "requestBody": inline(session_body),
            "responses": {"200": _json({"type": "object", "properties": {
                **_SESSION_FIELDS, "session_token": {"type": ["string", "null"]},
                "next_commit_refused": {"type": "boolean"}}}), **_errors(400, 503)},
        }},
        "/v1/watch": {"get": {
            "summary": "Server-Sent Events: committed changes under a prefix",
            "parameters": [{"name": "prefix", "in": "query", "schema": {"type": "string"}},
                           {"name": "from_version", "in": "query", "schema": {"type": "integer"}},
                           {"name": "since", "in": "query", "schema": {"type": "number"}},
                           {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "text/event-stream of `change` events (data: a Version "
                                                 "with its key), ended by an `error` event on failure",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(400, 410, 503)},
        }},
        "/v1/stats": {"get": {"summary": "Counters of the bus and its shards",
                              "responses": {"200": _json({"type": "object"}), **_errors(503)}}},
        "/v1/sessions": {"get": {
            "summary": "Recently active sessions with their read sets, each read marked stale or current "
                       "(admin only; under --auth an identity without the admin grant gets its own sessions "
                       "and only the keys it may read)",
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "default": SESSIONS_PAGE}}],
            "responses": {"200": _json({"type": "object"}), **_errors(400, 403, 503)},
        }},
        "/v1/openapi.json": {"get": {"summary": "This document",
                                     "responses": {"200": _json({"type": "object"})}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "oribus native HTTP API", "version": "1",
                 "description": "The SDK's operations over JSON. Reads are deliveries to the named "
                                "session; commits are refused (409 Conflict, listing every stale key) if "
                                "anything the session read has changed (Observable-Read Isolation)."},
        "paths": paths,
        "components": {"schemas": schemas, "responses": responses},
    }


if __name__ == "__main__":
    print(json.dumps(document(), indent=2, sort_keys=True))
