"""Values between JSON and oribus's msgpack values.

JSON has no bytes; a bytes value travels as ``{"$bytes": "<base64>"}`` both
ways (the CLI prints the same form). Everything else maps one to one: null,
true/false, numbers, strings, arrays, objects. Non-string map keys (msgpack
allows them) become strings on the way out.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from oribus.errors import InvalidRequest


def to_json(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


MAX_DEPTH = 100  # nesting of a value; deeper ones are refused (and could not be stored anyway)


def from_json(value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"value is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        if len(value) == 1 and "$bytes" in value:
            raw = value["$bytes"]
            if not isinstance(raw, str):
                raise InvalidRequest('"$bytes" must be a base64 string')
            try:
                return base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError) as e:
                raise InvalidRequest(f'"$bytes" is not valid base64: {e}') from None
        return {k: from_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v, depth + 1) for v in value]
    return value
