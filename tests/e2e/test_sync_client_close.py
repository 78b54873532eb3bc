"""Closing the synchronous client prints nothing and ends its watches.

grpc delivers the last completions of a closed channel's cancelled calls to their event
loop some time after the close; a client that closed its loop by then got a "RuntimeError:
Event loop is closed" traceback on stderr, from the next client's loop or at exit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from processes import REPO, Cluster, ServerProcess, up

# Many clients in a row, in a few processes, because a late completion lands on a closed
# loop only now and then. Each leaves a live watch open (a streaming call in flight) when
# it closes; with "reader", another thread is blocked in that watch.
CHILD = textwrap.dedent("""
    import os, sys, threading
    import oribus

    address, clients, reader = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "reader"
    for i in range(clients):
        bus = oribus.Client(address, agent="closer")
        key = f"close/{os.getpid()}/{i}"
        bus.put(key, {"i": i})
        changes = bus.watch(key)
        if reader:
            seen = []
            thread = threading.Thread(target=lambda: seen.extend(changes))
            thread.start()
        assert bus.get(key).version == 1
        bus.close()
        if reader:
            thread.join(10)
            assert not thread.is_alive(), "closing the client left a watch blocked in another thread"
            assert seen == []
    print("ok", flush=True)
""")
CLIENTS_PER_PROCESS = 100
PROCESSES = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("sync-close")
    cluster = Cluster()
    s = cluster.add(up(root, root / "data", processes=False, shards=1))
    try:
        yield s.start().wait_serving()
    finally:
        cluster.stop()


def run_clients(server: ServerProcess, clients: int, mode: str) -> None:
    r = subprocess.run([sys.executable, "-c", CHILD, server.address, str(clients), mode],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr[-3000:]
    assert r.stderr == "", f"closing sync clients printed:\n{r.stderr[-3000:]}"


def test_closing_sync_clients_prints_nothing(server):
    for _ in range(PROCESSES):
        run_clients(server, CLIENTS_PER_PROCESS, "alone")


def test_closing_a_sync_client_ends_a_watch_blocked_in_another_thread(server):
    run_clients(server, 5, "reader")


def test_closing_another_session_leaves_the_connection_s_watches_open(server):
    import oribus

    bus = oribus.Client(server.address, agent="closer")
    try:
        bus.put("sessions/plan", 1)
        reviewer = bus.session(agent="reviewer")
        mine, theirs = bus.watch("sessions/", from_version=0), reviewer.watch("sessions/", from_version=0)
        reviewer.close()
        assert theirs.closed and not mine.closed
        assert next(mine).key == "sessions/plan"  # still delivers
    finally:
        bus.close()
    assert mine.closed
