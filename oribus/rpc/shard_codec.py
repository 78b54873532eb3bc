"""The operations of ``oribus.v1.Shard`` (bus → shard): ``SHARD_OPS`` and their encodings.

Each op is a ``ShardService`` method of the same name (the messages of
``oribus.messages``); every call may carry ``FENCE``, the epoch the caller expects.
The frames are in ``oribus.rpc.wire``, the shapes in ``specs/wire.md``.
"""

from __future__ import annotations

import math
from typing import Any

from oribus.errors import (
    InvalidRequest,
)
from oribus.messages import (
    SCOPES,
    TXN_STATES,
    VOTE_KINDS,
    ReadReply,
    ReadRequest,
    Scope,
    ShardTxn,
    TxnOutcome,
    TxnStatus,
    Vote,
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
    dec_stale,
    dec_writes,
    enc_entries,
    enc_items,
    enc_read_args,
    enc_session,
    exact_txn_fields,
    need,
    opt,
    same,
    str_int_map,
    to_none,
    token_or_none,
)
from oribus.types import (
    DEFAULT_SCAN_LIMIT,
    DEFAULT_SESSIONS_LISTED,
    MAX_SESSIONS_LISTED,
)


def enc_read_request(r: ReadRequest) -> dict:
    a = enc_read_args(r.session, r.keys, r.record, r.only_new)
    if r.detail:
        a["d"] = True
    return a


def dec_read_request(a: Any) -> ReadRequest:
    s, keys, record, only_new = dec_read_args(a)
    return ReadRequest(s, keys, record, bool(opt(a, "d", bool, False)), only_new)


def enc_read_reply(r: ReadReply) -> list:
    if r.skipped:
        return [enc_items(r.items), list(r.token), r.seq, r.skipped]
    return [enc_items(r.items), list(r.token), r.seq]


def dec_read_reply(v: list) -> ReadReply:
    items, token, seq, *skipped = v
    return ReadReply(dec_items(items), (token[0], token[1]), seq, list(skipped[0]) if skipped else [])


def enc_sessions(v: list) -> list:
    return [[list(s), entries, idle] for s, entries, idle in v]


def dec_sessions(v: list) -> list:
    return [((s[0], s[1]), dict(entries), idle) for s, entries, idle in v]


def _dec_limit(a: Any) -> tuple:
    limit = opt(a, "n", int, DEFAULT_SESSIONS_LISTED)
    if limit < 1 or limit > MAX_SESSIONS_LISTED:
        raise InvalidRequest(f"limit must be 1..{MAX_SESSIONS_LISTED}")
    return (limit,)


def enc_shard_txn(t: ShardTxn) -> dict:
    a = {
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
    if t.deadline is not None:
        a["dl"] = t.deadline
    return a


def dec_shard_txn(a: Any) -> ShardTxn:
    """A ``ShardTxn`` from its wire map. The shape every bus sends is checked inline (exact types,
    one pass: a third of the time of a check per field, and two of these are decoded per cross-shard
    commit); anything else goes through ``_dec_shard_txn_checked``, which accepts the same and
    names what is wrong."""
    fast = _common_shard_txn(a)
    return fast if fast is not None else _dec_shard_txn_checked(a)


def _common_shard_txn(a: Any) -> ShardTxn | None:
    """The ShardTxn of a map of the common shape, exactly as ``_dec_shard_txn_checked`` decodes it;
    None for anything else (it may still be valid: the checked path decides)."""
    if type(a) is not dict:
        return None
    get = a.get
    txn_id = get("id")
    if type(txn_id) is not str:
        return None
    shared = exact_txn_fields(get)
    if shared is None:
        return None
    session, writes, rollback, expect, read_set = shared
    sc = get("sc")
    scope = Scope.SESSION if sc is None else SCOPES.get(sc) if type(sc) is str else None
    q, t, strict, ps, p, at, dl = get("q"), get("t"), get("st"), get("ps"), get("p"), get("at"), get("dl")
    if scope is None or (q is not None and type(q) is not int):
        return None
    if t is not None:
        if type(t) is not list or len(t) != 2 or type(t[0]) is not int or type(t[1]) is not int:
            return None
        t = (t[0], t[1])
    if (strict is not None and type(strict) is not bool) or (ps is not None and type(ps) is not list) \
            or (p is not None and type(p) is not int) or (at is not None and type(at) not in _NUMBERS):
        return None
    if dl is not None:
        if type(dl) not in _NUMBERS or not math.isfinite(dl):
            return None
        dl = float(dl)
    return ShardTxn(txn_id=txn_id, session=session, writes=writes, rollback=rollback,
                    expect=expect, read_set=read_set, scope=scope, since_seq=q, token=t,
                    strict=bool(strict), participants=() if ps is None else tuple(ps),
                    primary=0 if p is None else p, committed_at=0.0 if at is None else float(at), deadline=dl)


_NUMBERS = (int, float)


def _dec_shard_txn_checked(a: Any) -> ShardTxn:
    token = opt(a, "t", list, None)
    if token is not None and not (len(token) == 2 and all(isinstance(x, int) for x in token)):
        raise InvalidRequest("token must be [epoch, incarnation]")
    scope = SCOPES.get(opt(a, "sc", str, "session"))
    if scope is None:
        raise InvalidRequest("bad scope")
    return ShardTxn(
        txn_id=need(a, "id", str),
        session=dec_session(need(a, "s", list)),
        writes=dec_writes(opt(a, "w", dict, {})),
        rollback=str_int_map(opt(a, "rb", dict, {}), "rollback"),
        expect=str_int_map(opt(a, "e", dict, {}), "expect"),
        read_set=str_int_map(opt(a, "r", dict, {}), "read_set"),
        scope=scope,
        since_seq=opt(a, "q", int, None),
        token=token_or_none(token),
        strict=bool(opt(a, "st", bool, False)),
        participants=tuple(opt(a, "ps", list, [])),
        primary=opt(a, "p", int, 0),
        committed_at=float(opt(a, "at", (int, float), 0.0)),
        deadline=_dec_deadline(opt(a, "dl", (int, float), None)),
    )


def _dec_deadline(d: Any) -> float | None:
    if d is None:
        return None
    if isinstance(d, bool) or not math.isfinite(d):
        raise InvalidRequest("a deadline is a finite number of seconds since the epoch")
    return float(d)


def enc_vote(v: Vote) -> list:
    out: list[Any] = [v.kind.value, [list(s) for s in v.stale], v.versions]
    if v.lease:
        out.append(v.lease)  # a read-only participant's lease, in seconds
    return out


def dec_vote(v: list) -> Vote:
    return Vote(VOTE_KINDS[v[0]], dec_stale(v[1]), dict(v[2]), lease=float(v[3]) if len(v) > 3 else 0.0)


def enc_outcome(o: TxnOutcome) -> list:
    out: list[Any] = [o.state.value, o.versions, [list(s) for s in o.stale],
                      None if o.token is None else list(o.token)]
    if o.reason:
        out.append(o.reason)
    return out


def dec_outcome(v: list) -> TxnOutcome:
    return TxnOutcome(TXN_STATES[v[0]], dict(v[1]), dec_stale(v[2]), token_or_none(v[3]),
                      reason=str(v[4]) if len(v) > 4 else "")


def enc_status(s: TxnStatus) -> list:
    return [None if s.state is None else s.state.value, s.primary, list(s.participants), s.age]


def dec_status(v: list) -> TxnStatus:
    return TxnStatus(None if v[0] is None else TXN_STATES[v[0]], v[1], tuple(v[2]), v[3])


def dec_txn_args(a: Any) -> tuple[str, bool]:
    return need(a, "i", str), bool(opt(a, "c", bool, False))


def _decide_args(txn_id: str, commit: bool = False, deadline: float | None = None) -> dict:
    a: dict = {"i": txn_id, "c": commit}
    if deadline is not None:
        a["d"] = deadline
    return a


def _dec_decide_args(a: Any) -> tuple[str, bool, float | None]:
    return need(a, "i", str), bool(opt(a, "c", bool, False)), _dec_deadline(opt(a, "d", (int, float), None))


def enc_txn_refs(txns: list) -> list:
    return [[t.txn_id, t.primary, list(t.participants)] for t in txns]


def dec_txn_refs(v: list) -> list:
    from oribus.messages import TxnRef

    return [TxnRef(i, p, tuple(ps)) for i, p, ps in v]


def _txn_args(txn_id: str, commit: bool = False) -> dict:
    return {"i": txn_id, "c": commit}


def _dec_txn_id(a: Any) -> tuple:
    return (need(a, "i", str),)


def _dec_txn_ids(a: Any) -> tuple:
    ids = need(a, "i", list)
    if not all(isinstance(i, str) for i in ids):
        raise InvalidRequest("i must be a list of transaction ids (str)")
    return (ids,)


def _dec_older_than(a: Any) -> tuple:
    return (float(need(a, "o", (int, float))),)


# A shard call may carry the epoch the caller expects the shard to be at (cluster mode:
# the epoch of its claim in etcd); a shard at another epoch refuses it (Unavailable).
FENCE = "@epoch"


# Operations of oribus.v1.Shard: each is a ShardService method of the same name.
SHARD_OPS: dict[str, Op] = {
    "read": Op(enc_read_request, lambda a: (dec_read_request(a),), enc_read_reply, dec_read_reply),
    "scan": Op(lambda p="", a="", n=DEFAULT_SCAN_LIMIT: {"p": p, "a": a, "n": n}, dec_scan_args, enc_items, dec_items),
    "sessions": Op(lambda n=DEFAULT_SESSIONS_LISTED: {"n": n}, _dec_limit, enc_sessions, dec_sessions),
    "prepare": Op(enc_shard_txn, lambda a: (dec_shard_txn(a),), enc_vote, dec_vote),
    "validate": Op(enc_shard_txn, lambda a: (dec_shard_txn(a),), enc_vote, dec_vote),
    "release_lease": Op(_txn_args, _dec_txn_id, to_none, to_none),
    "release_leases": Op(lambda ids: {"i": list(ids)}, _dec_txn_ids, to_none, to_none),
    "commit_one_phase": Op(enc_shard_txn, lambda a: (dec_shard_txn(a),), enc_outcome, dec_outcome),
    "withdraw": Op(enc_shard_txn, lambda a: (dec_shard_txn(a),), enc_outcome, dec_outcome),
    "decide": Op(_decide_args, _dec_decide_args, enc_outcome, dec_outcome),
    "finish": Op(_txn_args, dec_txn_args, enc_outcome, dec_outcome),
    "release": Op(_txn_args, _dec_txn_id, to_none, to_none),
    "status": Op(_txn_args, _dec_txn_id, enc_status, dec_status),
    "history": Op(lambda k, n=None: {"k": k, "n": n}, dec_history_args, enc_entries, dec_entries),
    "forget": Op(lambda s, k: {"s": enc_session(s), "k": list(k)}, dec_keys_args, to_none, to_none),
    "reset": Op(lambda s: {"s": enc_session(s)}, lambda a: (dec_session_args(a),),
                lambda t: None if t is None else list(t), token_or_none),
    "drop": Op(lambda s: {"s": enc_session(s)}, lambda a: (dec_session_args(a),), to_none, to_none),
    "reset_every_session": Op(lambda: {}, dec_no_args, same, same),
    "stats": Op(lambda: {}, dec_no_args, same, same),
    "expired": Op(lambda o: {"o": o}, _dec_older_than, enc_txn_refs, dec_txn_refs),
    "unreleased": Op(lambda: {}, dec_no_args, enc_txn_refs, dec_txn_refs),
}
