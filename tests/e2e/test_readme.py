"""Every ```python and ```sh block of README.md runs as written.

The blocks are grouped into sessions, in README order: a block starts a new session in a
fresh directory, unless its fence says ``continues`` (it runs where the block before it
ran, with that block's servers still up, as a reader runs it next). Each session runs in
readme_session.py (see there what "runs" means for each kind of block) inside a network
namespace of its own, so the README's addresses are used as written. A fence that says
``no-run`` gives its reason and is left out; NOT_RUN lists those, and it stays short.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
README = HERE.parents[1] / "README.md"
SESSION = HERE / "readme_session.py"

# The blocks the test leaves out, by their first line, and why.
NOT_RUN = {
    "make demo": "make targets: `make test` runs this very suite",
    "oribus cluster init --etcd http://10.0.0.5:2379 --shards 3          # once per cluster (idempotent)":
        "a layout across machines (node-a, /var/lib/oribus); cluster mode runs in tests/e2e/test_etcd_cluster.py",
    "oribus cluster init --etcd http://10.0.0.5:2379 --shards 3 --replicas 3   # once per cluster":
        "a layout across machines (node-a, node-b, node-c); replica groups run in tests/e2e/test_replica_*.py",
    "kubectl -n oribus apply -f deploy/k8s/examples/verify/verify-job.yaml":
        "needs a Kubernetes cluster; the Job's manifest is checked in tests/deploy/test_k8s_manifests.py",
    "kubectl -n oribus-repl apply -f deploy/k8s/examples/verify/verify-job.yaml":
        "needs a Kubernetes cluster; the replicated overlay runs as local processes in "
        "tests/deploy/test_manifest_launch.py",
}

FENCE = re.compile(r"^```(\w+)\s*(.*)$")


@dataclass
class Block:
    lang: str
    info: str
    code: str
    line: int  # of the opening fence, 1-based


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        blocks.append(Block(m.group(1), m.group(2).strip(), "\n".join(body) + "\n", start + 1))
        i += 1
    return blocks


def sessions(blocks: list[Block]) -> list[list[Block]]:
    out: list[list[Block]] = []
    previous_ran = False
    for b in blocks:
        if b.lang not in ("python", "sh"):
            previous_ran = False
            continue
        if b.info.startswith("no-run"):
            previous_ran = False
            continue
        if b.info == "continues":
            assert previous_ran, f"README.md:{b.line}: `continues` after a block that does not run"
            out[-1].append(b)
        else:
            assert b.info == "", f"README.md:{b.line}: unknown fence info {b.info!r}"
            out.append([b])
        previous_ran = True
    return out


BLOCKS = readme_blocks(README.read_text())
SESSIONS = sessions(BLOCKS)


def test_only_the_listed_blocks_are_left_out():
    left_out = {b.code.splitlines()[0]: b.info for b in BLOCKS if b.info.startswith("no-run")}
    assert set(left_out) == set(NOT_RUN), left_out
    assert len(SESSIONS) >= 5


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="needs unshare and ip (util-linux, iproute2)")
@pytest.mark.parametrize("session", SESSIONS, ids=[f"line-{s[0].line}" for s in SESSIONS])
def test_readme_session_runs_as_written(session: list[Block], tmp_path: Path):
    spec = tmp_path / "session.json"
    spec.write_text(json.dumps({"dir": str(tmp_path / "work"), "blocks": [asdict(b) for b in session]}))
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no network namespace here: {probe.stderr.strip()}")
    proc = subprocess.Popen(["unshare", "--net", sys.executable, str(SESSION), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
        out, err = proc.communicate()
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((tmp_path / "work").glob("background-*.log")))
        pytest.fail(f"the session did not end within 240 s; its progress:\n{err[-3000:]}\n{logs}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    failures = json.loads(out.strip().splitlines()[-1])["failures"]
    assert not failures, "\n\n".join(failures)
