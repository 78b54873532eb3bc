"""Two agents increment a shared counter: a naive read-modify-write loses updates; ORI's
retry loop (``bus.run``) does not. Hypothesis finds the lost update and shrinks it to two
steps, with ``oribus.testing.machine.AgentMachine``.

Only the public API: each agent is an async function given an ``oribus.AsyncSession``.

Run it: ``python examples/lost_update.py`` (or ``pytest examples/lost_update.py``, whose
``TestWithRetryLoop`` passes). Needs ``pip install 'oribus[testing]'``.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

import oribus
from oribus.testing.machine import AgentMachine

COUNTER = "team/counter"


async def naive_increment(bus: oribus.AsyncSession) -> None:
    """Reads the counter, then writes it plus one in a transaction that did not read it:
    the commit is a blind write, which ORI has no read to check."""
    count = (await bus.get(COUNTER)).value or 0
    async with bus.transaction() as tx:
        tx.put(COUNTER, count + 1)


async def increment(bus: oribus.AsyncSession) -> None:
    """The same work inside ``bus.run``: the read is the transaction's, so a commit after
    someone else's is refused (Conflict), and ``run`` reads again and retries."""

    async def add_one(tx: oribus.Transaction) -> None:
        count = (await tx.get(COUNTER)).value or 0
        tx.put(COUNTER, count + 1)

    await bus.run(add_one)


class NaiveCounter(AgentMachine):
    """Two agents, each running ``naive_increment`` any number of times, interleaved call by
    call with crashes of the engine; afterwards every finished run must have counted."""

    agents = {"alice": naive_increment, "bob": naive_increment}

    async def check(self, bus: oribus.AsyncSession) -> None:
        count = (await bus.get(COUNTER)).value or 0
        assert count == self.finished_runs(), f"counter is {count} after {self.finished_runs()} increments"


class CounterWithRetryLoop(NaiveCounter):
    agents = {"alice": increment, "bob": increment}


# Few steps per run: a lost update needs two, and a short run shrinks fast.
SETTINGS = settings(max_examples=40, stateful_step_count=5, deadline=None)
CounterWithRetryLoop.TestCase.settings = SETTINGS
TestWithRetryLoop = CounterWithRetryLoop.TestCase


def find_lost_update(run_settings: settings = SETTINGS) -> list[str]:
    """Run the naive machine until Hypothesis finds a failing interleaving; returns its
    shrunk steps, e.g. ``["start('alice')", "start('bob')"]``."""
    try:
        run_state_machine_as_test(NaiveCounter, settings=run_settings)
    except AssertionError as failure:
        print(failure)
        return NaiveCounter.last_steps
    raise AssertionError("no lost update found")


if __name__ == "__main__":
    steps = find_lost_update()
    print(f"shrunk to {len(steps)} steps: {', '.join(steps)}")
    run_state_machine_as_test(CounterWithRetryLoop, settings=SETTINGS)
    print("with bus.run: no lost update")
