"""Bad input over the wire: refused with a message, nothing changes, the server stays up.

Raw bytes go to ``/oribus.v1.Bus/Call`` and ``/oribus.v1.Bus/Stream`` through a
plain gRPC channel (no SDK, so nothing is validated on the way). Frames that
cannot be decoded fail the RPC with INVALID_ARGUMENT; well-formed calls with
bad arguments get an error reply (InvalidRequest / ValueTooLarge). After every
case the state is checked and a normal call must still work.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import grpc
import msgpack
import pytest
from conftest import keys_on_shard
from grpc_health.v1 import health_pb2
from processes import health_status, run_cli

import oribus
from oribus.rpc import wire
from oribus.types import DEFAULT_MAX_VALUE_BYTES

CALL = wire.method_path(wire.BUS_SERVICE, wire.CALL)
STREAM = wire.method_path(wire.BUS_SERVICE, wire.STREAM)
WATCH = wire.method_path(wire.BUS_SERVICE, wire.WATCH)

SESSION = ["mallory", "s1"]
TARGET = "bad-input/target"  # every bad call aims at this key; it must stay absent
SENTINEL = "bad-input/sentinel"  # written once before; must keep its value and version
VALUE_LIMIT = DEFAULT_MAX_VALUE_BYTES  # the servers run with the default


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def value(v) -> bytes:
    return pack(v)


_ids = itertools.count(1)


def commit_args(**over) -> dict:
    args = {"s": SESSION, "id": "bad-input-commit", "w": {TARGET: value(1)}}
    args.update(over)
    return args


def fresh(args):
    """``args`` with a commit id never used before (a refused 2PC leaves its id tombstoned:
    a retry of the same id answers Aborted, not the original error)."""
    if isinstance(args, dict) and isinstance(args.get("id"), str) and args["id"]:
        return {**args, "id": f"bad-input-{next(_ids)}"}
    return args


# Frames that are not a call at all: the RPC fails with INVALID_ARGUMENT.
UNDECODABLE_CALLS = {
    "garbage bytes": b"\xc1\xff\x00garbage",
    "empty message": b"",
    "truncated msgpack": pack([1, "commit", commit_args()])[:-3],
    "trailing bytes": pack([1, "stats", {}]) + b"\xc1",
    "a map, not a call": pack({"op": "commit", "args": commit_args()}),
    "a call of two fields": pack([1, "commit"]),
    "a plain string": pack("commit"),
}

# Well-formed calls with bad arguments: an error reply (code, message), nothing changes.
BAD_CALLS = {
    "unknown op": ("drop_all", {}, "InvalidRequest"),
    "op is not a str": (42, {}, "InvalidRequest"),
    "args are not a map": ("commit", [SESSION, TARGET], "InvalidRequest"),
    "read: keys not a list": ("read", {"s": SESSION, "k": TARGET}, "InvalidRequest"),
    "read: session not a pair": ("read", {"s": "mallory", "k": [TARGET]}, "InvalidRequest"),
    "read: key is an int": ("read", {"s": SESSION, "k": [7]}, "InvalidRequest"),
    "read: empty key": ("read", {"s": SESSION, "k": [""]}, "InvalidRequest"),
    "read: key with a control char": (
        "read",
        {"s": SESSION, "k": ["bad\x01key"]},
        "InvalidRequest",
    ),
    "commit: missing session": ("commit", {"id": "x", "w": {TARGET: value(1)}}, "InvalidRequest"),
    "commit: empty agent": ("commit", commit_args(s=["", "s1"]), "InvalidRequest"),
    "commit: id is an int": ("commit", commit_args(id=5), "InvalidRequest"),
    "commit: empty id": ("commit", commit_args(id=""), "InvalidRequest"),
    "commit: writes not a map": ("commit", commit_args(w=[TARGET, value(1)]), "InvalidRequest"),
    "commit: value is an int, not encoded bytes": (
        "commit",
        commit_args(w={TARGET: 1}),
        "InvalidRequest",
    ),
    "commit: value is a str, not encoded bytes": (
        "commit",
        commit_args(w={TARGET: "one"}),
        "InvalidRequest",
    ),
    "commit: leading slash key": (
        "commit",
        commit_args(w={"/" + TARGET: value(1)}),
        "InvalidRequest",
    ),
    "commit: empty namespace key": (
        "commit",
        commit_args(w={"bad-input//target": value(1)}),
        "InvalidRequest",
    ),
    "commit: key over 1024 bytes": (
        "commit",
        commit_args(w={"k" * 1025: value(1)}),
        "InvalidRequest",
    ),
    "commit: bad key among good ones": (
        "commit",
        commit_args(w={TARGET: value(1), "trailing/": value(2)}),
        "InvalidRequest",
    ),
    "commit: a key under the reserved .sbus/ prefix": (
        "commit",
        commit_args(w={TARGET: value(1), ".sbus/" + TARGET: value({"created_at": "x"})}),
        "InvalidRequest",
    ),
    "commit: a delete under the reserved .sbus/ prefix": ("commit", commit_args(w={".sbus/x": None}), "InvalidRequest"),
    "commit: a rollback under the reserved .sbus/ prefix": (
        "commit", commit_args(w={}, rb={".sbus/x": 0}), "InvalidRequest",
    ),
    "commit: expect version is a str": ("commit", commit_args(e={TARGET: "0"}), "InvalidRequest"),
    "commit: negative expect": ("commit", commit_args(e={TARGET: -1}), "InvalidRequest"),
    "commit: bad scope": ("commit", commit_args(sc="global"), "InvalidRequest"),
    "commit: token not a pair": ("commit", commit_args(t={0: "epoch"}), "InvalidRequest"),
    "commit: written and rolled back": ("commit", commit_args(rb={TARGET: 0}), "InvalidRequest"),
    "commit: rollback to a future version": (
        "commit",
        commit_args(w={}, rb={TARGET: 3}),
        "InvalidRequest",
    ),
    "commit: value over 1 MiB": (
        "commit",
        commit_args(w={TARGET: value(b"x" * (VALUE_LIMIT + 1))}),
        "ValueTooLarge",
    ),
    "commit: oversized value next to a good one": (
        "commit",
        commit_args(w={SENTINEL: value("overwritten"), TARGET: value([0] * (VALUE_LIMIT + 64))}),
        "ValueTooLarge",
    ),
    "commit: value bytes that are not msgpack": (
        "commit",
        commit_args(w={TARGET: b"\xc1"}),
        "InvalidRequest",
    ),
    "commit: value with trailing bytes": (
        "commit",
        commit_args(w={TARGET: value(1) + b"\x01"}),
        "InvalidRequest",
    ),
    "commit: truncated value": (
        "commit",
        commit_args(w={TARGET: value([1, 2, 3])[:-1]}),
        "InvalidRequest",
    ),
    "commit: value with a str that is not UTF-8": (
        "commit",
        commit_args(w={TARGET: b"\xa2\xff\xfe"}),
        "InvalidRequest",
    ),
    "history: key is a list": ("history", {"k": [TARGET]}, "InvalidRequest"),
    "history: zero limit": ("history", {"k": TARGET, "n": 0}, "InvalidRequest"),
    "forget: keys not a list": ("forget", {"s": SESSION, "k": 5}, "InvalidRequest"),
}


@pytest.fixture(scope="module")
def server(up_embedded):
    with oribus.Client(up_embedded.address, agent="setup") as c:
        c.put(SENTINEL, {"keep": True})
    return up_embedded


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(
        server.address, options=[("grpc.max_send_message_length", 8 << 20)]
    ) as ch:
        yield ch


def unary(channel: grpc.Channel, raw: bytes) -> list:
    reply = channel.unary_unary(CALL)(raw, timeout=10)
    return msgpack.unpackb(reply, raw=False, strict_map_key=False)


def stream(channel: grpc.Channel, messages: list[bytes]) -> list:
    """Send ``messages`` on one Stream, close our side, return every reply frame."""
    replies = channel.stream_stream(STREAM)(iter(messages), timeout=10)
    frames = []
    for raw in replies:
        frames.extend(msgpack.unpackb(raw, raw=False, strict_map_key=False))
    return frames


def assert_nothing_changed(server) -> None:
    """The target key was never written, the sentinel kept its value, and the bus still serves."""
    assert server.proc.poll() is None, "the server process died"
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    with oribus.Client(server.address, agent="checker") as c:
        items = c.get_many([TARGET, SENTINEL])
        assert items[TARGET].version == 0 and items[TARGET].value is None
        assert items[SENTINEL] == oribus.Item(SENTINEL, {"keep": True}, 1)
        assert c.history(TARGET) == []


@pytest.mark.parametrize("raw", list(UNDECODABLE_CALLS.values()), ids=list(UNDECODABLE_CALLS))
def test_undecodable_call_is_invalid_argument(server, channel, raw):
    with pytest.raises(grpc.RpcError) as e:
        unary(channel, raw)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details(), "INVALID_ARGUMENT must say what was wrong"
    assert_nothing_changed(server)
    # the server still answers a normal call on the same channel
    call_id, status, stats = unary(channel, pack([9, "stats", {}]))
    assert (call_id, status) == (9, wire.OK) and len(stats["shards"]) == 2


@pytest.mark.parametrize("case", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_arguments_get_an_error_reply(server, channel, case):
    op, args, code = case
    call_id, status, error = unary(channel, pack([77, op, fresh(args)]))
    assert (call_id, status) == (77, wire.ERROR)
    assert error["code"] == code
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert_nothing_changed(server)
    assert unary(channel, pack([78, "history", {"k": SENTINEL}]))[1] == wire.OK


def test_value_too_large_says_how_large(server, channel):
    raw = value(b"\x01" * VALUE_LIMIT)  # a bin of exactly the limit: with its header, just over
    size = len(raw)
    _, status, error = unary(channel, pack([1, "commit", fresh(commit_args(w={TARGET: raw}))]))
    assert status == wire.ERROR and error["code"] == "ValueTooLarge"
    assert error["details"]["size"] == size and error["details"]["limit"] == VALUE_LIMIT
    assert_nothing_changed(server)


def test_unknown_shard_in_a_token_is_refused(server, channel):
    # A token naming a shard the bus does not have: a client bug or a forged request.
    _, status, error = unary(channel, pack([1, "commit", fresh(commit_args(t={99: [1, 1]}))]))
    assert status == wire.ERROR
    assert error["code"] == "InvalidRequest", error
    assert_nothing_changed(server)


@pytest.mark.parametrize(
    "messages",
    [
        [b"\xc1 not msgpack"],
        [pack({"calls": []})],
        [pack([[1, "stats"]])],
        [pack([[1, "stats", {}]]), b"\x93\x01"],  # a good batch, then a truncated one
    ],
    ids=["garbage", "a map, not a batch", "a frame of two fields", "good then truncated"],
)
def test_undecodable_stream_message_is_invalid_argument(server, channel, messages):
    with pytest.raises(grpc.RpcError) as e:
        stream(channel, messages)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details()
    assert_nothing_changed(server)


def test_bad_calls_in_a_stream_batch_get_error_replies(server, channel):
    batch = [[i, op, fresh(args)] for i, (op, args, _) in enumerate(BAD_CALLS.values(), 1)]
    good = len(batch) + 1
    batch.append([good, "read", {"s": SESSION, "k": [SENTINEL], "r": False}])
    frames = {f[0]: f for f in stream(channel, [pack(batch)])}
    assert set(frames) == set(range(1, good + 1)), "every call gets exactly one reply"
    for i, (_, _, code) in enumerate(BAD_CALLS.values(), 1):
        _, status, error = frames[i]
        assert status == wire.ERROR and error["code"] == code, (i, error)
        assert error["message"]
    _, status, result = frames[good]
    assert status == wire.OK
    ((key, raw, version),) = result["i"]
    assert (key, msgpack.unpackb(raw), version) == (SENTINEL, {"keep": True}, 1)
    assert_nothing_changed(server)


def test_oversized_value_in_a_stream_is_refused(server, channel):
    frames = stream(
        channel, [pack([[5, "commit", fresh(commit_args(w={TARGET: value("y" * (VALUE_LIMIT + 1))}))]])]
    )
    assert len(frames) == 1
    call_id, status, error = frames[0]
    assert (call_id, status, error["code"]) == (5, wire.ERROR, "ValueTooLarge")
    assert_nothing_changed(server)


@pytest.mark.parametrize(
    "raw",
    [b"\xc1", pack(["prefix"]), pack({"p": 5}), pack({"p": "", "f": "zero"})],
    ids=["garbage", "a list", "prefix not a str", "from_version not an int"],
)
def test_bad_watch_request_is_invalid_argument(server, channel, raw):
    with pytest.raises(grpc.RpcError) as e:
        for _ in channel.unary_stream(WATCH)(raw, timeout=10):
            pass
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details()
    assert_nothing_changed(server)


def test_bad_input_on_a_shard_process(up_processes):
    """The shard service behind ``up --processes`` refuses garbage the same way and stays up."""
    data = Path(up_processes.args[up_processes.args.index("--data-dir") + 1])
    addr = (data / ".shard-0.addr").read_text().splitlines()[0]  # where ``up`` found its shard 0 (gRPC)
    call = wire.method_path(wire.SHARD_SERVICE, wire.CALL)
    key = keys_on_shard(0, "bad-input/shard")[0]
    with grpc.insecure_channel(addr) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(call)(b"\xc1\xc1", timeout=10)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        bad = {"id": "t1", "s": SESSION, "w": {key: 1}}  # a value that is not encoded bytes
        _, status, error = msgpack.unpackb(
            ch.unary_unary(call)(pack([1, "prepare", bad]), timeout=10)
        )
        assert status == wire.ERROR and error["code"] == "InvalidRequest"
        _, status, stats = msgpack.unpackb(ch.unary_unary(call)(pack([2, "stats", {}]), timeout=10))
        assert status == wire.OK and stats["prepared"] == 0
    with oribus.Client(up_processes.address, agent="checker") as c:
        assert c.get(key).version == 0


def test_cli_put_with_bad_json_fails_clearly(server):
    r = run_cli("put", "--addr", server.address, TARGET, "{not json")
    assert r.returncode != 0
    err = json.loads(r.stderr.strip().splitlines()[-1])
    assert err["error"] == "InvalidRequest" and "JSON" in err["message"]
    assert r.stdout == ""
    assert_nothing_changed(server)


def test_cli_put_with_bad_key_fails_clearly(server):
    r = run_cli("put", "--addr", server.address, "/" + TARGET, "1")
    assert r.returncode != 0
    err = json.loads(r.stderr.strip().splitlines()[-1])
    assert err["error"] == "InvalidRequest" and "key" in err["message"]
    assert "Traceback" not in r.stderr
    assert_nothing_changed(server)


def test_bad_input_on_a_shard_stream_listener(up_processes):
    """The stream listener the bus calls refuses garbage by closing that connection only, answers
    well-formed calls with bad arguments with InvalidRequest, and stays up."""
    import socket

    from oribus.rpc import frames

    data = Path(up_processes.args[up_processes.args.index("--data-dir") + 1])
    address = (data / ".shard-0.addr").read_text().splitlines()[1]
    assert address.startswith("unix:")  # up --processes: the shards' stream listeners are Unix sockets
    path = address.removeprefix("unix:")
    key = keys_on_shard(0, "bad-input/stream")[0]
    hello = frames.pack_frame(frames.hello(wire.SHARD_SERVICE, frames.CALLS))

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        return sock

    def exchange(*chunks: bytes) -> list:
        """Send ``chunks`` on a fresh connection; every frame until the server closes it."""
        with connect() as sock:
            for c in chunks:
                sock.sendall(c)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return [frames.unpack_body(b) for b in frames.FrameReader().feed(data)]

    for garbage in (b"\xc1\xc1\xc1\xc1\xc1", frames.frame(b"\xc1"), frames.LENGTH.pack(1 << 31),
                    hello + frames.pack_frame({"not": "a batch"}), hello + frames.LENGTH.pack(1 << 31)):
        got = exchange(garbage)
        assert got[-1]["code"] == "InvalidRequest", got
    bad = {"id": "t1", "s": SESSION, "w": {key: 1}}  # a value that is not encoded bytes
    answer, replies = exchange(hello, frames.pack_frame([[1, "prepare", bad], [2, "stats", {}]]))
    assert answer == []
    by_id = {r[0]: r for r in replies}
    assert by_id[1][1] == wire.ERROR and by_id[1][2]["code"] == "InvalidRequest"
    assert by_id[2][1] == wire.OK and by_id[2][2]["prepared"] == 0
    with oribus.Client(up_processes.address, agent="checker") as c:
        assert c.get(key).version == 0
