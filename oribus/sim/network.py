"""The simulated network: the third implementation of the bus's one shard interface.

``SimShardClient`` is a ``ShardService`` like the in-process ``Shard`` and
``GrpcShardClient``; ``SimBusClient`` is the client side of a bus, like
``oribus.rpc.bus_client.RemoteBus``. Both turn every call into messages on a
``SimNetwork``:

    caller ──request──▶ server process ──(runs the real handler)──reply──▶ caller

Messages travel exactly as they would over gRPC: parameters and results are
encoded with the wire tables (``oribus.rpc.shard_codec.SHARD_OPS`` / ``bus_codec.BUS_OPS``) and
msgpack, so the two ends share no object, and errors cross as their wire
form (``OribusError.to_dict`` / ``error_from_dict``).

What the network does to a message, decided by its seeded ``random.Random``:

* **delay** — each message independently takes ``uniform(min_delay,
  max_delay)`` virtual seconds, so messages **reorder**;
* **loss** — with probability ``loss`` a message vanishes (a lost request:
  the handler never runs; a lost reply: it ran, the caller never hears — the
  ambiguous case the protocol must survive). The caller gets ``Unavailable``
  after ``call_timeout``;
* **duplication** — with probability ``duplicate`` a request is delivered
  twice (independent delays); the server runs the handler twice and the
  caller takes whichever reply arrives first, discarding the other. Requests
  are only duplicated for the operations in ``duplicate_ops`` (by default
  all but ``AT_MOST_ONCE_OPS``, see there);
* **partition** — every message to or from an isolated process is dropped
  (callers time out);
* **hold** — a request already on its way is held back and delivered later
  (``hold``; a message the asynchronous network delays for long);
* **slow** — every message to or from a slowed process takes ``slow[name]``
  seconds more (a congested link or a stalled process: everything it is part of
  reorders behind everything else);
* **crash** — calls in flight to a process that dies fail at once with
  ``Unavailable`` (the connection is reset), and calls to a process that is
  down fail after one delay (connection refused); a dead process sends
  nothing;
* **cut** — every message between two named processes is dropped, both ways (``cut``: a
  replica group's primary cut from its followers while the bus still reaches it), and the
  members' handlers of calls between them still running are cancelled (the connection
  dropped: a stream server cancels them);
* **freeze** — a stopped process (SIGSTOP, ``freeze``): nothing it sends leaves and nothing
  sent to it is handled until ``thaw``, when all of it goes out and comes in (a call held
  meanwhile may still run then: the fencing of a primary that resumes past its lease);
* **reset** — the connections to a live process break (``reset``): its calls
  in flight fail at once with ``Unavailable``, as the stream transport fails
  every call of a connection it loses (a frame one end could not read, a
  proxy or NAT dropping it); the process lives on, a request already on its
  way may still run, and its reply is dropped (the outcome is unknown).

Messages a process sends to itself (a shard resolving through its own
primary role) are delivered reliably, with a delay.

The members of a replica group call each other (``oribus.sim.group.SimPeer``) with
``table=None``: their messages are immutable objects (``oribus.shards.replica.messages``)
handed over as they are, with the same delays, loss, partitions and crashes.

Watches are not simulated: ``watch`` raises ``InvalidRequest``.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from oribus.errors import InvalidRequest, OribusError, Unavailable
from oribus.messages import Change, WatchRequest
from oribus.rpc import bus_codec, grpc_status, shard_codec, wire
from oribus.rpc.bus_client import BusByCalls
from oribus.shards.service import ShardServiceByCalls
from oribus.sim.loop import Process, current_process

ALL_OPS = frozenset({*shard_codec.SHARD_OPS, *bus_codec.BUS_OPS})
# Requests that change a session's delivery log are not duplicated by default. The log
# keeps one delivery per key and the protocol assumes each of these runs at most once (as
# over gRPC, where nothing re-sends them): a duplicated ``read`` executed after a newer
# commit records a version the client never saw, and a duplicated ``forget``/``reset``
# executed after a later read drops it — either way a session-scope commit would be
# validated against less than the client read. (Transaction scope is immune: its commits
# carry the versions read as explicit entries.) Pass ``duplicate_ops=ALL_OPS`` to see it.
AT_MOST_ONCE_OPS = frozenset({"read", "forget", "reset"})


@dataclass
class NetworkConfig:
    min_delay: float = 0.0001  # seconds a message takes at least (virtual)
    max_delay: float = 0.003  # ... and at most; independent per message, so messages reorder
    loss: float = 0.0  # probability that one message (request or reply) is lost
    duplicate: float = 0.0  # probability that a request is delivered twice
    duplicate_ops: frozenset[str] = ALL_OPS - AT_MOST_ONCE_OPS  # requests that may be duplicated
    call_timeout: float = 1.0  # a caller that heard nothing after this gets Unavailable


@dataclass
class Endpoint:
    """A named server: the object whose methods a call runs, in the process that serves it.

    ``process`` is None while the server is down; a restart installs a new
    process and target.
    """

    name: str
    process: Process | None = None
    target: Any = None
    pending: dict[int, asyncio.Future] = field(default_factory=dict)  # calls in flight to it
    calls: dict[int, tuple[str, str]] = field(default_factory=dict)  # in flight: (op, what it is about)

    def in_flight(self, label: str, ops: frozenset[str] | set[str]) -> list[int]:
        """The calls of one of ``ops`` about ``label`` (``_label``) on their way to it, unanswered."""
        return [c for c, (op, what) in self.calls.items()
                if what == label and op in ops and c in self.pending and not self.pending[c].done()]


class SimNetwork:
    """Seeded message delivery between simulated processes (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: random.Random, config: NetworkConfig,
                 trace: Callable[..., None]) -> None:
        self.loop = loop
        self.rng = rng
        self.config = config
        self.trace = trace
        self.isolated: set[str] = set()  # names of partitioned processes/endpoints
        self.slow: dict[str, float] = {}  # name -> extra seconds every message to or from it takes
        self.held: dict[int, float] = {}  # call id -> virtual time before which its request is not delivered
        self.cuts: set[tuple[str, str]] = set()  # (from, to): every message from -> to is dropped
        self.frozen: dict[str, asyncio.Event] = {}  # stopped processes -> set when they resume
        self._handlers: dict[int, tuple[str, str, asyncio.Task]] = {}  # member calls running: (from, to, task)
        self._ids = itertools.count(1)
        self.counters = {"messages": 0, "lost": 0, "duplicated": 0, "refused": 0, "reset": 0,
                         "timeouts": 0}
        self.internal_errors: list[str] = []  # handlers that raised something not an OribusError

    # ---- faults -------------------------------------------------------------------

    def isolate(self, name: str) -> None:
        self.isolated.add(name)

    def hold(self, call_id: int, seconds: float) -> None:
        """Deliver the request of call ``call_id`` (still on its way) ``seconds`` from now at the earliest."""
        self.held[call_id] = self.loop.time() + seconds

    def heal(self, name: str | None = None) -> None:
        if name is None:
            self.isolated.clear()
            self.cuts.clear()
        else:
            self.isolated.discard(name)

    def cut(self, a: str, b: str) -> None:
        """Drop every message between ``a`` and ``b``, both ways, until ``heal``. The connection
        between them is lost: the handlers of member calls between them still running are
        cancelled, as a stream server cancels a call whose connection dropped."""
        self.cuts |= {(a, b), (b, a)}
        for call_id, (src, dst, task) in sorted(self._handlers.items()):
            if {src, dst} == {a, b} and not task.done():
                self.trace("cancel", call_id)
                task.cancel()

    def reachable(self, src: str, dst: str) -> bool:
        """Would a message from ``src`` to ``dst`` get through the partitions (loss aside)?"""
        return src == dst or not (src in self.isolated or dst in self.isolated or (src, dst) in self.cuts)

    def freeze(self, name: str) -> None:
        """Process ``name`` stops (SIGSTOP): see the module docstring."""
        self.frozen.setdefault(name, asyncio.Event())

    def thaw(self, name: str) -> None:
        event = self.frozen.pop(name, None)
        if event is not None:
            event.set()

    async def _unfrozen(self, name: str) -> None:
        while (event := self.frozen.get(name)) is not None:
            await event.wait()

    def server_died(self, endpoint: Endpoint) -> None:
        """Fail every call in flight to ``endpoint`` (its connections were reset)."""
        self._fail_pending(endpoint, "it crashed")

    def reset(self, endpoint: Endpoint) -> None:
        """Break every connection to ``endpoint``, whose process lives on: its calls in flight
        fail now; a request already on its way may still run (its reply is then dropped)."""
        self._fail_pending(endpoint, "the connection broke")

    def _fail_pending(self, endpoint: Endpoint, why: str) -> None:
        pending, endpoint.pending = endpoint.pending, {}
        endpoint.calls = {}
        for call_id, fut in pending.items():
            if not fut.done():
                self.counters["reset"] += 1
                self.trace("reset", call_id, endpoint.name)
                fut.set_exception(Unavailable(f"connection to {endpoint.name} was reset ({why})"))

    # ---- calls --------------------------------------------------------------------

    def _fate(self, src: str, dst: str) -> str:
        if src == dst:
            return "ok"
        if src in self.isolated or dst in self.isolated or (src, dst) in self.cuts:
            return "partitioned"
        if self.config.loss and self.rng.random() < self.config.loss:
            return "lost"
        return "ok"

    def _delay(self, src: str = "", dst: str = "") -> float:
        extra = max(self.slow.get(src, 0.0), self.slow.get(dst, 0.0)) if self.slow else 0.0
        return self.rng.uniform(self.config.min_delay, self.config.max_delay) + extra

    async def call(self, src_name: str, dst: Endpoint, table: dict[str, wire.Op] | None, op: str,
                   *params: Any) -> Any:
        """Send ``op(*params)`` from the current process to ``dst``; return the decoded result.
        ``table`` None: the parameters and the result are passed as they are (immutable objects)."""
        src = current_process()
        if src is not None and not src.alive:
            raise asyncio.CancelledError()  # a dead process sends nothing
        if self.frozen:
            await self._unfrozen(src_name)  # a stopped process sends nothing until it resumes
        o = table[op] if table is not None else None
        payload: Any = wire.pack(o.enc_args(*params)) if o is not None else params
        call_id = next(self._ids)
        fut: asyncio.Future = self.loop.create_future()
        self.counters["messages"] += 1
        if dst.process is None or not dst.process.alive:
            self.counters["refused"] += 1
            self.trace("refused", call_id, src_name, dst.name, op)
            await asyncio.sleep(self._delay())
            raise Unavailable(f"connection to {dst.name} refused (it is down)")
        dst.pending[call_id] = fut
        label = _label(params)
        dst.calls[call_id] = (op, label)
        fate = self._fate(src_name, dst.name)
        copies = 1
        if (fate == "ok" and self.config.duplicate and op in self.config.duplicate_ops
                and src_name != dst.name and self.rng.random() < self.config.duplicate):
            copies = 2
            self.counters["duplicated"] += 1
        self.trace("send", call_id, src_name, dst.name, op, fate, copies, label)
        if fate != "ok":
            self.counters["lost"] += 1
        else:
            for _ in range(copies):
                self.loop.call_later(self._delay(src_name, dst.name), self._deliver, call_id, src_name, dst, dst.process,
                                     o, op, payload, fut)
        try:
            raw = await asyncio.wait_for(fut, self.config.call_timeout)
        except TimeoutError:
            self.counters["timeouts"] += 1
            self.trace("timeout", call_id)
            raise Unavailable(f"{op} on {dst.name} timed out; its outcome is unknown") from None
        finally:
            dst.pending.pop(call_id, None)
            dst.calls.pop(call_id, None)
        outcome, body = wire.unpack(raw) if o is not None else raw
        if outcome == wire.ERROR:
            grpc_status.raise_error(body)
        return o.dec_result(body) if o is not None else body

    def _deliver(self, call_id: int, src_name: str, dst: Endpoint, process: Process, o: wire.Op | None,
                 op: str, payload: Any, fut: asyncio.Future) -> None:
        if dst.process is not process or not process.alive:
            return  # the process it was sent to is gone (the reset already failed the call)
        if dst.name in self.frozen:  # stopped: it reads the request when it resumes
            self._when_thawed(dst.name, self._deliver, call_id, src_name, dst, process, o, op, payload, fut)
            return
        until = self.held.pop(call_id, None)
        if until is not None and until > self.loop.time():  # held back: it arrives later
            self.loop.call_later(until - self.loop.time(), self._deliver, call_id, src_name, dst, process,
                                 o, op, payload, fut)
            return
        target = dst.target
        task = process.spawn(self._serve(call_id, src_name, dst, target, o, op, payload, fut))
        if o is None:  # a member's handler: its connection's loss cancels it (``cut``)
            self._handlers[call_id] = (src_name, dst.name, task)
            task.add_done_callback(lambda _t: self._handlers.pop(call_id, None))

    def _when_thawed(self, name: str, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` once process ``name`` resumes."""
        event = self.frozen[name]

        async def later() -> None:
            await event.wait()
            callback(*args)

        self.loop.create_task(later(), context=contextvars.Context())  # no process's: the message is on its way

    async def _serve(self, call_id: int, src_name: str, dst: Endpoint, target: Any,
                     o: wire.Op | None, op: str, payload: Any, fut: asyncio.Future) -> None:
        self.trace("run", call_id, dst.name, op)
        try:
            if o is None:
                reply = [wire.OK, await getattr(target, op)(*payload)]
            else:
                args = o.dec_args(wire.unpack(payload))
                reply = [wire.OK, o.enc_result(await getattr(target, op)(*args))]
        except OribusError as e:
            reply = [wire.ERROR, e.to_dict()]
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in a handler: report it, answer like a server would
            self.internal_errors.append(f"{dst.name}.{op}: {e!r}")
            reply = [wire.ERROR, {"code": "Internal", "message": f"{op} failed: {e!r}"}]
        raw = wire.pack(reply) if o is not None else tuple(reply)
        if self.frozen:
            await self._unfrozen(dst.name)  # a stopped server answers when it resumes
        fate = self._fate(dst.name, src_name)
        self.trace("reply", call_id, fate, "error" if reply[0] == wire.ERROR else "ok")
        if fate != "ok":
            self.counters["lost"] += 1
            return
        self.loop.call_later(self._delay(dst.name, src_name), _answer, fut, raw)


def _label(params: tuple) -> str:
    """What a call is about, for the trace: its transaction or commit id, or its keys."""
    if not params:
        return ""
    p = params[0]
    for attr in ("txn_id", "commit_id"):
        if hasattr(p, attr):
            return getattr(p, attr)
    if isinstance(p, str):
        return p
    keys = getattr(p, "keys", None)
    if isinstance(keys, list):
        return ",".join(keys)
    if len(params) > 1 and isinstance(params[1], list):
        return ",".join(map(str, params[1]))
    return ""


def _answer(fut: asyncio.Future, raw: Any) -> None:
    if not fut.done():  # a duplicate's reply, or one after the caller gave up: discarded
        fut.set_result(raw)


class SimShardClient(ShardServiceByCalls):
    """How a process (the bus, or a shard resolving a transaction) reaches shard ``shard_id``."""

    def __init__(self, network: SimNetwork, src: str, shard_id: int, endpoint: Endpoint) -> None:
        self.network = network
        self.src = src
        self.shard_id = shard_id
        self.endpoint = endpoint

    async def _call(self, op: str, *params: Any) -> Any:
        return await self.network.call(self.src, self.endpoint, shard_codec.SHARD_OPS, op, *params)

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        raise InvalidRequest("watch is not simulated")


class SimBusClient(BusByCalls):
    """The client side of a bus over the simulated network (what ``AsyncSession`` calls)."""

    def __init__(self, network: SimNetwork, src: str, endpoint: Endpoint) -> None:
        self.network = network
        self.src = src
        self.endpoint = endpoint

    async def _call(self, op: str, *params: Any) -> Any:
        return await self.network.call(self.src, self.endpoint, bus_codec.BUS_OPS, op, *params)

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        raise InvalidRequest("watch is not simulated")
