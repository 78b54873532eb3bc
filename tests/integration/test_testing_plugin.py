"""oribus.testing: the pytest plugin's fixtures, the recorded history, the interleavings.

The plugin's fixtures are tried as a user's suite uses them: a test file run by pytest in
a subprocess (the plugin comes from the installed entry point). A deliberately broken
engine (ORI validation off, ``unsafe_disable_validation``) must fail the test through
``oribus_history``, with the anomaly's class and an example; a healthy one must pass.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis.stateful import run_state_machine_as_test

import oribus
from oribus.testing.interleave import Interleaving
from oribus.testing.machine import AgentMachine
from oribus.testing.strategies import Start, interleavings, replay

AGENTS_FILE = '''
import pytest

import oribus

pytestmark = pytest.mark.asyncio


async def two_agents_update_one_key(bus):
    alice, bob = bus.session(agent="alice"), bus.session(agent="bob")
    seen_by_alice = await alice.get("plan")
    seen_by_bob = await bob.get("plan")
    await alice.put("plan", {"steps": (seen_by_alice.value or {}).get("steps", 0) + 1})
    try:   # ORI refuses bob's commit: he read a version that has changed since
        await bob.put("plan", {"steps": (seen_by_bob.value or {}).get("steps", 0) + 10})
    except oribus.Conflict:
        pass


async def test_healthy(oribus_bus, oribus_history):
    await two_agents_update_one_key(oribus_bus)


@pytest.mark.oribus_bus(unsafe_disable_validation=True)
async def test_validation_off(oribus_history, oribus_bus):
    await two_agents_update_one_key(oribus_bus)
'''


def run_pytest(tmp_path: Path, source: str, *args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_agents.py").write_text(textwrap.dedent(source))
    code = f"{prelude}\nimport sys, pytest\nsys.exit(pytest.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "-q", "-rA", "-p", "no:cacheprovider",
                           "-o", "asyncio_mode=strict", *args, "test_agents.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a pytest of its own, with Hypothesis and pytest-asyncio to import: seconds
def test_oribus_history_fails_a_test_whose_engine_broke_its_promise(tmp_path: Path) -> None:
    r = run_pytest(tmp_path, AGENTS_FILE)
    out = r.stdout
    assert "PASSED test_agents.py::test_healthy" in out, out
    assert "ERROR test_agents.py::test_validation_off" in out, out
    assert "1 error" in out and "failed" not in out, out
    # the anomaly's class, and an example naming both agents' transactions
    assert "G-single [ori]" in out, out
    assert "alice, ok" in out and "bob, ok" in out, out


def test_the_plugin_loads_without_the_testing_extra(tmp_path: Path) -> None:
    """No pytest-asyncio, no Hypothesis: pytest still runs, oribus_history still records
    (here a sync client's calls), and oribus_bus says what it needs."""
    source = '''
    import oribus


    def test_sync_agents(oribus_history, tmp_path):
        with oribus.open_local_sync(tmp_path / "d", agent="alice", unsafe_disable_validation=True) as alice:
            bob = alice.session(agent="bob")
            a, b = alice.get("k"), bob.get("k")
            alice.put("k", (a.value or 0) + 1)
            bob.put("k", (b.value or 0) + 1)


    def test_async_fixture(oribus_bus):
        pass
    '''
    prelude = textwrap.dedent("""
        import sys

        class WithoutTheExtra:   # as if pytest-asyncio and Hypothesis were not installed
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in ("pytest_asyncio", "hypothesis"):
                    raise ImportError(f"No module named {name!r}")

        sys.meta_path.insert(0, WithoutTheExtra())
    """)
    r = run_pytest(tmp_path, source, "-p", "no:asyncio", "-p", "no:hypothesispytest", "--assert=plain",
                   prelude=prelude)  # (assertion rewriting would import them ahead of the blocker)
    out = r.stdout
    assert "ERROR test_agents.py::test_sync_agents" in out and "G-single" in out, out + r.stderr
    assert "ERROR test_agents.py::test_async_fixture" in out, out
    assert "needs pytest-asyncio: pip install 'oribus[testing]'" in out, out


# ---- interleavings in this process ------------------------------------------------------------


async def session_scope_increment(bus: oribus.AsyncSession) -> None:
    count = (await bus.get("counter")).value or 0
    try:
        await bus.put("counter", count + 1)
    except (oribus.Conflict, oribus.SessionExpired):
        await bus.reset_session()   # refused: this agent gives up its increment


async def retried_increment(bus: oribus.AsyncSession) -> None:
    async def add_one(tx: oribus.Transaction) -> None:
        tx.put("counter", ((await tx.get("counter")).value or 0) + 1)

    await bus.run(add_one)


AGENTS = {"alice": session_scope_increment, "bob": session_scope_increment}


def test_an_interleaving_is_checked_and_replays_the_same_way() -> None:
    steps = [Start("alice"), Start("bob")]
    healthy = asyncio.run(replay(AGENTS, steps))
    assert healthy.ok, healthy.message
    broken = asyncio.run(replay(AGENTS, steps, unsafe_disable_validation=True))
    assert not broken.ok
    assert "G-single [ori]" in broken.message
    assert broken.calls == asyncio.run(replay(AGENTS, steps, unsafe_disable_validation=True)).calls
    assert broken.calls[:4] == ["alice: run 1 starts", "bob: run 1 starts", "alice: read counter",
                                "bob: read counter"]


def test_a_crash_between_calls_fails_the_sessions_closed() -> None:
    async def scenario() -> tuple[list[str], str]:
        async with Interleaving(AGENTS) as run:
            await run.start("alice")
            await run.advance("alice")       # alice read the counter
            await run.restart(clean=False)   # the engine crashed: her delivery is gone
            verdict = await run.finish()
            expired = [t for t in run.recording.recorder.events if t.get("error") == "SessionExpired"]
            return verdict.calls, verdict.message if not verdict.ok else str(len(expired))
    calls, expired = asyncio.run(scenario())
    assert "restart (crash)" in calls
    assert expired == "1", expired   # her commit was refused, not let through unchecked


@settings(max_examples=15, deadline=None, database=None, derandomize=True)
@given(interleavings(["alice", "bob"], max_steps=6, max_faults=2))
def test_retried_increments_survive_any_interleaving_with_crashes(steps: list) -> None:
    async def counted(bus: oribus.AsyncSession, finished: int) -> None:
        assert ((await bus.get("counter")).value or 0) == finished

    verdict = asyncio.run(replay({"alice": retried_increment, "bob": retried_increment}, steps, check=counted))
    assert verdict.ok, verdict.message


class BrokenEngine(AgentMachine):
    """No invariant of its own: only the history check can fail it."""

    agents = {"alice": retried_increment, "bob": retried_increment}
    engine_options = {"unsafe_disable_validation": True}


def test_the_machine_checks_the_history_after_every_run() -> None:
    try:
        run_state_machine_as_test(BrokenEngine, settings=settings(
            max_examples=30, stateful_step_count=6, deadline=None, database=None, derandomize=True))
    except AssertionError as failure:
        message = str(failure)
    else:
        raise AssertionError("the machine passed over an engine without validation")
    assert "G-single [ori]" in message, message
    assert len(BrokenEngine.last_steps) == 2, BrokenEngine.last_steps


def test_pip_install_is_enough_for_pytest_to_find_the_plugin() -> None:
    from importlib.metadata import entry_points

    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("oribus") == "oribus.testing.plugin", plugins
