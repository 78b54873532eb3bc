"""The one error tree of oribus.

Every error any layer raises to a caller is one of these::

    OribusError                      base; .code is the wire name, .retryable the policy
    ├── Conflict                     ORI refused the commit; .stale lists every offending key
    │   └── Aborted                  the transaction was aborted without a stale key
    │                                (lock held, coordinator gave up, earlier attempt aborted)
    ├── SessionExpired               part of the session's read set may have been lost
    │                                (shard restarted, TTL expiry, eviction): fail closed
    ├── InvalidRequest               malformed key, wrong type, unknown version, ...
    │   ├── ValueTooLarge            a value over the configured maximum
    │   └── HistoryTruncated         a watch or rollback asked for versions retention dropped
    ├── LimitExceeded                a bounded resource is full (delivery-log caps)
    ├── Unavailable                  a shard or the bus cannot be reached; retryable
    │   └── WatchLagged              a watcher fell behind its bounded queue and was cut off;
    │                                resume from the last version seen of each key
    ├── Unauthenticated              no credential, or one the bus does not accept (malformed,
    │                                expired, revoked, unknown key, bad signature): .reason says which
    ├── PermissionDenied             a verified identity asked for what its roles do not allow:
    │                                .details names the operation, the key and the rule
    ├── DataCorrupted                a WAL or snapshot failed its checksum where it must not
    └── DataDirLocked                another live process has the data directory open;
                                     .details names the directory and the holder's pid

Policy lives on the class: ``retryable`` says whether repeating the same
request may succeed, ``code`` is the stable name used on every wire (gRPC
and HTTP tables map from it; the client maps back from it in one place).
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Stale(NamedTuple):
    """One offending key of a refused commit."""

    key: str
    version: int | None  # the version the session read or expected (None: not read)
    current: int  # the key's current version at the commit point
    reason: str  # "stale_read" | "expected_version" | "locked" | "aborted"


class OribusError(Exception):
    """Base of every oribus error."""

    code = "Internal"
    retryable = False

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """Wire form: {"code", "message", "details"}."""
        return {"code": self.code, "message": self.message, "details": self.details}


class Conflict(OribusError):
    """The commit was refused by the ORI rule; none of its writes became visible.

    ``stale`` lists every offending key with the version the session read or
    expected, the current version and the reason.
    """

    code = "Conflict"
    retryable = True

    def __init__(self, message: str = "", stale: list[Stale] | None = None, **details: Any):
        self.stale: list[Stale] = list(stale or [])
        if not message:
            parts = [f"{s.key} ({s.reason}: had {s.version}, now {s.current})" for s in self.stale]
            message = "commit refused: " + ", ".join(parts) if parts else "commit refused"
        super().__init__(message, **details)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["stale"] = [list(s) for s in self.stale]
        return d


class Aborted(Conflict):
    """The transaction was aborted for a reason other than a stale key."""

    code = "Aborted"


class SessionExpired(OribusError):
    """Part of the session's read set may have been lost; the commit is refused.

    Re-read what the commit depends on (or call reset_session) and try again.
    """

    code = "SessionExpired"


class InvalidRequest(OribusError):
    code = "InvalidRequest"


class ValueTooLarge(InvalidRequest):
    code = "ValueTooLarge"


class HistoryTruncated(InvalidRequest):
    """A watch or a rollback asked for versions that are no longer kept: retention dropped
    them, by count (``history_limit``) or by age (``history_max_age_seconds``).

    A watch's ``details["keys"]`` names the keys (up to 20) with the version asked from and
    the oldest version kept, and ``details["rules"]`` which rule dropped each ("count" or
    "age"): read the current values and watch from their versions. A rollback's names
    ``key``, ``version`` (the target), ``oldest`` (kept) and ``rule``; it changed nothing.
    """

    code = "HistoryTruncated"


class LimitExceeded(OribusError):
    code = "LimitExceeded"


class Unavailable(OribusError):
    code = "Unavailable"
    retryable = True


class WatchLagged(Unavailable):
    """A watcher did not keep up: its bounded queue filled and its stream was ended.

    Nothing is lost as long as the watcher resumes from the last version it saw
    of each key (the client's watch iterators do this by themselves).
    """

    code = "WatchLagged"


class Unauthenticated(OribusError):
    """The call carried no credential, or one the bus refuses (specs/auth.md §2, §6).

    ``details["reason"]`` is one of ``missing``, ``malformed``, ``algorithm``,
    ``unknown_key``, ``signature``, ``issuer``, ``expired``, ``not_yet_valid``,
    ``revoked``, ``unknown_role``. Not retryable: the same credential is refused again.
    """

    code = "Unauthenticated"

    @property
    def reason(self) -> str:
        return str(self.details.get("reason", ""))


class PermissionDenied(OribusError):
    """A verified identity asked for an operation its roles do not allow on a key, named an
    agent it may not act for, or used a session another identity owns (specs/auth.md §4,
    §5). Nothing was done.

    ``details``: ``agent``, ``operation``, ``key`` (or ``session``) and ``rule`` (why: the
    roles held, or the session's owner). Never a value.
    """

    code = "PermissionDenied"


class DataCorrupted(OribusError):
    """A log or snapshot is damaged where recovery cannot safely continue."""

    code = "DataCorrupted"


class DataDirLocked(OribusError):
    """Another live process holds the data directory's lock (``oribus.datadir_lock``).

    Raised when opening, before anything in the directory is read: two processes
    on one WAL would interleave their records. Not retryable: the holder does not
    go away by itself. ``details``: ``directory`` and ``pid`` (None if unknown).
    """

    code = "DataDirLocked"


_BY_CODE: dict[str, type[OribusError]] = {
    cls.code: cls
    for cls in (
        OribusError,
        Conflict,
        Aborted,
        SessionExpired,
        InvalidRequest,
        ValueTooLarge,
        HistoryTruncated,
        LimitExceeded,
        Unavailable,
        WatchLagged,
        Unauthenticated,
        PermissionDenied,
        DataCorrupted,
        DataDirLocked,
    )
}


def error_from_dict(d: dict[str, Any]) -> OribusError:
    """Rebuild an error from its wire form (the inverse of ``to_dict``)."""
    cls = _BY_CODE.get(d.get("code", ""), OribusError)
    details = d.get("details") or {}
    if issubclass(cls, Conflict):
        stale = [Stale(*s) for s in d.get("stale") or []]
        return cls(d.get("message", ""), stale=stale, **details)
    return cls(d.get("message", ""), **details)
