"""The client's retry budget: a server's ``retry_after`` is honoured, and ``Unavailable`` is
retried for a time (a failover's length), not for a count of attempts."""

from __future__ import annotations

import asyncio

import pytest

import oribus
from oribus.client.retry import MAX_RETRY_AFTER, Backoff, RetryPolicy, retry_after
from oribus.errors import Conflict, InvalidRequest, Unavailable


def test_delay_after_waits_what_the_server_asked_capped():
    policy = RetryPolicy()
    for _ in range(50):
        assert 0.3 <= policy.delay_after(Unavailable("grace", retry_after=0.3), 0) <= 0.33
        assert MAX_RETRY_AFTER <= policy.delay_after(Unavailable("x", retry_after=600), 0) <= MAX_RETRY_AFTER * 1.1
        assert policy.delay_after(Conflict("c"), 0) <= policy.base_delay


@pytest.mark.parametrize("value", [True, -1, "soon", None, [1]])
def test_a_malformed_retry_after_is_ignored(value):
    assert retry_after(Unavailable("x", retry_after=value)) is None
    assert RetryPolicy().delay_after(Unavailable("x", retry_after=value), 0) <= 0.5


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unavailable_is_retried_for_a_time_not_a_count():
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(retries=3, unavailable_for=20.0), clock=clock)
    waits = 0
    while backoff.after(Unavailable("electing")) is not None:
        waits += 1
        clock.now += 0.5
    assert waits == 40  # 20 s of 0.5 s steps, far past retries=3
    assert clock.now == pytest.approx(120.0)


def test_conflicts_keep_their_count_and_a_conflict_ends_a_run_of_unavailable():
    clock = FakeClock()
    backoff = Backoff(RetryPolicy(retries=2, unavailable_for=5.0), clock=clock)
    assert backoff.after(Unavailable("down")) is not None
    clock.now += 4.0
    assert backoff.after(Conflict("stale")) is not None  # the shard answered: the run is over
    clock.now += 4.0
    assert backoff.after(Unavailable("down again")) is not None  # a new run, a new 5 s
    assert backoff.after(Conflict("stale")) is not None
    assert backoff.after(Conflict("stale")) is None  # third conflict: retries=2 spent
    assert Backoff(RetryPolicy()).after(InvalidRequest("bad")) is None


async def test_run_rides_out_unavailable_longer_than_its_retry_count(tmp_path, monkeypatch):
    """A shard unavailable for 30 attempts (a primary being replaced) does not fail run():
    with the old count-only budget (20 attempts) it raised Unavailable."""
    async with oribus.open_local(tmp_path, agent="a") as bus:
        real_get = bus._bus.read
        failures = {"left": 30}

        async def flaky_read(*args, **kwargs):
            if failures["left"]:
                failures["left"] -= 1
                raise Unavailable("shard 0 has no primary", shard=0)
            return await real_get(*args, **kwargs)

        monkeypatch.setattr(bus._bus, "read", flaky_read)
        policy = RetryPolicy(base_delay=0.0001, unavailable_max_delay=0.001)

        async def step(tx):
            item = await tx.get("k")
            tx.put("k", (item.value or 0) + 1)

        await bus.run(step, policy=policy)
        assert failures["left"] == 0
        assert (await bus.get("k")).value == 1


async def test_a_commit_resent_after_unavailable_waits_the_servers_retry_after(tmp_path, monkeypatch):
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay, *args, **kwargs):
        sleeps.append(delay)
        await real_sleep(0)

    async with oribus.open_local(tmp_path, agent="a") as bus:
        real_commit = bus._bus.commit
        calls = {"n": 0}

        async def grace_then_commit(req):
            calls["n"] += 1
            if calls["n"] == 1:
                raise Unavailable("shard 0 restarted: in its restart grace", shard=0, retry_after=0.25)
            return await real_commit(req)

        monkeypatch.setattr(bus._bus, "commit", grace_then_commit)
        monkeypatch.setattr(asyncio, "sleep", recording_sleep)
        assert await bus.put("k", 1) == 1
    assert calls["n"] == 2
    assert any(0.25 <= s <= 0.275 for s in sleeps), sleeps
