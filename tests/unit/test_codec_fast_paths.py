"""``dec_shard_txn`` (shards) and ``dec_commit_request`` (the bus) decode the common shape inline and
everything else through the checked path: whatever the map, each answers exactly what its checked
path answers (the same message, or an InvalidRequest with the same text), and every message the
other side encodes round-trips through the fast path."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from oribus.contract import CommitRequest
from oribus.errors import InvalidRequest
from oribus.messages import Scope, ShardTxn
from oribus.rpc import bus_codec, shard_codec, wire
from oribus.types import SessionRef

keys = st.text(min_size=1, max_size=6)
ints = st.integers(-3, 2**40)
str_int_maps = st.dictionaries(keys, ints, max_size=3)

shard_txns = st.builds(
    ShardTxn,
    txn_id=st.text(max_size=12),
    session=st.builds(SessionRef, st.text(min_size=1, max_size=5), st.text(min_size=1, max_size=5)),
    writes=st.dictionaries(keys, st.one_of(st.none(), st.binary(max_size=8)), max_size=3),
    rollback=str_int_maps,
    expect=str_int_maps,
    read_set=str_int_maps,
    scope=st.sampled_from(Scope),
    since_seq=st.one_of(st.none(), ints),
    token=st.one_of(st.none(), st.tuples(ints, ints)),
    strict=st.booleans(),
    participants=st.lists(st.integers(0, 8), max_size=3).map(tuple),
    primary=st.integers(0, 8),
    committed_at=st.floats(0, 2e9),
    deadline=st.one_of(st.none(), st.floats(0, 2e9)),
)

# what a field may hold on the wire, right or wrong
anything = st.one_of(
    st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.binary(max_size=4), st.lists(st.one_of(ints, st.booleans(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.one_of(keys, ints), st.one_of(ints, st.booleans(), st.none(), st.binary(max_size=3)),
                    max_size=2),
    st.sampled_from(["session", "transaction", "", "global"]),
)
FIELDS = ["id", "s", "w", "rb", "e", "r", "sc", "q", "t", "st", "ps", "p", "at", "dl"]


def answer(decode, a):
    try:
        return decode(a)
    except InvalidRequest as e:
        return ("InvalidRequest", e.message)


@settings(max_examples=200, deadline=None)
@given(shard_txns)
def test_every_shard_txn_round_trips_through_the_common_shape(txn):
    a = wire.unpack(wire.pack(shard_codec.enc_shard_txn(txn)))
    assert shard_codec._common_shard_txn(a) == txn  # the fast path takes what a bus sends
    assert shard_codec.dec_shard_txn(a) == shard_codec._dec_shard_txn_checked(a) == txn


@settings(max_examples=600, deadline=None)
@given(shard_txns, st.dictionaries(st.sampled_from(FIELDS), anything, max_size=4),
       st.lists(st.sampled_from(FIELDS), max_size=2))
def test_any_map_gets_the_checked_paths_answer(txn, changed, removed):
    a = wire.unpack(wire.pack(shard_codec.enc_shard_txn(txn)))
    a.update(changed)
    for name in removed:
        a.pop(name, None)
    expected = answer(shard_codec._dec_shard_txn_checked, a)
    got = answer(shard_codec.dec_shard_txn, a)
    if isinstance(expected, ShardTxn) and expected.deadline is not None and math.isnan(expected.deadline):
        raise AssertionError("the checked path never accepts a NaN deadline")
    assert got == expected
    fast = shard_codec._common_shard_txn(a)
    assert fast is None or fast == expected


def test_maps_that_are_not_the_common_shape_still_decode_or_are_refused_by_the_checked_path():
    base = shard_codec.enc_shard_txn(ShardTxn(txn_id="t", session=SessionRef("a", "s")))
    # valid, not the common shape: a token of bools (the checked path's rules decide)
    assert shard_codec._common_shard_txn({**base, "t": [True, 1]}) is None
    assert shard_codec.dec_shard_txn({**base, "t": [True, 1]}).token == (True, 1)
    # refused, with the checked path's message
    for bad, message in [({"sc": ""}, "bad scope"), ({"p": True}, "'p'"), ({"dl": math.inf}, "finite")]:
        got = answer(shard_codec.dec_shard_txn, {**base, **bad})
        assert got[0] == "InvalidRequest" and message in got[1], (bad, got)
    assert answer(shard_codec.dec_shard_txn, ["not", "a", "map"])[0] == "InvalidRequest"


values = st.one_of(st.none(), ints.map(wire.pack), st.text(max_size=5).map(wire.pack),
                   st.binary(max_size=4))  # the last: mostly not one msgpack object
commit_requests = st.builds(
    CommitRequest,
    session=st.builds(SessionRef, st.text(min_size=1, max_size=5), st.text(min_size=1, max_size=5)),
    commit_id=st.text(max_size=12),
    writes=st.dictionaries(keys, values, max_size=3),
    rollback=str_int_maps,
    expect=str_int_maps,
    read_set=str_int_maps,
    scope=st.sampled_from(Scope),
    since=st.dictionaries(st.integers(0, 8), ints, max_size=2),
    tokens=st.dictionaries(st.integers(0, 8), st.tuples(ints, ints), max_size=2),
    strict=st.booleans(),
    complete_tokens=st.booleans(),
)
REQUEST_FIELDS = ["s", "id", "w", "rb", "e", "r", "sc", "since", "t", "st", "ct"]


@settings(max_examples=200, deadline=None)
@given(commit_requests)
def test_every_commit_request_round_trips_through_the_common_shape(request):
    a = wire.unpack(wire.pack(bus_codec.enc_commit_request(request)))
    assert bus_codec._common_commit_request(a) == request
    assert answer(bus_codec.dec_commit_request, a) == answer(bus_codec._dec_commit_request_checked, a)


@settings(max_examples=600, deadline=None)
@given(commit_requests, st.dictionaries(st.sampled_from(REQUEST_FIELDS), anything, max_size=4),
       st.lists(st.sampled_from(REQUEST_FIELDS), max_size=2))
def test_any_commit_map_gets_the_checked_paths_answer(request, changed, removed):
    a = wire.unpack(wire.pack(bus_codec.enc_commit_request(request)))
    a.update(changed)
    for name in removed:
        a.pop(name, None)
    assert answer(bus_codec.dec_commit_request, a) == answer(bus_codec._dec_commit_request_checked, a)
