"""Watch pieces without an engine: messages, replay planning, the per-watcher queue, resuming."""

from __future__ import annotations

import asyncio
from dataclasses import FrozenInstanceError, replace
from typing import Any

import pytest

from oribus.client.retry import RetryPolicy
from oribus.client.watch import RESUME_MARGIN_SECONDS, WatchStream
from oribus.errors import (
    HistoryTruncated,
    InvalidRequest,
    Unavailable,
    WatchLagged,
    error_from_dict,
)
from oribus.messages import Change, WatchRequest
from oribus.shards.store import VersionedStore
from oribus.shards.watch import Watcher, plan_replay
from oribus.types import SessionRef, encode_value

S = SessionRef("agent", "s1")


def change(key: str, version: int, value: object = None) -> Change:
    raw = encode_value(value if value is not None else version)
    return Change(key, version, raw, False, "agent", "s1", f"c{version}", 1000.0 + version)


def store_with(history_limit: int = 100, **versions: int) -> VersionedStore:
    """A store where key ``k`` (``_`` spelled ``/``) has versions 1..n, committed at time 1000+v."""
    store = VersionedStore(history_limit)
    for name, n in versions.items():
        key = name.replace("_", "/")
        for v in range(1, n + 1):
            store.apply(key, v, encode_value(v), False, S, f"{key}@{v}", 1000.0 + v)
    return store


# ---- messages ----------------------------------------------------------------------------------


def test_change_round_trips_through_its_wire_form():
    c = Change("a/b", 3, b"\x01", False, "agent", "s1", "c1", 12.5)
    assert Change.from_wire(c.to_wire()) == c
    assert Change.from_wire(Change("k", 4, None, True, "a", "s", "c", 1).to_wire()).deleted
    with pytest.raises(InvalidRequest):
        Change.from_wire(["k", 1, None])
    with pytest.raises(InvalidRequest):
        Change.from_wire(["k", "1", None, False, "a", "s", "c", 1.0])


def test_watch_request_round_trips_and_validates():
    req = WatchRequest("team/", 4, {"team/a": 2}, 99.0)
    assert WatchRequest.from_wire(req.to_wire()) == req
    assert WatchRequest.from_wire({"p": "x/"}) == WatchRequest("x/")
    bad_fields: list[dict[str, Any]] = [
        {"prefix": 5},
        {"prefix": "a\x00"},
        {"prefix": "p/", "from_version": True},
        {"prefix": "p/", "from_version": -1},
        {"prefix": "p/", "after": {"q/x": 1}},  # not under the prefix
        {"prefix": "p/", "after": {"p/x": -2}},
        {"prefix": "p/", "after": [("p/x", 1)]},
        {"prefix": "p/", "since": float("nan")},
    ]
    for fields in bad_fields:  # the constructor refuses it, and so does every way in
        with pytest.raises(InvalidRequest):
            WatchRequest(**fields)
        with pytest.raises(InvalidRequest):
            replace(WatchRequest("p/"), **fields)
        wire = {"p": fields["prefix"], "f": fields.get("from_version"), "a": fields.get("after"),
                "s": fields.get("since")}
        with pytest.raises(InvalidRequest):
            WatchRequest.from_wire(wire)
    with pytest.raises(InvalidRequest):
        WatchRequest.from_wire(["p/"])


def test_watch_request_keeps_its_own_after():
    seen = {"p/a": 1}
    req = WatchRequest("p/", after=seen)
    seen["p/a"] = 7
    seen["p/b"] = 2
    assert req.after == {"p/a": 1}
    with pytest.raises(FrozenInstanceError):
        req.prefix = "q/"  # type: ignore[misc]


def test_new_errors_sit_in_the_tree_and_round_trip():
    assert issubclass(WatchLagged, Unavailable) and WatchLagged.retryable
    assert issubclass(HistoryTruncated, InvalidRequest) and not HistoryTruncated.retryable
    for cls in (WatchLagged, HistoryTruncated):
        e = error_from_dict(cls("why", shard=1).to_dict())
        assert type(e) is cls and e.details == {"shard": 1}


# ---- replay planning -------------------------------------------------------------------------------


def test_replay_from_version_per_key_in_version_order():
    store = store_with(p_a=4, p_b=2, q_c=3)
    got = plan_replay(store, WatchRequest("p/", 1))
    assert [(c.key, c.version) for c in got] == [("p/a", 2), ("p/a", 3), ("p/a", 4), ("p/b", 2)]
    assert got[0].commit_id == "p/a@2" and got[0].committed_at == 1002.0


def test_live_only_replays_nothing_and_after_overrides_per_key():
    store = store_with(p_a=4, p_b=2)
    assert plan_replay(store, WatchRequest("p/")) == []
    got = plan_replay(store, WatchRequest("p/", None, {"p/a": 3}))
    assert [(c.key, c.version) for c in got] == [("p/a", 4)]  # p/b: live only
    got = plan_replay(store, WatchRequest("p/", 0, {"p/a": 3}))
    assert [(c.key, c.version) for c in got] == [("p/a", 4), ("p/b", 1), ("p/b", 2)]


def test_replay_since_a_commit_time():
    store = store_with(p_a=5, p_b=2)
    got = plan_replay(store, WatchRequest("p/", since=1003.5))
    assert [(c.key, c.version) for c in got] == [("p/a", 4), ("p/a", 5)]
    got = plan_replay(store, WatchRequest("p/", None, {"p/a": 4}, since=1001.5))
    assert [(c.key, c.version) for c in got] == [("p/a", 5), ("p/b", 2)]


def test_replay_never_skips_versions_that_are_gone():
    store = store_with(history_limit=3, p_old=10, p_new=2)  # p/old keeps 8..10
    with pytest.raises(HistoryTruncated) as e:
        plan_replay(store, WatchRequest("p/", 0))
    assert e.value.details["keys"] == [["p/old", 0, 8]]
    assert [c.version for c in plan_replay(store, WatchRequest("p/", 7)) if c.key == "p/old"] == [8, 9, 10]
    # per-key positions need only what each key lacks
    assert [c.version for c in plan_replay(store, WatchRequest("p/", None, {"p/old": 9}))] == [10]
    with pytest.raises(HistoryTruncated):
        plan_replay(store, WatchRequest("p/", since=1005.0))  # every kept version is newer


# ---- the watcher's queue -----------------------------------------------------------------------------


async def test_watcher_yields_replay_then_live_and_dedupes_the_join():
    detached = []
    w = Watcher("p/", shard_id=0, limit=10, detach=detached.append)
    w.set_replay([change("p/a", 1), change("p/a", 2)])
    w.offer(change("p/a", 2))  # already given by the replay
    w.offer(change("p/a", 3))
    w.offer(change("p/b", 1))
    assert [(c.key, c.version) for c in [await w.__anext__() for _ in range(4)]] == [
        ("p/a", 1), ("p/a", 2), ("p/a", 3), ("p/b", 1),
    ]
    w.end()
    with pytest.raises(StopAsyncIteration):
        await w.__anext__()
    assert detached == [w]


async def test_a_full_watcher_is_cut_off_after_what_it_holds():
    detached = []
    w = Watcher("p/", shard_id=2, limit=3, detach=detached.append)
    for v in range(1, 6):
        w.offer(change("p/a", v))  # never blocks
    assert w.lagged and detached == [w]
    assert [(await w.__anext__()).version for _ in range(3)] == [1, 2, 3]
    with pytest.raises(WatchLagged) as e:
        await w.__anext__()
    assert e.value.details == {"shard": 2}
    with pytest.raises(StopAsyncIteration):
        await w.__anext__()


async def test_closing_a_watcher_ends_a_pending_read():
    w = Watcher("", shard_id=0, detach=lambda _: None)
    pending = asyncio.create_task(w.__anext__())
    await asyncio.sleep(0)
    await w.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 1)


# ---- the resumable client stream -----------------------------------------------------------------------


class ScriptedBus:
    """A bus whose watch streams follow a script: lists of changes, each ending with an error or not."""

    def __init__(self, *scripts: list) -> None:
        self.scripts = list(scripts)
        self.calls: list[tuple] = []

    def watch(self, request: WatchRequest):
        self.calls.append(request)
        script = self.scripts.pop(0)
        if isinstance(script, Exception):
            raise script
        return _Scripted(script)


class _Scripted:
    def __init__(self, items: list) -> None:
        self.items = list(items)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


FAST = RetryPolicy(retries=3, base_delay=0.0001, max_delay=0.0002)


async def test_stream_resumes_from_last_seen_per_key_and_skips_repeats():
    bus = ScriptedBus(
        [change("p/a", 1), change("p/b", 1), change("p/a", 2), WatchLagged("behind")],
        [change("p/a", 2), change("p/a", 3), change("p/c", 1)],  # a repeat, then new ones
    )
    stream = WatchStream(bus, "p/", 0, policy=FAST)
    got = [(ev.key, ev.version, ev.value) async for ev in stream]
    assert got == [("p/a", 1, 1), ("p/b", 1, 1), ("p/a", 2, 2), ("p/a", 3, 3), ("p/c", 1, 1)]
    assert bus.calls == [WatchRequest("p/", 0), WatchRequest("p/", 0, {"p/a": 2, "p/b": 1})]
    assert stream.last_seen == {"p/a": 3, "p/b": 1, "p/c": 1}


async def test_live_stream_resumes_unseen_keys_from_when_it_began():
    bus = ScriptedBus([change("p/a", 5), Unavailable("bus restarting")], [])
    stream = WatchStream(bus, "p/", policy=FAST)
    await stream.start()
    began = stream._started_at
    assert [ev.version async for ev in stream] == [5]
    resumed = bus.calls[1]
    assert resumed.prefix == "p/" and resumed.from_version is None and resumed.after == {"p/a": 5}
    assert resumed.since == pytest.approx(began - RESUME_MARGIN_SECONDS)


async def test_stream_gives_up_after_bounded_retries():
    down = Unavailable("down")
    bus = ScriptedBus([WatchLagged("behind")], down, down, down, down)
    stream = WatchStream(bus, "p/", policy=FAST)
    with pytest.raises(Unavailable):
        await stream.__anext__()
    assert len(bus.calls) == 1 + FAST.retries  # the subscription, then the bounded retries
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_stream_raises_errors_that_are_not_retryable():
    bus = ScriptedBus([change("p/a", 1), WatchLagged("behind")], HistoryTruncated("gone"))
    stream = WatchStream(bus, "p/", 0, policy=FAST)
    assert (await stream.__anext__()).version == 1
    with pytest.raises(HistoryTruncated):
        await stream.__anext__()
