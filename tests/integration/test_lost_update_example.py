"""examples/lost_update.py: Hypothesis finds the naive agents' lost update and shrinks it to
two steps (both agents start: both read, then both write); ``bus.run``'s retry loop passes."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lost_update.py"


def load_example():
    spec = importlib.util.spec_from_file_location("lost_update", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a Hypothesis search and its shrinking: seconds
def test_the_lost_update_is_found_and_shrunk_to_two_steps():
    example = load_example()
    # derandomized: the same search every time, so this test cannot flake
    deterministic = settings(example.SETTINGS, derandomize=True, database=None)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        steps = example.find_lost_update(deterministic)
    assert steps == ["start('alice')", "start('bob')"], steps
    assert "counter is 1 after 2 increments" in printed.getvalue()
    assert example.NaiveCounter.last_calls[:4] == [
        "alice: run 1 starts", "bob: run 1 starts", "alice: read team/counter", "bob: read team/counter"]
    run_state_machine_as_test(example.CounterWithRetryLoop, settings=deterministic)


def test_the_example_uses_only_the_public_api():
    imported = set()
    for node in ast.walk(ast.parse(EXAMPLE.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    ours = {m for m in imported if m.split(".")[0] == "oribus"}
    assert ours == {"oribus", "oribus.testing.machine"}, ours
