"""The simulated loop's livelock guard (``oribus.sim.loop``): a task that never waits for time
keeps the virtual clock still; the run fails with ``SimulationLivelock`` naming that task,
instead of hanging. Much work at one instant, with time moving between, is no livelock."""

from __future__ import annotations

import asyncio

import pytest

from oribus.sim.loop import SimulationLivelock, run

TURNS = 5_000


async def _spin_on_a_done_future() -> None:
    # the shape of the livelock the guard was made for (a shard's read waiting, again and
    # again, on a waiter future its close had already woken); any loop that never waits for
    # time would do
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    while True:
        await asyncio.wait([done], timeout=5.0)


async def _main_with_a_spinner() -> None:
    spinner = asyncio.get_running_loop().create_task(_spin_on_a_done_future(), name="spinner")
    await asyncio.sleep(1.0)  # never reached: the spinner keeps the clock at 0
    spinner.cancel()


def test_a_task_that_never_waits_for_time_fails_the_run_and_is_named():
    with pytest.raises(SimulationLivelock) as caught:
        run(_main_with_a_spinner(), livelock_turns=TURNS)
    message = str(caught.value)
    assert f"for {TURNS} loop turns" in message and "0.000000s" in message
    assert "task spinner in _spin_on_a_done_future" in message


async def _busy_instants() -> float:
    loop = asyncio.get_running_loop()
    for _ in range(20):  # 20 × 1000 turns, far more than TURNS in all, but time moves between
        for _ in range(1000):
            await asyncio.sleep(0)
        await asyncio.sleep(0.5)
    return loop.time()


def test_much_work_at_each_instant_with_time_moving_between_is_no_livelock():
    assert run(_busy_instants(), livelock_turns=TURNS) == pytest.approx(10.0)


def test_a_small_livelock_limit_still_names_the_task():
    with pytest.raises(SimulationLivelock, match="task spinner in _spin_on_a_done_future"):
        run(_main_with_a_spinner(), livelock_turns=10)
