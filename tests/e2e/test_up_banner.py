"""The line ``oribus up`` prints once it serves names its shards in good English."""

from __future__ import annotations

import pytest
from processes import Cluster, up


@pytest.mark.parametrize(("processes", "shards", "said"), [
    (False, 1, ", 1 in-process shard, "),
    (False, 2, ", 2 in-process shards, "),
    (True, 1, ", 1 shard process, "),
    (True, 2, ", 2 shard processes, "),
])
def test_up_says_how_many_shards_it_runs(tmp_path, processes, shards, said):
    cluster = Cluster()
    server = cluster.add(up(tmp_path, tmp_path / "data", processes=processes, shards=shards))
    try:
        server.start().wait_serving()
        banner = next(line for line in server.log_path.read_text().splitlines() if line.startswith("oribus up:"))
        assert said in banner, banner
    finally:
        cluster.stop()
