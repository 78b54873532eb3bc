"""``wire.start_eagerly``: a call runs at once up to its first wait; a task runs the rest."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from oribus.rpc import wire


async def test_a_coroutine_that_never_waits_finishes_at_once_without_a_task():
    ran = []

    async def quick() -> None:
        ran.append("all of it")

    assert wire.start_eagerly(asyncio.get_running_loop(), quick()) is None
    assert ran == ["all of it"]


async def test_a_coroutine_that_waits_runs_its_first_step_now_and_the_rest_in_a_task():
    steps = []
    gate = asyncio.get_running_loop().create_future()

    async def slow() -> str:
        steps.append("before")
        await gate
        steps.append("after")
        for _ in range(3):
            await asyncio.sleep(0)
        return "done"

    task = wire.start_eagerly(asyncio.get_running_loop(), slow())
    assert steps == ["before"] and task is not None and not task.done()
    gate.set_result(None)
    assert await task == "done"
    assert steps == ["before", "after"]


async def test_an_error_after_the_first_wait_reaches_the_task():
    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError("late")

    task = wire.start_eagerly(asyncio.get_running_loop(), failing())
    assert task is not None
    with pytest.raises(ValueError, match="late"):
        await task


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits():
    seen = []

    async def waiting() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleaned up")

    task = wire.start_eagerly(asyncio.get_running_loop(), waiting())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled", "cleaned up"]


async def test_a_value_sent_back_after_a_wait_is_the_awaited_result():
    async def reads() -> int:
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, 41)
        return await fut + 1

    task = wire.start_eagerly(asyncio.get_running_loop(), reads())
    assert task is not None and await task == 42


async def test_what_a_call_sets_in_its_context_stays_its_own_across_its_wait():
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="outside")
    seen = []

    async def call(name: str) -> None:
        var.set(name)
        await asyncio.sleep(0)
        seen.append((name, var.get()))

    loop = asyncio.get_running_loop()
    tasks = [wire.start_eagerly(loop, call(n)) for n in ("a", "b")]
    assert var.get() == "outside"  # the caller's context is untouched
    await asyncio.gather(*tasks)
    assert seen == [("a", "a"), ("b", "b")]
