"""The codecs decode enum values through the maps of ``oribus.messages`` (SCOPES, VOTE_KINDS,
TXN_STATES) instead of calling the enum: every member is there, every decoded value is the member
itself, and a value that names none is still refused."""

from __future__ import annotations

import pytest

from oribus.errors import InvalidRequest
from oribus.messages import (
    SCOPES,
    TXN_STATES,
    VOTE_KINDS,
    Scope,
    ShardTxn,
    TxnOutcome,
    TxnState,
    TxnStatus,
    Vote,
    VoteKind,
)
from oribus.rpc import bus_codec, shard_codec
from oribus.types import SessionRef


@pytest.mark.parametrize(("enum", "by_value"), [(Scope, SCOPES), (VoteKind, VOTE_KINDS), (TxnState, TXN_STATES)])
def test_every_member_is_mapped_by_its_value(enum, by_value):
    assert by_value == {m.value: m for m in enum}
    assert all(enum(v) is m for v, m in by_value.items())


def test_votes_outcomes_statuses_and_scopes_decode_to_the_members():
    for kind in VoteKind:
        got = shard_codec.dec_vote(shard_codec.enc_vote(Vote(kind, lease=1.5 if kind is VoteKind.YES else 0.0)))
        assert got.kind is kind
    for state in TxnState:
        assert shard_codec.dec_outcome(shard_codec.enc_outcome(TxnOutcome(state))).state is state
        assert shard_codec.dec_status(shard_codec.enc_status(TxnStatus(state, 0, (0, 1), 0.5))).state is state
    for scope in Scope:
        st = ShardTxn(txn_id="t", session=SessionRef("a", "s"), scope=scope)
        assert shard_codec.dec_shard_txn(shard_codec.enc_shard_txn(st)).scope is scope


def test_an_unknown_scope_is_refused_by_both_services():
    st = shard_codec.enc_shard_txn(ShardTxn(txn_id="t", session=SessionRef("a", "s")))
    with pytest.raises(InvalidRequest):
        shard_codec.dec_shard_txn({**st, "sc": "global"})
    with pytest.raises(InvalidRequest, match="scope must be"):
        bus_codec.dec_commit_request({"s": ["a", "s"], "id": "c1", "sc": "global"})
