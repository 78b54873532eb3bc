"""A session belongs to the identity that first used it, across a restart of the bus
(issue 16, specs/auth.md §5): ``oribus up --auth D`` in a temporary directory, stopped and
started again on the same data.

An orchestrator (a token allowed to act for any agent) opens a session in agent b1's name;
b1 opens one of its own. After the restart b1 still cannot commit in, reset or forget from
the orchestrator's session, nor the orchestrator in b1's: the owners are in the bus's
session journal (``OWNER`` records), not only in its memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from processes import Cluster, run_cli, up

import oribus
from oribus.errors import PermissionDenied

POLICY = """
roles:
  agent:
    read: ["team/*"]
    write: ["team/*"]
  orchestrator:
    read: ["*"]
    write: ["*"]
    act_for: ["*"]
"""


def token(auth: Path, agent: str, role: str) -> str:
    done = run_cli("auth", "token", "--dir", str(auth), "--agent", agent, "--role", role, "--ttl", "1h")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def refused_everything(address: str, agent: str, session_id: str, tok: str, owner: str) -> None:
    with oribus.Client(address, agent=agent, session_id=session_id, token=tok) as c:
        for attempt in (lambda: c.put("team/x", "taken over"), c.reset_session, lambda: c.forget(["team/x"]),
                        lambda: c.get("team/x")):
            with pytest.raises(PermissionDenied, match=f"belongs to {owner}"):
                attempt()


def test_session_owners_survive_a_restart_of_the_bus(tmp_path):
    auth = tmp_path / "auth"
    assert run_cli("auth", "init", "--dir", str(auth)).returncode == 0
    (auth / "policy.yaml").write_text(POLICY)
    boss, b1 = token(auth, "boss", "orchestrator"), token(auth, "b1", "agent")
    cluster = Cluster()
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=False, shards=1))
    server.args += ["--auth", str(auth)]
    try:
        server.start().wait_serving()
        with oribus.Client(server.address, agent="b1", session_id="bosses", token=boss) as c:
            c.put("team/x", "by boss")
        with oribus.Client(server.address, agent="b1", session_id="own", token=b1) as c:
            c.get("team/x")
        refused_everything(server.address, "b1", "bosses", b1, "boss")  # before the restart, as after

        server.stop()
        server.start().wait_serving()
        refused_everything(server.address, "b1", "bosses", b1, "boss")
        refused_everything(server.address, "b1", "own", boss, "b1")
        with oribus.Client(server.address, agent="b1", session_id="own", token=b1) as c:  # its owner may
            c.put("team/x", "by b1")
        with oribus.Client(server.address, agent="b1", session_id="bosses", token=boss) as c:
            assert c.get("team/x").value == "by b1"
    finally:
        cluster.stop()
