"""The wire contract — the single source of service names, frames and shared encodings.

oribus speaks gRPC with msgpack bodies (no protobuf). Two services::

    oribus.v1.Bus     client -> bus      (SDK, CLI)
    oribus.v1.Shard   bus    -> shard    (cluster mode; in-process shards skip the wire)

Each service has the same three methods:

    Stream  bidi stream   messages are BATCHES of calls / replies, multiplexed by call id:
                          one stream per connection carries every concurrent call, so a
                          transaction costs a few frames, not a few gRPC messages
    Call    unary         one call in, one reply out (CLI, tools, health probes)
    Watch   server stream request {"p": prefix, "f": from_version}; replies are batches
                          of changes (``messages.Change.to_wire``)

Frames (msgpack)::

    request batch   [[call_id, op, args], ...]
    reply batch     [[call_id, 0, result], ...]            success
                    [[call_id, 1, error], ...]             error = OribusError.to_dict()
    unary Call      request [call_id, op, args] -> reply [call_id, status, payload]

A frame that cannot be decoded fails the whole RPC with INVALID_ARGUMENT (the
server stays up); a well-formed call with bad arguments gets an InvalidRequest
error reply and changes nothing.

Beside this module: ``oribus.rpc.bus_codec`` (``BUS_OPS``) and ``oribus.rpc.shard_codec``
(``SHARD_OPS``) list each service's operations and encode their arguments and results;
``oribus.rpc.grpc_status`` maps errors to gRPC status codes and back. The shapes are
documented in ``specs/wire.md``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Mapping
from typing import Any

import msgpack

from oribus import tracing
from oribus.contract import Entry
from oribus.errors import (
    InvalidRequest,
    OribusError,
    Stale,
)
from oribus.messages import Change, ReadItem, WatchRequest
from oribus.types import DEFAULT_SCAN_LIMIT, MAX_KEYS_PER_REQUEST, SessionRef

log = logging.getLogger("oribus.rpc.wire")

BUS_SERVICE = "oribus.v1.Bus"
SHARD_SERVICE = "oribus.v1.Shard"
STREAM, CALL, WATCH = "Stream", "Call", "Watch"

# The bus's gRPC address when none is given: where ``oribus up`` and ``oribus bus`` listen
# and where clients (``oribus.connect``, the command line) connect.
DEFAULT_BUS_ADDRESS = "127.0.0.1:7700"
DEFAULT_CALL_TIMEOUT = 30.0  # seconds a call waits for its reply before it fails with Unavailable

MAX_MESSAGE_BYTES = 64 << 20  # a batch may carry several maximal values
KEEPALIVE_MS = 20_000  # a gRPC client pings a connection this often when nothing else crosses it


def channel_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, int]]:
    """gRPC options of a client channel: messages up to MAX_MESSAGE_BYTES, and a ping every
    ``keepalive_ms`` while the connection carries nothing (an idle watch, a quiet agent), so
    a peer that vanished is noticed within 10 s of the next ping."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(keepalive_ms: int = KEEPALIVE_MS) -> list[tuple[str, int]]:
    """gRPC options of a server: a client's, and it takes the pings of a client that keeps an
    idle connection alive every ``keepalive_ms``. gRPC's own default takes a ping on a
    connection without data more often than every 5 minutes as abuse and, at the third,
    ends the connection ("too many pings": an idle watch or mux stream failed with
    Unavailable after a minute); half the client's interval leaves room for its timers."""
    return [*channel_options(keepalive_ms), ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2)]


CHANNEL_OPTIONS = channel_options()
SERVER_OPTIONS = server_options()

OK, ERROR = 0, 1

# Batching that survives two-phase traffic (specs/wire.md, "Batching"), on every transport and
# both ends: a sender with more than BUSY_CALLS calls in flight on its connection (a client:
# calls awaiting their replies; a server: calls running) holds what it is about to send for
# HOLD_TURNS more turns of its event loop, so that the calls (or replies) made meanwhile, by
# the tasks the last batch woke, leave with it. Two-phase commits desynchronise the waves of
# calls that one group commit keeps together (agent-step, 2 shards: ~3 calls per message
# without it, ~7 with it, and ~20% less CPU per commit; benchmarks/agent_step_network.py). A
# connection with few calls (one sequential caller) never waits; a busy one waits loop turns
# (microseconds when nothing else is ready), never a timer.
BUSY_CALLS = 4
HOLD_TURNS = 2

# ... and a frame leaves as soon as it holds FRAME_ITEMS calls (or replies), in the middle of a
# turn: the process at the other end starts on them while this one makes the rest. Without
# this cap, 32 closed-loop clients move as one wave — the SDK's process builds 32 calls while
# the bus waits, then the bus answers 32 while the SDK's process waits — and neither process
# keeps a core busy (``oribus up``, agent-step: the bus at 62% of a core, 3,730 commits/s;
# with frames of 8, 87% and 6,370/s, measured side by side; specs/wire.md, "Batching").
FRAME_ITEMS = 8
# ... or, on the server end, as soon as its replies reach FRAME_BYTES: with 100 KB values a
# frame of 8 replies to get_many is 2.4 MB, which the client starts on only once all of it
# has come (agent-step, 100 KB values, `oribus up`, three alternated runs: 1,364 / 1,510 /
# 1,653 against 959 / 1,367 / 1,522 commits/s without the byte cap). Each reply is packed when
# it is made and a frame is its header and the packed replies in one vectored write.
FRAME_BYTES = 256 << 10

# Server side, whatever the transport: an operation's handler takes the call's wire args and
# returns its wire result (``bind_ops``); a watch handler returns the (already subscribed)
# stream of changes of one watch.
Handler = Callable[[Any], Awaitable[Any]]
WatchHandler = Callable[[WatchRequest], Awaitable[AsyncIterator[Change]]]


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


# ---- argument helpers (server side: validate shapes, raise InvalidRequest) ---------------


def need(args: Any, name: str, types: type | tuple[type, ...]) -> Any:
    if not isinstance(args, dict):
        raise InvalidRequest("arguments must be a map")
    if name not in args:
        raise InvalidRequest(f"missing argument {name!r}")
    v = args[name]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in _as_tuple(types)):
        raise InvalidRequest(f"argument {name!r} has the wrong type ({type(v).__name__})")
    return v


def opt(args: dict, name: str, types: type | tuple[type, ...], default: Any) -> Any:
    if name not in args or args[name] is None:
        return default
    return need(args, name, types)


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def enc_session(s: SessionRef) -> list:
    return [s[0], s[1]]


def dec_session(v: Any) -> SessionRef:
    if not (isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(p, str) for p in v)):
        raise InvalidRequest("session must be [agent, session_id]")
    return SessionRef(v[0], v[1])


def str_int_map(v: Any, what: str) -> dict[str, int]:
    if not isinstance(v, dict):
        raise InvalidRequest(f"{what} must be a map of key -> version")
    for k, n in v.items():
        if not isinstance(k, str) or not isinstance(n, int) or isinstance(n, bool):
            raise InvalidRequest(f"{what} must map str keys to int versions")
    return v


def int_int_map(v: Any, what: str) -> dict[int, int]:
    if not isinstance(v, dict) or not all(
        isinstance(k, int) and isinstance(n, int) for k, n in v.items()
    ):
        raise InvalidRequest(f"{what} must map shard ids to ints")
    return v


def dec_tokens(v: Any) -> dict[int, tuple[int, int]]:
    if not isinstance(v, dict):
        raise InvalidRequest("tokens must be a map of shard -> [epoch, incarnation]")
    out = {}
    for k, t in v.items():
        if not (isinstance(k, int) and isinstance(t, list | tuple) and len(t) == 2
                and all(isinstance(x, int) for x in t)):
            raise InvalidRequest("tokens must be a map of shard -> [epoch, incarnation]")
        out[k] = (t[0], t[1])
    return out


def exact_txn_fields(get: Callable[[str], Any]) -> tuple[SessionRef, dict, dict, dict, dict] | None:
    """The fields a commit request and a ``ShardTxn`` share — session ``s``, writes ``w``,
    rollback ``rb``, expect ``e``, read set ``r`` — from a wire map's ``get``, checked by exact
    types in one pass, for the codecs' fast decoders; None if any is not of the common shape
    (the checked path then decides, and names what is wrong)."""
    s = get("s")
    if type(s) is not list or len(s) != 2 or type(s[0]) is not str or type(s[1]) is not str:
        return None
    writes = get("w")
    if writes is None:
        writes = {}
    elif type(writes) is not dict:
        return None
    else:
        for k, v in writes.items():
            if type(k) is not str or (v is not None and type(v) is not bytes):
                return None
    maps = []
    for name in ("rb", "e", "r"):
        m = get(name)
        if m is None:
            m = {}
        elif type(m) is not dict:
            return None
        else:
            for k, v in m.items():
                if type(k) is not str or type(v) is not int:
                    return None
        maps.append(m)
    return SessionRef(s[0], s[1]), writes, maps[0], maps[1], maps[2]


def dec_writes(v: Any) -> dict[str, bytes | None]:
    if not isinstance(v, dict):
        raise InvalidRequest("writes must be a map of key -> encoded value (bin) or nil")
    for k, raw in v.items():
        if not isinstance(k, str) or not (raw is None or isinstance(raw, bytes)):
            raise InvalidRequest("writes must be a map of key -> encoded value (bin) or nil")
    return v


def dec_stale(v: list) -> list[Stale]:
    return [Stale(*s) for s in v]


def token_or_none(v: Any) -> tuple[int, int] | None:
    return None if v is None else (v[0], v[1])


# ---- encodings both services use -----------------------------------------------------------


def enc_read_args(session: SessionRef, keys: list[str], record: bool, only_new: bool = False) -> dict:
    a = {"s": enc_session(session), "k": list(keys), "r": record}
    if only_new:  # sent only when set: a read without it is the same message as before
        a["n"] = True
    return a


def dec_read_args(a: Any) -> tuple[SessionRef, list[str], bool, bool]:
    keys = need(a, "k", list)
    return dec_session(need(a, "s", list)), keys, bool(opt(a, "r", bool, True)), bool(opt(a, "n", bool, False))


def enc_entries(entries: list[Entry]) -> list:
    return [list(e) for e in entries]


def dec_entries(v: list) -> list[Entry]:
    return [Entry(*e) for e in v]


def dec_history_args(a: Any) -> tuple[str, int | None]:
    return need(a, "k", str), opt(a, "n", int, None)


def enc_items(items: list[ReadItem]) -> list:
    """[key, value, version] per item, plus [agent, committed_at] when it carries detail."""
    return [
        [i.key, i.value, i.version, i.agent, i.committed_at] if i.agent or i.committed_at
        else [i.key, i.value, i.version]
        for i in items
    ]


def dec_items(v: list) -> list[ReadItem]:
    return [ReadItem(*i) for i in v]


def dec_scan_args(a: Any) -> tuple[str, str, int]:
    limit = opt(a, "n", int, DEFAULT_SCAN_LIMIT)
    if limit < 1 or limit > MAX_KEYS_PER_REQUEST:
        raise InvalidRequest(f"scan limit must be 1..{MAX_KEYS_PER_REQUEST}")
    return opt(a, "p", str, ""), opt(a, "a", str, ""), limit


def dec_keys_args(a: Any) -> tuple[SessionRef, list[str]]:
    return dec_session(need(a, "s", list)), need(a, "k", list)


def dec_session_args(a: Any) -> SessionRef:
    return dec_session(need(a, "s", list))


def to_none(_: Any) -> None:
    return None


def same(v: Any) -> Any:
    return v


def dec_no_args(a: Any) -> tuple:
    return ()


class Op:
    """How one operation crosses the wire: client encodes params, server decodes them,
    server encodes the result, client decodes it."""

    __slots__ = ("dec_args", "dec_result", "enc_args", "enc_result")

    def __init__(self, enc_args: Callable[..., Any], dec_args: Callable[[Any], tuple],
                 enc_result: Callable[[Any], Any], dec_result: Callable[[Any], Any]) -> None:
        self.enc_args = enc_args  # client: *params -> wire
        self.dec_args = dec_args  # server: wire -> tuple of params (raises InvalidRequest)
        self.enc_result = enc_result  # server: result -> wire
        self.dec_result = dec_result  # client: wire -> result


def bind_ops(target: Any, table: Mapping[str, Op]) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    """Server side: op name -> handler(wire args) -> wire result, calling ``target.<op>``."""

    def bind(name: str, op: Op) -> Callable[[Any], Awaitable[Any]]:
        method = getattr(target, name)

        async def handler(args: Any) -> Any:
            carrier = tracing.carrier_of(args)  # None while tracing is off
            if carrier is None:
                return op.enc_result(await method(*op.dec_args(args)))
            with tracing.remote_parent(carrier):  # the caller's span is the parent of ours
                return op.enc_result(await method(*op.dec_args(args)))

        handler.__name__ = name
        return handler

    return {name: bind(name, op) for name, op in table.items()}



# ---- the server end of a call, whatever the transport ----------------------------------------


@types.coroutine
def _rest_of(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """The rest of ``coro``, whose first step already ran and yielded ``yielded`` (what it
    waits for): passes every later yield to the task that runs this, and every value or
    exception (a cancellation) the task sends back in, as ``await`` does."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # noqa: BLE001 - thrown in by the task (a cancellation): pass it on
            try:
                yielded = coro.throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


def start_eagerly(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> asyncio.Task | None:
    """Run ``coro`` at once, up to its first wait; None if it finished (nothing waited), else the
    task that runs the rest.

    Most calls a server runs never wait (a read or a validation of unlocked keys): a task per
    call (what ``create_task`` costs, then a loop turn to start it) is then pure overhead.
    Exceptions are the coroutine's own business: ``dispatch`` answers them, never raises.
    """
    # in a context of its own, as a task would run it: what it sets (a contextvar) stays its own
    context = contextvars.copy_context()
    try:
        yielded = context.run(coro.send, None)
    except StopIteration:
        return None

    async def rest() -> Any:
        return await _rest_of(coro, yielded)

    return loop.create_task(rest(), context=context)



def request_batch(batch: Any) -> list:
    """A decoded request message, checked to be ``[[call_id, op, args], ...]``."""
    if not isinstance(batch, list) or not all(isinstance(f, list) and len(f) == 3 for f in batch):
        raise InvalidRequest("a request batch is a list of [call_id, op, args]")
    return batch


async def dispatch(ops: Mapping[str, Handler], call_id: Any, op: Any, args: Any) -> list:
    """Run one call; its reply ``[call_id, status, payload]``. Never raises but for cancellation:
    an error is the reply's payload (an unexpected exception an ``Internal`` error)."""
    try:
        fn = ops.get(op) if isinstance(op, str) else None
        if fn is None:
            raise InvalidRequest(f"unknown operation {op!r}")
        return [call_id, OK, await fn(args)]
    except OribusError as e:
        return [call_id, ERROR, e.to_dict()]
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a bug must not take the server down: answer it
        log.exception("operation %s failed", op)
        return [call_id, ERROR, OribusError(f"internal error: {type(e).__name__}: {e}").to_dict()]
