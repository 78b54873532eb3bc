"""``fan_out`` answers as ``asyncio.gather`` does (results in order, the first error raised or, with
return_exceptions, returned in place; the others run to their end; a cancelled caller cancels
them), with one task fewer: the first coroutine runs in the caller's task."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oribus.bus.fanout import fan_out
from oribus.errors import Unavailable


async def call(delay_turns: int, outcome: object, finished: list) -> object:
    for _ in range(delay_turns):
        await asyncio.sleep(0)
    finished.append(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


PLANS = st.lists(st.tuples(st.integers(0, 3), st.one_of(st.integers(), st.just("fail"))), min_size=0, max_size=4)


def outcomes(plan: list) -> list:
    return [Unavailable(f"shard {i}") if o == "fail" else o for i, (_, o) in enumerate(plan)]


async def run(gatherer, plan: list, return_exceptions: bool) -> tuple[object, list]:
    finished: list = []
    values = outcomes(plan)
    coros = [call(turns, v, finished) for (turns, _), v in zip(plan, values, strict=True)]
    try:
        got = await gatherer(coros, return_exceptions)
    except Unavailable as e:
        got = ("raised", e.message)
    for _ in range(5):  # let the calls still running finish
        await asyncio.sleep(0)
    got = [("error", g.message) if isinstance(g, Unavailable) else g for g in got] if isinstance(got, list) else got
    return got, sorted(map(str, finished))


@settings(max_examples=60, deadline=None)
@given(PLANS, st.booleans())
def test_fan_out_answers_as_gather_does(plan, return_exceptions):
    async def both():
        expected = await run(lambda cs, r: asyncio.gather(*cs, return_exceptions=r), plan, return_exceptions)
        got = await run(lambda cs, r: fan_out(cs, return_exceptions=r), plan, return_exceptions)
        return expected, got

    expected, got = asyncio.run(both())
    assert got[1] == expected[1]  # every call ran to its end
    if isinstance(expected[0], tuple):  # gather raised: fan_out raises an error of a failed call
        assert isinstance(got[0], tuple) and got[0][0] == "raised"
    else:
        assert got[0] == expected[0]


async def test_the_first_coroutine_runs_in_the_callers_task_and_the_others_in_tasks_of_their_own():
    me = asyncio.current_task()
    seen: list = []

    async def where() -> None:
        seen.append(asyncio.current_task() is me)

    await fan_out([where(), where(), where()])
    assert seen == [True, False, False]


async def test_a_cancelled_caller_cancels_the_calls_it_started():
    started = asyncio.Event()
    cancelled: list[int] = []

    async def slow(i: int) -> None:
        try:
            started.set()
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    caller = asyncio.ensure_future(fan_out([slow(0), slow(1), slow(2)]))
    await started.wait()
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0)
    assert sorted(cancelled) == [0, 1, 2]


async def test_a_failed_call_leaves_no_unretrieved_error_behind(caplog):
    async def fail(turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        raise Unavailable("down")

    with pytest.raises(Unavailable):
        await fan_out([fail(0), fail(2)])
    for _ in range(5):
        await asyncio.sleep(0)
    import gc

    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_fan_out_runs_in_a_calls_first_step_outside_any_task():
    # a server runs each call up to its first wait before any task exists (wire.start_eagerly)
    from oribus.rpc.wire import start_eagerly

    got: list = []

    async def handler() -> None:
        got.append(asyncio.current_task())
        got.append(await fan_out([call(1, "a", []), call(0, "b", [])]))

    loop = asyncio.get_running_loop()
    started: asyncio.Future = loop.create_future()

    def begin() -> None:  # a plain callback, as a connection's data_received is
        try:
            started.set_result(start_eagerly(loop, handler()))
        except Exception as e:
            started.set_exception(e)

    loop.call_soon(begin)
    task = await started
    assert task is not None
    await task
    assert got == [None, ["a", "b"]]
