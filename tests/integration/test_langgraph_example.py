"""examples/langgraph_conflict.py runs offline and shows both conflicts caught and resolved."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "langgraph_conflict.py"


def load_example():
    spec = importlib.util.spec_from_file_location("langgraph_conflict", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # LangGraph resolves the state's annotations through it
    spec.loader.exec_module(module)
    return module


async def test_the_example_catches_and_resolves_both_conflicts(data_dir):
    result = await load_example().main(str(data_dir))
    events = result["events"]
    assert any(e.startswith("store: ") and "refused" in e for e in events), events
    assert any(e.startswith("thread: ") and "refused" in e for e in events), events
    # the refused branch was retried: both notes are in the plan
    assert sorted(n.split(":")[0] for n in result["notes"]) == ["critic", "researcher"]
    # the refused run ran again: both runs are on the thread, once each
    replies = [line for line in result["log"] if "->" in line]
    assert sorted(replies) == ["add a cost -> noted", "add a risk -> noted"]


def test_the_example_runs_as_a_script(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused" in done.stdout and "keeps both notes" in done.stdout
