"""``Teardown``: the one way every host stops what it started (oribus/hosts/lifecycle.py).

Last started, first stopped; a step that fails is logged with its part's name and the
others still run; graceful parts get the grace period; a second stop does nothing.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from oribus.hosts.lifecycle import Teardown


class Parts:
    """Parts that note in ``stopped`` when (and with what grace) they were stopped."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    def plain(self, name: str):
        return lambda: self.stopped.append(name)

    def async_(self, name: str):
        async def stop() -> None:
            await asyncio.sleep(0)
            self.stopped.append(name)

        return stop

    def failing(self, name: str, error: BaseException):
        def stop() -> None:
            self.stopped.append(name)
            raise error

        return stop


async def test_parts_stop_last_started_first_plain_or_async():
    parts, teardown = Parts(), Teardown()
    teardown.push("lock", parts.plain("lock"))
    teardown.push("shard 0", parts.async_("shard 0"))
    teardown.push("shard 1", parts.async_("shard 1"))
    teardown.push("server", parts.plain("server"))
    await teardown.stop()
    assert parts.stopped == ["server", "shard 1", "shard 0", "lock"]


async def test_a_failing_step_is_logged_by_name_and_the_others_still_run(caplog):
    parts, teardown = Parts(), Teardown()
    teardown.push("lock", parts.plain("lock"))
    teardown.push("journal", parts.failing("journal", OSError("disk gone")))
    teardown.push("shard 0", parts.failing("shard 0", RuntimeError("flush failed")))
    teardown.push("server", parts.plain("server"))
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="flush failed"):
        await teardown.stop()  # the first failure, raised once every step has run
    assert parts.stopped == ["server", "shard 0", "journal", "lock"]
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("shard 0" in m and "flush failed" in m for m in failed), failed
    assert any("journal" in m and "disk gone" in m for m in failed), failed


async def test_a_second_stop_does_nothing_and_a_concurrent_one_waits_for_the_first():
    parts, teardown = Parts(), Teardown()
    release = asyncio.Event()

    async def slow() -> None:
        await release.wait()
        parts.stopped.append("slow")

    teardown.push("lock", parts.plain("lock"))
    teardown.push("slow", slow)
    first = asyncio.create_task(teardown.stop())
    second = asyncio.create_task(teardown.stop())
    await asyncio.sleep(0.01)
    assert not second.done(), "a stop made while one runs returned before the parts stopped"
    release.set()
    await asyncio.gather(first, second)
    assert parts.stopped == ["slow", "lock"]
    await teardown.stop()
    assert parts.stopped == ["slow", "lock"]


async def test_a_second_stop_after_a_failed_one_neither_repeats_nor_raises():
    parts, teardown = Parts(), Teardown()
    teardown.push("shard", parts.failing("shard", OSError("x")))
    with pytest.raises(OSError):
        await teardown.stop()
    await teardown.stop()
    assert parts.stopped == ["shard"]


async def test_graceful_parts_get_the_grace_period():
    got: list[float] = []
    teardown = Teardown(grace=1.5)
    teardown.push("server", got.append, graceful=True)
    await teardown.stop()
    teardown.push("server", got.append, graceful=True)
    await teardown.stop(grace=0.25)
    assert got == [1.5, 0.25]


async def test_parts_pushed_after_a_stop_are_stopped_by_the_next_one():
    parts, teardown = Parts(), Teardown()
    teardown.push("first run", parts.plain("first run"))
    await teardown.stop()
    teardown.push("second run", parts.plain("second run"))
    await teardown.stop()
    assert parts.stopped == ["first run", "second run"]


async def test_stop_on_error_stops_what_started_and_raises_the_start_error():
    parts, teardown = Parts(), Teardown()
    with pytest.raises(ValueError, match="port taken"):
        async with teardown.stop_on_error():
            teardown.push("lock", parts.plain("lock"))
            teardown.push("shard", parts.failing("shard", OSError("close failed")))
            raise ValueError("port taken")
    assert parts.stopped == ["shard", "lock"]


async def test_stop_on_error_stops_nothing_when_the_start_succeeds():
    parts, teardown = Parts(), Teardown()
    async with teardown.stop_on_error():
        teardown.push("lock", parts.plain("lock"))
    assert parts.stopped == []
    await teardown.stop()
    assert parts.stopped == ["lock"]


async def test_a_cancelled_stop_still_stops_every_part():
    parts, teardown = Parts(), Teardown()
    teardown.push("lock", parts.plain("lock"))
    teardown.push("slow", parts.async_("slow"))
    stopping = asyncio.create_task(teardown.stop())
    await asyncio.sleep(0)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    await teardown.stop()  # waits for the round the cancelled call began
    assert parts.stopped == ["slow", "lock"]


async def test_a_cancelled_task_part_is_cancelled_and_awaited():
    teardown = Teardown()
    task = asyncio.create_task(asyncio.sleep(60))
    teardown.push_task("maintenance", task)
    await teardown.stop()
    assert task.cancelled()


async def test_a_task_that_loses_its_first_cancel_is_cancelled_again():
    """As a sweep does whose shard call (asyncio.wait_for, before Python 3.12) got its reply
    together with the cancel: the loop goes on, and a stop waiting for it must not hang."""
    lost = []

    async def sweep() -> None:
        while True:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost.append("cancel")  # dropped, the loop goes on

    task = asyncio.create_task(sweep())
    await asyncio.sleep(0)
    teardown = Teardown()
    teardown.push_task("transaction sweep", task)
    await asyncio.wait_for(teardown.stop(), 5)
    assert lost == ["cancel"] and task.cancelled()


async def test_a_task_that_had_failed_fails_its_step():
    async def broken() -> None:
        raise OSError("sweep broke")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    teardown = Teardown()
    teardown.push_task("transaction sweep", task)
    with pytest.raises(OSError, match="sweep broke"):
        await teardown.stop()
