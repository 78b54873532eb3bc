"""The TypeScript SDK (clients/typescript): its own tests, a race with Python agents checked
by ``oribus check``, and the README's TypeScript quick start.

- ``npm test`` runs the package's tests (node's test runner) against real ``oribus up``
  servers they start themselves.
- Python agents (the SDK over gRPC) and TypeScript agents (over the HTTP gateway) run the
  list-append workload on the same keys of one bus at once; one recorder takes every event.
  A TypeScript transaction is recorded as invoked before it begins (the agent waits for its
  id) and as completed after it ended, so line order stays a real-time order.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from processes import ServerProcess, run_cli, up
from typescript import PACKAGE, REPO, node_env, package

import oribus
from oribus.checker import Recorder, check
from oribus.checker.listappend import ELEMENT_STRIDE, record_final, run_list_append

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path):
    s = up(tmp_path, tmp_path / "data", processes=False, shards=2).start().wait_serving()
    try:
        yield s
    finally:
        s.stop()


def test_npm_test_passes():
    pkg = package()
    done = subprocess.run(["npm", "test"], cwd=pkg, capture_output=True, text=True, timeout=900, env=node_env())
    summary = "\n".join(line for line in done.stdout.splitlines() if re.match(r"^(# (tests|pass|fail)|not ok)", line))
    assert done.returncode == 0, f"npm test failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert re.search(r"^# fail 0$", done.stdout, re.M), summary
    assert int(re.search(r"^# pass (\d+)$", done.stdout, re.M).group(1)) >= 13, summary


async def _typescript_agents(url: str, recorder: Recorder, clients: int, txns: int, seed: int) -> dict:
    """Run list_append_agent.mjs, recording its transactions as it reports them."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(PACKAGE / "tests" / "list_append_agent.mjs"), url, str(clients), str(txns), str(seed),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=node_env())
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    done: dict = {}
    try:
        async for raw in proc.stdout:
            event = json.loads(raw)
            kind = event["t"]
            if kind == "invoke":
                tid = recorder.invoke(f"ts{event['session'][0]}", event["session"], event["ops"])
                proc.stdin.write(f"{event['req']} {tid}\n".encode())
                await proc.stdin.drain()
            elif kind == "ok":
                recorder.ok(event["tid"], event["ops"], event["commit_id"])
            elif kind == "fail":
                recorder.fail(event["tid"], event["error"], event["commit_id"])
            elif kind == "info":
                recorder.info(event["tid"], event["error"], event["commit_id"])
            elif kind == "done":
                done = event["outcomes"]
        code = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = (await proc.stderr.read()).decode(errors="replace")
    assert code == 0, f"the TypeScript agents exited {code}:\n{err[-3000:]}"
    return done


def test_python_and_typescript_agents_race_on_the_same_keys(server: ServerProcess, tmp_path: Path):
    package()
    recorder = Recorder()
    url = f"http://{server.http_address}"

    async def main() -> tuple[dict, dict]:
        sessions = [oribus.connect(server.address, agent=f"py-{i}") for i in range(4)]
        try:
            py, ts = await asyncio.gather(
                run_list_append(sessions, recorder, txns=4 * 60, keys=8, seed=11),
                _typescript_agents(url, recorder, clients=4, txns=60, seed=12),
            )
            await record_final(sessions[0], recorder, keys=8)
        finally:
            for s in sessions:
                await s.close()
        return py, ts

    py, ts = asyncio.run(main())
    history = tmp_path / "history.jsonl"
    recorder.dump(history)
    print(f"python agents: {py}, TypeScript agents: {ts}")
    assert py["ok"] > 20 and ts["ok"] > 20, (py, ts)
    report = check(recorder.events)
    assert report.ok, f"{report.summary()}\nhistory in {history}"
    # the languages really raced: the final lists hold elements of both
    final = next(e for e in recorder.events if e["type"] == "final")
    elements = [x for value, _version in final["state"].values() for x in (value or [])]
    assert any(x < 100 * ELEMENT_STRIDE for x in elements) and any(x > 100 * ELEMENT_STRIDE for x in elements)
    cli = run_cli("check", str(history), timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr


def _readme_typescript_blocks() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("### From TypeScript", 1)[1].split("\n### ", 1)[0]
    shell = re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)
    program = re.findall(r"^```js\n(.*?)^```", section, re.M | re.S)
    assert len(shell) == 1 and len(program) == 1, "the quick start: one ```bash block, then one ```js block"
    return shell[0], program[0]


def test_readme_typescript_quick_start_runs_as_written(server: ServerProcess, tmp_path: Path):
    """From a copy of the package, in a fresh directory instead of /tmp/agents, against this
    test's server instead of 127.0.0.1:7780."""
    package()
    shell, program = _readme_typescript_blocks()
    root = tmp_path / "repo"
    shutil.copytree(PACKAGE, root / "clients" / "typescript",
                    ignore=shutil.ignore_patterns("node_modules", "dist", "*.tgz"))
    app = tmp_path / "agents"
    assert "/tmp/agents" in shell and "127.0.0.1:7780" in program
    done = subprocess.run(["bash", "-e", "-c", shell.replace("/tmp/agents", str(app))], cwd=root,
                          capture_output=True, text=True, timeout=600, env=node_env())
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (app / "node_modules" / "oribus" / "dist" / "index.d.ts").exists(), "npm pack's tarball has no types"
    name = re.search(r"`/tmp/agents/(\S+\.mjs)`", (REPO / "README.md").read_text()).group(1)
    (app / name).write_text(program.replace("127.0.0.1:7780", server.http_address))
    run = subprocess.run(["node", name], cwd=app, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and not run.stderr, run.stdout + run.stderr
    assert "refused: [" in run.stdout and "'publish'" in run.stdout, run.stdout


def test_example_agent_pair_shares_a_plan(server: ServerProcess):
    pkg = package()
    # the worker thinks 2 s per step (the example's default is 0.2 s) and the planner 1 s before
    # its revision, which reacts to the worker's first result through a watch: the revision lands
    # after the worker read the plan for its next step and before it claims it, even on a loaded
    # machine (it used to land at once, sometimes before that read: no conflict), so the worker's
    # stale claim is refused every time
    run = subprocess.run(["node", str(pkg / "examples" / "plan-agents.mjs"), f"http://{server.http_address}", "2000"],
                         capture_output=True, text=True, timeout=120, env=node_env())
    assert run.returncode == 0 and not run.stderr, run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["done"] == summary["steps"] and summary["steps"] > 3, summary
    assert summary["conflicts"] >= 1, summary  # the planner's revision refused a worker's stale commit


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
