"""The CLI against a running ``oribus up``: put/get/history/rollback/stats print the expected JSON."""

from __future__ import annotations

import json
import time

from processes import run_cli

import oribus


def cli_json(server, *args: str):
    r = run_cli(*args, "--addr", server.address)
    assert r.returncode == 0, f"oribus {' '.join(args)} failed ({r.returncode}):\n{r.stderr}"
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    return json.loads(lines[0])


def cli_error(server, *args: str) -> tuple[int, dict]:
    r = run_cli(*args, "--addr", server.address)
    assert r.returncode != 0 and r.stdout == ""
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stderr.strip().splitlines()[-1])


def test_put_get_history_rollback_stats(up_embedded):
    key = "cli/plan"
    first = {
        "steps": ["design", "build"],
        "owner": "planner",
        "ratio": 0.5,
        "done": False,
        "note": "héllo",
    }
    started = time.time()

    assert cli_json(up_embedded, "put", key, json.dumps(first)) == {"key": key, "version": 1}
    assert cli_json(up_embedded, "put", key, '{"steps": []}', "--expect", "1") == {
        "key": key,
        "version": 2,
    }
    assert cli_json(up_embedded, "get", key) == {"key": key, "value": {"steps": []}, "version": 2}
    assert cli_json(up_embedded, "get", "cli/absent") == {
        "key": "cli/absent",
        "value": None,
        "version": 0,
    }

    history = cli_json(up_embedded, "history", key)
    assert [h["version"] for h in history] == [2, 1]  # newest first
    assert history[1]["value"] == first and history[0]["value"] == {"steps": []}
    for h in history:
        assert set(h) == {
            "version",
            "value",
            "agent",
            "session",
            "commit_id",
            "committed_at",
            "deleted",
        }
        assert h["agent"] == "cli" and h["deleted"] is False
        assert started - 5 <= h["committed_at"] <= time.time() + 5
    assert history[0]["commit_id"] != history[1]["commit_id"]
    assert cli_json(up_embedded, "history", key, "--limit", "1") == history[:1]

    # rollback is an ordinary commit: a new version carrying version 1's value
    assert cli_json(up_embedded, "rollback", key, "1") == {"key": key, "version": 3}
    assert cli_json(up_embedded, "get", key) == {"key": key, "value": first, "version": 3}
    assert [h["version"] for h in cli_json(up_embedded, "history", key)] == [3, 2, 1]

    stats = cli_json(up_embedded, "stats")
    assert [s["shard"] for s in stats["shards"]] == [0, 1]
    assert sum(s["keys"] for s in stats["shards"]) >= 1
    assert stats["coordinator"]["commits_1pc"] + stats["coordinator"]["commits_2pc"] >= 3
    assert isinstance(stats["sessions"], int)

    # what the CLI wrote is what the SDK reads
    with oribus.Client(up_embedded.address, agent="sdk") as c:
        assert c.get(key) == oribus.Item(key, first, 3)


def test_cli_errors_are_json_with_a_nonzero_exit(up_embedded):
    key = "cli/guarded"
    assert cli_json(up_embedded, "put", key, "1") == {"key": key, "version": 1}

    code, err = cli_error(up_embedded, "put", key, "2", "--expect", "7")
    assert code == 1 and err["error"] == "Conflict" and key in err["message"]
    code, err = cli_error(up_embedded, "rollback", key, "5")
    assert code == 1 and err["error"] == "InvalidRequest" and "version 5" in err["message"]
    code, err = cli_error(up_embedded, "put", key, "[1, 2")
    assert code == 2 and err["error"] == "InvalidRequest"

    assert cli_json(up_embedded, "get", key) == {"key": key, "value": 1, "version": 1}
