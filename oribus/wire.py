"""The wire contract — the single source of service names, operations and encodings.

oribus speaks gRPC with msgpack bodies (no protobuf). Two services::

    oribus.v1.Bus     client -> bus      (SDK, CLI)
    oribus.v1.Shard   bus    -> shard    (cluster mode; in-process shards skip the wire)

Each service has the same three methods:

    Stream  bidi stream   messages are BATCHES of calls / replies, multiplexed by call id:
                          one stream per connection carries every concurrent call, so a
                          transaction costs a few frames, not a few gRPC messages
    Call    unary         one call in, one reply out (CLI, tools, health probes)
    Watch   server stream request {"p": prefix, "f": from_version}; replies are batches
                          of changes (``protocol.Change.to_wire``)

Frames (msgpack)::

    request batch   [[call_id, op, args], ...]
    reply batch     [[call_id, 0, result], ...]            success
                    [[call_id, 1, error], ...]             error = OribusError.to_dict()
    unary Call      request [call_id, op, args] -> reply [call_id, status, payload]

A frame that cannot be decoded fails the whole RPC with INVALID_ARGUMENT (the
server stays up); a well-formed call with bad arguments gets an InvalidRequest
error reply and changes nothing. ``GRPC_STATUS`` is the one table from error
codes to gRPC status codes (used when a whole RPC fails);
``error_from_grpc`` is the one client-side mapping back.

Operations and their argument/result shapes are listed in ``BUS_OPS`` and
``SHARD_OPS`` below and documented in ``specs/wire.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import msgpack

from oribus.contract import CommitRequest, CommitResult, Entry, ReadResult
from oribus.errors import (
    DataCorrupted,
    InvalidRequest,
    OribusError,
    Stale,
    Unavailable,
    error_from_dict,
)
from oribus.protocol import (
    ReadItem,
    ReadReply,
    ReadRequest,
    Scope,
    ShardTxn,
    TxnOutcome,
    TxnState,
    TxnStatus,
    Vote,
    VoteKind,
)
from oribus.types import SessionRef

BUS_SERVICE = "oribus.v1.Bus"
SHARD_SERVICE = "oribus.v1.Shard"
STREAM, CALL, WATCH = "Stream", "Call", "Watch"

MAX_MESSAGE_BYTES = 64 << 20  # a batch may carry several maximal values

OK, ERROR = 0, 1


def method_path(service: str, method: str) -> str:
    return f"/{service}/{method}"


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    """Decode a message; raises InvalidRequest on anything that is not msgpack."""
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise InvalidRequest(f"malformed message: {e}") from None


# ---- the one table: error code -> gRPC status -----------------------------------------

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
    "Internal": grpc.StatusCode.INTERNAL,
}


def grpc_status_of(error: OribusError) -> grpc.StatusCode:
    return GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL)


def error_from_grpc(e: grpc.RpcError) -> OribusError:
    """The one client-side mapping from a failed RPC back to the error tree."""
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else None) or str(e)
    trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for k, v in trailing or ():
        if k == "oribus-error":  # the server named the exact error class
            return error_from_dict({"code": v, "message": details})
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return Unavailable(f"connection failed: {details}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details)
    if code is grpc.StatusCode.DATA_LOSS:
        return DataCorrupted(details)
    return OribusError(f"{code.name if code else 'UNKNOWN'}: {details}")


def error_payload(e: BaseException) -> dict:
    if isinstance(e, OribusError):
        return e.to_dict()
    return OribusError(f"internal error: {type(e).__name__}: {e}").to_dict()


def raise_error(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise OribusError(f"malformed error reply: {payload!r}"[:200])
    raise error_from_dict(payload)


# ---- argument helpers (server side: validate shapes, raise InvalidRequest) ---------------


def _need(args: Any, name: str, types: type | tuple[type, ...]) -> Any:
    if not isinstance(args, dict):
        raise InvalidRequest("arguments must be a map")
    if name not in args:
        raise InvalidRequest(f"missing argument {name!r}")
    v = args[name]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in _as_tuple(types)):
        raise InvalidRequest(f"argument {name!r} has the wrong type ({type(v).__name__})")
    return v


def _opt(args: dict, name: str, types: type | tuple[type, ...], default: Any) -> Any:
    if name not in args or args[name] is None:
        return default
    return _need(args, name, types)


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def enc_session(s: SessionRef) -> list:
    return [s[0], s[1]]


def dec_session(v: Any) -> SessionRef:
    if not (isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(p, str) for p in v)):
        raise InvalidRequest("session must be [agent, session_id]")
    return SessionRef(v[0], v[1])


def _str_int_map(v: Any, what: str) -> dict[str, int]:
    if not isinstance(v, dict):
        raise InvalidRequest(f"{what} must be a map of key -> version")
    for k, n in v.items():
        if not isinstance(k, str) or not isinstance(n, int) or isinstance(n, bool):
            raise InvalidRequest(f"{what} must map str keys to int versions")
    return v


def _int_int_map(v: Any, what: str) -> dict[int, int]:
    if not isinstance(v, dict) or not all(
        isinstance(k, int) and isinstance(n, int) for k, n in v.items()
    ):
        raise InvalidRequest(f"{what} must map shard ids to ints")
    return v


def _tokens(v: Any) -> dict[int, tuple[int, int]]:
    if not isinstance(v, dict):
        raise InvalidRequest("tokens must be a map of shard -> [epoch, incarnation]")
    out = {}
    for k, t in v.items():
        if not (isinstance(k, int) and isinstance(t, list | tuple) and len(t) == 2
                and all(isinstance(x, int) for x in t)):
            raise InvalidRequest("tokens must be a map of shard -> [epoch, incarnation]")
        out[k] = (t[0], t[1])
    return out


def _writes(v: Any) -> dict[str, bytes | None]:
    if not isinstance(v, dict):
        raise InvalidRequest("writes must be a map of key -> encoded value (bin) or nil")
    for k, raw in v.items():
        if not isinstance(k, str) or not (raw is None or isinstance(raw, bytes)):
            raise InvalidRequest("writes must be a map of key -> encoded value (bin) or nil")
    return v


def _decodable(writes: dict[str, bytes | None]) -> dict[str, bytes | None]:
    """Refuse a value that is not exactly one msgpack object (the bus's entry point).

    The SDK encodes values itself, but a raw client could store bytes that every
    reader's SDK then fails to decode; such a commit is malformed and changes nothing.
    """
    for k, raw in writes.items():
        if raw is None:
            continue
        try:
            msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack raises several unrelated types
            raise InvalidRequest(f"value of {k!r} is not one msgpack-encoded object: {e}", key=k) from None
    return writes


def _stale(v: list) -> list[Stale]:
    return [Stale(*s) for s in v]


def _token_or_none(v: Any) -> tuple[int, int] | None:
    return None if v is None else (v[0], v[1])


# ---- bus operations ---------------------------------------------------------------------


def enc_read_args(session: SessionRef, keys: list[str], record: bool) -> dict:
    return {"s": enc_session(session), "k": list(keys), "r": record}


def dec_read_args(a: Any) -> tuple[SessionRef, list[str], bool]:
    keys = _need(a, "k", list)
    return dec_session(_need(a, "s", list)), keys, bool(_opt(a, "r", bool, True))


def enc_read_result(r: ReadResult) -> dict:
    return {
        "i": [[i.key, i.value, i.version] for i in r.items],
        "t": {s: list(t) for s, t in r.tokens.items()},
        "q": dict(r.seqs),
    }


def dec_read_result(v: dict) -> ReadResult:
    return ReadResult(
        [ReadItem(k, val, ver) for k, val, ver in v["i"]],
        {s: (t[0], t[1]) for s, t in v["t"].items()},
        dict(v["q"]),
    )


def enc_commit_request(r: CommitRequest) -> dict:
    return {
        "s": enc_session(r.session),
        "id": r.commit_id,
        "w": r.writes,
        "rb": r.rollback,
        "e": r.expect,
        "r": r.read_set,
        "sc": r.scope.value,
        "since": r.since,
        "t": {s: list(t) for s, t in r.tokens.items()},
        "st": r.strict,
        "ct": r.complete_tokens,
    }


def dec_commit_request(a: Any) -> CommitRequest:
    scope = _opt(a, "sc", str, "session")
    try:
        sc = Scope(scope)
    except ValueError:
        raise InvalidRequest(f"scope must be 'session' or 'transaction', not {scope!r}") from None
    return CommitRequest(
        session=dec_session(_need(a, "s", list)),
        commit_id=_need(a, "id", str),
        writes=_decodable(_writes(_opt(a, "w", dict, {}))),
        rollback=_str_int_map(_opt(a, "rb", dict, {}), "rollback"),
        expect=_str_int_map(_opt(a, "e", dict, {}), "expect"),
        read_set=_str_int_map(_opt(a, "r", dict, {}), "read_set"),
        scope=sc,
        since=_int_int_map(_opt(a, "since", dict, {}), "since"),
        tokens=_tokens(_opt(a, "t", dict, {})),
        strict=bool(_opt(a, "st", bool, False)),
        complete_tokens=bool(_opt(a, "ct", bool, False)),
    )


def enc_commit_result(r: CommitResult) -> dict:
    return {"id": r.commit_id, "v": r.versions, "t": {s: list(t) for s, t in r.tokens.items()}, "2pc": r.two_phase}


def dec_commit_result(v: dict) -> CommitResult:
    return CommitResult(v["id"], dict(v["v"]), {s: (t[0], t[1]) for s, t in v["t"].items()}, v["2pc"])


def enc_entries(entries: list[Entry]) -> list:
    return [list(e) for e in entries]


def dec_entries(v: list) -> list[Entry]:
    return [Entry(*e) for e in v]


def dec_history_args(a: Any) -> tuple[str, int | None]:
    return _need(a, "k", str), _opt(a, "n", int, None)


def dec_keys_args(a: Any) -> tuple[SessionRef, list[str]]:
    return dec_session(_need(a, "s", list)), _need(a, "k", list)


def dec_session_args(a: Any) -> SessionRef:
    return dec_session(_need(a, "s", list))


# ---- shard operations ---------------------------------------------------------------------


def enc_read_request(r: ReadRequest) -> dict:
    a = enc_read_args(r.session, r.keys, r.record)
    if r.detail:
        a["d"] = True
    if r.only_new:
        a["n"] = True
    return a


def dec_read_request(a: Any) -> ReadRequest:
    s, keys, record = dec_read_args(a)
    return ReadRequest(s, keys, record, bool(_opt(a, "d", bool, False)), bool(_opt(a, "n", bool, False)))


def enc_items(items: list[ReadItem]) -> list:
    """[key, value, version] per item, plus [agent, committed_at] when it carries detail."""
    return [
        [i.key, i.value, i.version, i.agent, i.committed_at] if i.agent or i.committed_at
        else [i.key, i.value, i.version]
        for i in items
    ]


def dec_items(v: list) -> list[ReadItem]:
    return [ReadItem(*i) for i in v]


def enc_read_reply(r: ReadReply) -> list:
    if r.skipped:
        return [enc_items(r.items), list(r.token), r.seq, r.skipped]
    return [enc_items(r.items), list(r.token), r.seq]


def dec_read_reply(v: list) -> ReadReply:
    items, token, seq, *skipped = v
    return ReadReply(dec_items(items), (token[0], token[1]), seq, list(skipped[0]) if skipped else [])


def dec_scan_args(a: Any) -> tuple[str, str, int]:
    limit = _opt(a, "n", int, 1000)
    if limit < 1 or limit > 10_000:
        raise InvalidRequest("scan limit must be 1..10000")
    return _opt(a, "p", str, ""), _opt(a, "a", str, ""), limit


def enc_sessions(v: list) -> list:
    return [[list(s), entries, idle] for s, entries, idle in v]


def dec_sessions(v: list) -> list:
    return [((s[0], s[1]), dict(entries), idle) for s, entries, idle in v]


def _dec_limit(a: Any) -> tuple:
    limit = _opt(a, "n", int, 100)
    if limit < 1 or limit > 10_000:
        raise InvalidRequest("limit must be 1..10000")
    return (limit,)


def enc_shard_txn(t: ShardTxn) -> dict:
    return {
        "id": t.txn_id,
        "s": enc_session(t.session),
        "w": t.writes,
        "rb": t.rollback,
        "e": t.expect,
        "r": t.read_set,
        "sc": t.scope.value,
        "q": t.since_seq,
        "t": None if t.token is None else list(t.token),
        "st": t.strict,
        "ps": list(t.participants),
        "p": t.primary,
        "at": t.committed_at,
    }


def dec_shard_txn(a: Any) -> ShardTxn:
    token = _opt(a, "t", list, None)
    if token is not None and not (len(token) == 2 and all(isinstance(x, int) for x in token)):
        raise InvalidRequest("token must be [epoch, incarnation]")
    try:
        scope = Scope(_opt(a, "sc", str, "session"))
    except ValueError:
        raise InvalidRequest("bad scope") from None
    return ShardTxn(
        txn_id=_need(a, "id", str),
        session=dec_session(_need(a, "s", list)),
        writes=_writes(_opt(a, "w", dict, {})),
        rollback=_str_int_map(_opt(a, "rb", dict, {}), "rollback"),
        expect=_str_int_map(_opt(a, "e", dict, {}), "expect"),
        read_set=_str_int_map(_opt(a, "r", dict, {}), "read_set"),
        scope=scope,
        since_seq=_opt(a, "q", int, None),
        token=_token_or_none(token),
        strict=bool(_opt(a, "st", bool, False)),
        participants=tuple(_opt(a, "ps", list, [])),
        primary=_opt(a, "p", int, 0),
        committed_at=float(_opt(a, "at", (int, float), 0.0)),
    )


def enc_vote(v: Vote) -> list:
    return [v.kind.value, [list(s) for s in v.stale], v.versions]


def dec_vote(v: list) -> Vote:
    return Vote(VoteKind(v[0]), _stale(v[1]), dict(v[2]))


def enc_outcome(o: TxnOutcome) -> list:
    return [o.state.value, o.versions, [list(s) for s in o.stale], None if o.token is None else list(o.token)]


def dec_outcome(v: list) -> TxnOutcome:
    return TxnOutcome(TxnState(v[0]), dict(v[1]), _stale(v[2]), _token_or_none(v[3]))


def enc_status(s: TxnStatus) -> list:
    return [None if s.state is None else s.state.value, s.primary, list(s.participants), s.age]


def dec_status(v: list) -> TxnStatus:
    return TxnStatus(None if v[0] is None else TxnState(v[0]), v[1], tuple(v[2]), v[3])


def dec_txn_args(a: Any) -> tuple[str, bool]:
    return _need(a, "i", str), bool(_opt(a, "c", bool, False))


def enc_txn_refs(txns: list) -> list:
    return [[t.txn_id, t.primary, list(t.participants)] for t in txns]


def dec_txn_refs(v: list) -> list:
    from oribus.protocol import TxnRef

    return [TxnRef(i, p, tuple(ps)) for i, p, ps in v]


def _none(_: Any) -> None:
    return None


def _same(v: Any) -> Any:
    return v


def _dec_stats_args(a: Any) -> tuple:
    return ()


class Op:
    """How one operation crosses the wire: client encodes params, server decodes them,
    server encodes the result, client decodes it."""

    __slots__ = ("dec_args", "dec_result", "enc_args", "enc_result")

    def __init__(self, enc_args, dec_args, enc_result, dec_result) -> None:  # noqa: ANN001
        self.enc_args = enc_args  # client: *params -> wire
        self.dec_args = dec_args  # server: wire -> tuple of params (raises InvalidRequest)
        self.enc_result = enc_result  # server: result -> wire
        self.dec_result = dec_result  # client: wire -> result


def _txn_args(txn_id: str, commit: bool = False) -> dict:
    return {"i": txn_id, "c": commit}


def _dec_txn_id(a: Any) -> tuple:
    return (_need(a, "i", str),)


def _dec_older_than(a: Any) -> tuple:
    return (float(_need(a, "o", (int, float))),)


# A shard call may carry the epoch the caller expects the shard to be at (cluster mode:
# the epoch of its claim in etcd); a shard at another epoch refuses it (Unavailable).
FENCE = "@epoch"

# Operations of oribus.v1.Shard: each is a ShardService method of the same name.
SHARD_OPS: dict[str, Op] = {
    "read": Op(enc_read_request, lambda a: (dec_read_request(a),), enc_read_reply, dec_read_reply),
    "scan": Op(lambda p="", a="", n=1000: {"p": p, "a": a, "n": n}, dec_scan_args, enc_items, dec_items),
    "sessions": Op(lambda n=100: {"n": n}, _dec_limit, enc_sessions, dec_sessions),
    "prepare": Op(enc_shard_txn, lambda a: (dec_shard_txn(a),), enc_vote, dec_vote),
    "commit_one_phase": Op(enc_shard_txn, lambda a: (dec_shard_txn(a),), enc_outcome, dec_outcome),
    "decide": Op(_txn_args, dec_txn_args, enc_outcome, dec_outcome),
    "finish": Op(_txn_args, dec_txn_args, enc_outcome, dec_outcome),
    "release": Op(_txn_args, _dec_txn_id, _none, _none),
    "status": Op(_txn_args, _dec_txn_id, enc_status, dec_status),
    "history": Op(lambda k, n=None: {"k": k, "n": n}, dec_history_args, enc_entries, dec_entries),
    "forget": Op(lambda s, k: {"s": enc_session(s), "k": list(k)}, dec_keys_args, _none, _none),
    "reset": Op(lambda s: {"s": enc_session(s)}, lambda a: (dec_session_args(a),),
                lambda t: None if t is None else list(t), _token_or_none),
    "drop": Op(lambda s: {"s": enc_session(s)}, lambda a: (dec_session_args(a),), _none, _none),
    "reset_every_session": Op(lambda: {}, _dec_stats_args, _same, _same),
    "stats": Op(lambda: {}, _dec_stats_args, _same, _same),
    "expired": Op(lambda o: {"o": o}, _dec_older_than, enc_txn_refs, dec_txn_refs),
    "unreleased": Op(lambda: {}, _dec_stats_args, enc_txn_refs, dec_txn_refs),
}

# Operations of oribus.v1.Bus: each is a Bus method of the same name.
BUS_OPS: dict[str, Op] = {
    "read": Op(enc_read_args, dec_read_args, enc_read_result, dec_read_result),
    "commit": Op(enc_commit_request, lambda a: (dec_commit_request(a),), enc_commit_result, dec_commit_result),
    "history": Op(lambda k, n=None: {"k": k, "n": n}, dec_history_args, enc_entries, dec_entries),
    "forget": Op(lambda s, k: {"s": enc_session(s), "k": list(k)}, dec_keys_args, _none, _none),
    "reset": Op(lambda s: {"s": enc_session(s)}, lambda a: (dec_session_args(a),), _none, _none),
    "stats": Op(lambda: {}, _dec_stats_args, _same, _same),
}


def bind_ops(target: Any, table: dict[str, Op]) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    """Server side: op name -> handler(wire args) -> wire result, calling ``target.<op>``."""

    def bind(name: str, op: Op) -> Callable[[Any], Awaitable[Any]]:
        method = getattr(target, name)

        async def handler(args: Any) -> Any:
            return op.enc_result(await method(*op.dec_args(args)))

        handler.__name__ = name
        return handler

    return {name: bind(name, op) for name, op in table.items()}

