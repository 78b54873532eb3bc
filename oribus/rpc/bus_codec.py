"""The operations of ``oribus.v1.Bus`` (client → bus): ``BUS_OPS`` and their encodings.

Each op is a ``BusService`` method of the same name; the frames that carry them and the
helpers shared with the shard service are in ``oribus.rpc.wire``, the shapes in
``specs/wire.md``.
"""

from __future__ import annotations

from typing import Any

import msgpack

from oribus.contract import CommitRequest, CommitResult, ReadResult
from oribus.errors import (
    InvalidRequest,
)
from oribus.messages import (
    SCOPES,
    ReadItem,
    Scope,
)
from oribus.rpc.wire import (
    Op,
    dec_entries,
    dec_history_args,
    dec_items,
    dec_keys_args,
    dec_no_args,
    dec_read_args,
    dec_scan_args,
    dec_session,
    dec_session_args,
    dec_tokens,
    dec_writes,
    enc_entries,
    enc_items,
    enc_read_args,
    enc_session,
    exact_txn_fields,
    int_int_map,
    need,
    opt,
    same,
    str_int_map,
    to_none,
)
from oribus.types import DEFAULT_SCAN_LIMIT


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


def enc_read_result(r: ReadResult) -> dict:
    out = {
        "i": [[i.key, i.value, i.version] for i in r.items],
        "t": {s: list(t) for s, t in r.tokens.items()},
        "q": dict(r.seqs),
    }
    if r.skipped:  # only_new reads: the keys the session had been given already
        out["x"] = list(r.skipped)
    return out


def dec_read_result(v: dict) -> ReadResult:
    return ReadResult(
        [ReadItem(k, val, ver) for k, val, ver in v["i"]],
        {s: (t[0], t[1]) for s, t in v["t"].items()},
        dict(v["q"]),
        list(v.get("x", ())),
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
    """A ``CommitRequest`` from its wire map: the shape the SDKs send is checked inline (exact
    types, one pass), anything else by ``_dec_commit_request_checked``, which accepts the same
    and names what is wrong. Written values are checked to be msgpack either way."""
    fast = _common_commit_request(a)
    if fast is None:
        return _dec_commit_request_checked(a)
    _decodable(fast.writes)
    return fast


def _common_commit_request(a: Any) -> CommitRequest | None:
    """The request of a map of the common shape, as ``_dec_commit_request_checked`` decodes it
    (but for the values' msgpack check); None for anything else."""
    if type(a) is not dict:
        return None
    get = a.get
    commit_id, sc = get("id"), get("sc")
    scope = Scope.SESSION if sc is None else SCOPES.get(sc) if type(sc) is str else None
    if scope is None or type(commit_id) is not str:
        return None
    shared = exact_txn_fields(get)
    if shared is None:
        return None
    session, writes, rollback, expect, read_set = shared
    since, t, strict, complete = get("since"), get("t"), get("st"), get("ct")
    if since is None:
        since = {}
    elif type(since) is not dict:
        return None
    else:
        for k, v in since.items():
            if type(k) is not int or type(v) is not int:
                return None
    tokens = {}
    if t is not None:
        if type(t) is not dict:
            return None
        for k, v in t.items():
            if type(k) is not int or type(v) is not list or len(v) != 2 or type(v[0]) is not int \
                    or type(v[1]) is not int:
                return None
            tokens[k] = (v[0], v[1])
    if (strict is not None and type(strict) is not bool) or (complete is not None and type(complete) is not bool):
        return None
    return CommitRequest(session=session, commit_id=commit_id, writes=writes, rollback=rollback,
                         expect=expect, read_set=read_set, scope=scope, since=since, tokens=tokens,
                         strict=bool(strict), complete_tokens=bool(complete))


def _dec_commit_request_checked(a: Any) -> CommitRequest:
    scope = opt(a, "sc", str, "session")
    sc = SCOPES.get(scope)
    if sc is None:
        raise InvalidRequest(f"scope must be 'session' or 'transaction', not {scope!r}")
    return CommitRequest(
        session=dec_session(need(a, "s", list)),
        commit_id=need(a, "id", str),
        writes=_decodable(dec_writes(opt(a, "w", dict, {}))),
        rollback=str_int_map(opt(a, "rb", dict, {}), "rollback"),
        expect=str_int_map(opt(a, "e", dict, {}), "expect"),
        read_set=str_int_map(opt(a, "r", dict, {}), "read_set"),
        scope=sc,
        since=int_int_map(opt(a, "since", dict, {}), "since"),
        tokens=dec_tokens(opt(a, "t", dict, {})),
        strict=bool(opt(a, "st", bool, False)),
        complete_tokens=bool(opt(a, "ct", bool, False)),
    )


def enc_commit_result(r: CommitResult) -> dict:
    return {"id": r.commit_id, "v": r.versions, "t": {s: list(t) for s, t in r.tokens.items()}, "2pc": r.two_phase}


def dec_commit_result(v: dict) -> CommitResult:
    return CommitResult(v["id"], dict(v["v"]), {s: (t[0], t[1]) for s, t in v["t"].items()}, v["2pc"])


def enc_endpoints(stream: str) -> dict:
    return {"stream": stream}


def dec_endpoints(v: Any) -> str:
    """The bus's stream address from an ``endpoints`` reply: "" for none (a bus that serves
    gRPC only), ``:PORT`` for the port on the host the client reached the bus at."""
    stream = v.get("stream", "") if isinstance(v, dict) else ""
    return stream if isinstance(stream, str) else ""


# Operations of oribus.v1.Bus: each is a Bus method of the same name.
BUS_OPS: dict[str, Op] = {
    "read": Op(enc_read_args, dec_read_args, enc_read_result, dec_read_result),
    "commit": Op(enc_commit_request, lambda a: (dec_commit_request(a),), enc_commit_result, dec_commit_result),
    "history": Op(lambda k, n=None: {"k": k, "n": n}, dec_history_args, enc_entries, dec_entries),
    "forget": Op(lambda s, k: {"s": enc_session(s), "k": list(k)}, dec_keys_args, to_none, to_none),
    "reset": Op(lambda s: {"s": enc_session(s)}, lambda a: (dec_session_args(a),), to_none, to_none),
    "stats": Op(lambda: {}, dec_no_args, same, same),
    "scan": Op(lambda p="", a="", n=DEFAULT_SCAN_LIMIT: {"p": p, "a": a, "n": n}, dec_scan_args, enc_items, dec_items),
}

# What the bus process serves beside BUS_OPS, answered by the server rather than the Bus:
# ``endpoints``, the other listeners a client may switch to (the stream transport).
SERVER_OPS: dict[str, Op] = {
    "endpoints": Op(lambda: {}, dec_no_args, enc_endpoints, dec_endpoints),
}
