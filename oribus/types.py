"""Plain data types shared by every layer: keys, values, items, versions, sessions.

Vocabulary (specs/engine.md, "Data model"): a *key* is UTF-8, 1..1024 bytes, ``/``-separated
namespaces; a *value* is any msgpack-serialisable object; a *version* is a
per-key integer, 0 for an absent key, +1 for every committed write (delete and
rollback included).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import msgpack

from oribus.errors import InvalidRequest, ValueTooLarge

# The data model's limits and defaults, defined here once and imported everywhere else.
MAX_KEY_BYTES = 1024
MAX_VERSION = (1 << 63) - 1  # versions travel as msgpack int64
DEFAULT_MAX_VALUE_BYTES = 1 << 20  # largest encoded value a write may carry
DEFAULT_HISTORY_LIMIT = 100  # versions kept per key (history and rollback reach)
MAX_KEYS_PER_REQUEST = 10_000  # keys one read or commit may name, and one scan may return
DEFAULT_SCAN_LIMIT = 1000  # keys a scan returns when not told how many
MAX_SESSIONS_LISTED = 10_000  # sessions one listing (an operator's view) may return
DEFAULT_SESSIONS_LISTED = 100  # sessions a listing returns when not told how many
# Key prefixes only the server itself writes: the HTTP gateway keeps S-Bus metadata
# under ".sbus/<key>" (specs/http.md). A client write there could forge that metadata
# or make it unreadable, so every write path (gRPC, /v1, S-Bus, rollback) refuses it
# (``oribus.bus.bus.check_writable``), and no access rule grants it (``oribus.auth.rules``).
RESERVED_PREFIXES = (".sbus/",)


class _Delete:
    """The DELETE sentinel: ``commit({"k": oribus.DELETE})`` removes k."""

    _instance: _Delete | None = None

    def __new__(cls) -> _Delete:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "oribus.DELETE"

    def __reduce__(self) -> str:
        return "DELETE"


DELETE = _Delete()


class SessionRef(NamedTuple):
    """A session: the agent name is the identity, the session id tells runs apart."""

    agent: str
    session_id: str

    def __str__(self) -> str:
        return f"{self.agent}/{self.session_id}"


class Item(NamedTuple):
    """The result of a read. An absent key has version 0 and value None."""

    key: str
    value: Any
    version: int

    @property
    def exists(self) -> bool:
        """False for a key never written or deleted (both read as value None)."""
        return self.value is not None


class Version(NamedTuple):
    """One entry of a key's history (newest first in ``history()``)."""

    version: int
    value: Any
    agent: str
    session: str
    commit_id: str
    committed_at: float  # seconds since the epoch
    deleted: bool = False


class WatchEvent(NamedTuple):
    """One committed change of a watched key, delivered once it is visible to readers.

    Deletes and rollbacks are changes like any other write (a delete has
    ``deleted=True`` and value None). Aborted or refused commits never appear.
    """

    key: str
    version: int
    value: Any  # decoded value; None for a delete
    deleted: bool
    agent: str  # who committed it
    session: str  # the committing session's id
    commit_id: str
    committed_at: float  # seconds since the epoch, stamped by the coordinator


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid key, else raise InvalidRequest saying why."""
    if type(key) is str and key in _valid_keys:
        return key
    checked = _check_key(key)
    if len(_valid_keys) >= _VALID_KEYS_CACHE:
        _valid_keys.clear()
    _valid_keys.add(checked)
    return checked


# Keys already found valid: each layer checks keys at its boundary, and the same
# keys come back again and again, so the check is a set lookup after the first time.
_VALID_KEYS_CACHE = 1 << 16
_valid_keys: set[str] = set()


def _check_key(key: object) -> str:
    """``key`` itself if it is a valid key, else InvalidRequest saying why."""
    if not isinstance(key, str):
        raise InvalidRequest(f"key must be a str, not {type(key).__name__}", key=repr(key)[:80])
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest("key is not valid UTF-8", key=repr(key)[:80]) from e
    if not 1 <= len(raw) <= MAX_KEY_BYTES:
        raise InvalidRequest(
            f"key must be 1..{MAX_KEY_BYTES} bytes of UTF-8, got {len(raw)}", key=key[:80]
        )
    if _CONTROL.search(key):
        raise InvalidRequest("key must not contain control characters", key=repr(key)[:80])
    if key.startswith("/") or key.endswith("/") or "//" in key:
        raise InvalidRequest(
            "key namespaces must be non-empty ('a/b', not '/a', 'a/' or 'a//b')", key=key[:80]
        )
    return key


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it can select keys (a watch): a str of at most 1024 bytes, may be empty."""
    if not isinstance(prefix, str):
        raise InvalidRequest(f"prefix must be a str, not {type(prefix).__name__}", prefix=repr(prefix)[:80])
    try:
        raw = prefix.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest("prefix is not valid UTF-8", prefix=repr(prefix)[:80]) from e
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidRequest(f"prefix must be at most {MAX_KEY_BYTES} bytes of UTF-8", prefix=prefix[:80])
    if _CONTROL.search(prefix):
        raise InvalidRequest("prefix must not contain control characters", prefix=repr(prefix)[:80])
    return prefix


def decode_value(raw: bytes | None) -> Any:
    """The value of an encoded one; None stays None (absent or deleted)."""
    return None if raw is None else msgpack.unpackb(raw, raw=False, strict_map_key=False)


def encode_value(value: object, max_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> bytes:
    """msgpack-encode a value, refusing unserialisable or oversized ones."""
    try:
        raw = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidRequest(f"value is not msgpack-serialisable: {e}") from e
    if len(raw) > max_bytes:
        raise ValueTooLarge(
            f"value is {len(raw)} bytes, over the {max_bytes}-byte limit",
            size=len(raw),
            limit=max_bytes,
        )
    return raw


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: object) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``: a positive finite number of seconds.

    Anything else (zero, a negative, ``inf``, ``nan``, another unit, not a string or a
    number) raises InvalidRequest naming it. Used by ``--history-max-age`` and the CLI's
    other durations, and by ``open_local(history_max_age="7d")``.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    elif isinstance(text, str):
        stripped = text.strip()
        scale = _DURATION_UNITS.get(stripped[-1:].lower(), None)
        try:
            value = float(stripped[:-1]) * scale if scale else float(stripped)
        except ValueError:
            raise InvalidRequest(f"not a duration: {text!r} (e.g. 90s, 15m, 12h, 7d)") from None
    else:
        raise InvalidRequest(f"not a duration: {text!r} (e.g. 90s, 15m, 12h, 7d)")
    if not (value > 0 and value != float("inf")):
        raise InvalidRequest(f"a duration must be a positive finite number of seconds, not {text!r}")
    return value
