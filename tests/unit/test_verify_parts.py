"""``oribus verify``'s parts without a deployment: the seeded mix, the plans, the key ring, the
rate limit, the reports, the local nemesis, what the group nemesis reads of member processes
and when it finds a group healthy, and the command line's refusals."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from oribus.checker import Recorder, check
from oribus.cli import main
from oribus.verify.nemesis import LocalNemesis, Target
from oribus.verify.plan import APPEND, READ, draw_mix, list_append_ops, step_keys
from oribus.verify.report import series, summary, svg_chart, to_html, to_json
from oribus.verify.workloads import KeyRing, Limiter, plan_agent_step, plan_list_append


def test_the_same_seed_draws_the_same_mix_and_another_seed_another():
    a, b, c = draw_mix(7), draw_mix(7), draw_mix(8)
    assert a == b and a != c
    ops = [op for shape in a.shapes for op in shape]
    assert {k for k, _ in ops} == {READ, APPEND}  # not Hypothesis's simplest example (all reads of key 0)
    assert len({i for _, i in ops}) > 10 and max(len(s) for s in a.shapes) > 1


def test_a_client_replays_its_operations_from_the_seed():
    def run(seed: int) -> list[list]:
        mix = draw_mix(seed)
        rng = mix.client_rng("c3")
        counter = iter(range(1, 10_000))
        keys = [f"p/k{i}" for i in range(6)]
        return [plan_list_append(rng.choice(mix.shapes), keys, lambda: next(counter)).invoke for _ in range(50)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_list_append_ops_read_each_key_once_before_appending():
    shape = ((APPEND, 1), (READ, 1), (READ, 2), (APPEND, 2), (APPEND, 1))
    ops = list_append_ops(shape, ["a", "b", "c"], iter([10, 11, 12]).__next__)
    assert ops == [[READ, "b", None], [APPEND, "b", 10], [READ, "c", None], [APPEND, "c", 11], [APPEND, "b", 12]]
    planned = plan_list_append(shape, ["a", "b", "c"], iter([10, 11, 12]).__next__)
    assert [op[0] for op in planned.invoke] == [READ, READ, APPEND, APPEND, APPEND]  # reads first
    assert planned.writes({"b": ([1], 3), "c": (None, 0)}) == {"b": [1, 10, 12], "c": [11]}


def test_an_agent_step_reads_three_distinct_keys_and_writes_two():
    keys = ["k0", "k1", "k2", "k3"]
    assert step_keys((1, 5, 9), keys) == ["k1", "k2", "k3"]  # 5 and 9 collide with 1 modulo 4
    planned = plan_agent_step((0, 1, 2), keys, "c1-4")
    assert planned.reads == ["k0", "k1", "k2"]
    assert planned.invoke[3:] == [["w", "k0", {"step": "c1-4"}], ["w", "k1", {"step": "c1-4"}]]


def test_a_list_key_moves_to_its_next_generation_after_enough_appends():
    ring = KeyRing("p/la/", 2, writes_per_key=3)
    k0, k1 = ring.current()
    assert k0.startswith("p/la/k0.0-") and k1.startswith("p/la/k1.0-")
    for _ in range(3):
        ring.written(k1)
    k1_next = ring.current()[1]
    assert ring.current()[0] == k0 and k1_next.startswith("p/la/k1.1-")
    assert ring.used == [k0, k1, k1_next]


def test_the_keys_spread_over_the_shards():
    """Names differing only in a counter share most CRC-32C bits, so most fall on one shard;
    the hash in each name spreads them (else few transactions would span shards)."""
    from oribus.meta.slots import StaticSlotMap

    for shards in (2, 4):
        owners = [StaticSlotMap(shards).shard_for(k) for k in KeyRing("verify/x/la/", 12).current()]
        assert set(owners) == set(range(shards)), owners


async def test_the_rate_limit_spaces_transaction_starts():
    limiter = Limiter(50)
    t0 = time.monotonic()
    for _ in range(11):
        await limiter.wait()
    assert time.monotonic() - t0 >= 0.19
    unlimited = Limiter(0)
    t0 = time.monotonic()
    for _ in range(1000):
        await unlimited.wait()
    assert time.monotonic() - t0 < 0.1


def _lost_update_history() -> Recorder:
    """Two transactions read the same empty list and both append: a lost update."""
    rec = Recorder()
    a = rec.invoke("c1", None, [["r", "x", None], ["append", "x", 1]])
    b = rec.invoke("c2", None, [["r", "x", None], ["append", "x", 2]])
    rec.ok(a, [["r", "x", None, 0], ["append", "x", 1, 1]], "a")
    rec.ok(b, [["r", "x", None, 0], ["append", "x", 2, 2]], "b")
    rec.final({"x": [[2], 2]}, {"x": [[1, "a", [1]], [2, "b", [2]]]})
    return rec


INFO = {"run_id": "r1", "target": "127.0.0.1:7700", "workload": "list-append", "clients": 2, "keys": 1,
        "seed": 5, "elapsed": 1.5, "nemesis": None, "nemesis_events": []}


def test_the_summary_and_the_reports_name_each_anomaly_with_an_example():
    rec = _lost_update_history()
    report = check(rec.events)
    assert not report.ok
    text = summary(report, INFO)
    assert "transactions: 2   committed: 2   refused: 0" in text
    for kind in report.by_kind():
        assert f"  {kind} [" in text
    assert "txn 1 (c1, ok, commit a): r x null @v0; append x 1 @v1" in text
    data = to_json(report, INFO, series(rec.events))
    assert json.loads(json.dumps(data))["by_kind"] == report.by_kind()
    page = to_html(data)
    assert page.count("<svg") == 2 and "lost-write" in page and "<script" not in page


def test_series_buckets_outcomes_and_latency_per_second():
    events = [
        {"type": "invoke", "id": 1, "time": 100.0, "ops": []}, {"type": "ok", "id": 1, "time": 100.010},
        {"type": "invoke", "id": 2, "time": 100.5, "ops": []},
        {"type": "fail", "id": 2, "time": 101.2, "error": "Conflict"},
        {"type": "invoke", "id": 3, "time": 101.3, "ops": []},
        {"type": "info", "id": 3, "time": 102.5, "error": "Unavailable"},
    ]
    points = series(events)
    assert [(p["ok"], p["conflict"], p["unknown"]) for p in points] == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    assert points[0]["p50_ms"] == pytest.approx(10, abs=0.01) and points[1]["p50_ms"] is None
    assert "<polyline" in svg_chart("t", [0, 1], {"a": [1, 2]}, "ms")


async def test_the_local_nemesis_pauses_resumes_and_kills_a_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        nemesis = LocalNemesis([Target("sleeper", proc.pid)], seed=1)
        pausing = asyncio.create_task(nemesis.pause(nemesis.targets[0], 0.5))
        await asyncio.sleep(0.2)
        with open(f"/proc/{proc.pid}/stat") as f:
            assert f.read().split(")")[1].split()[0] == "T"  # stopped
        await pausing
        with open(f"/proc/{proc.pid}/stat") as f:
            assert f.read().split(")")[1].split()[0] != "T"
        await nemesis.kill(nemesis.targets[0], 0.1)
        assert proc.wait(5) == -signal.SIGKILL
        await nemesis.kill(nemesis.targets[0], 0.1)  # gone: logged, not raised
        assert [e["fault"] for e in nemesis.events] == ["pause", "resume", "kill", "gone"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_nemesis_schedule_follows_the_seed():
    async def schedule(seed: int) -> list[tuple[str, str]]:
        a, b = Target("a", 1), Target("b", 2)
        n = LocalNemesis([a, b], seed=seed, interval=0.31)
        done: list[tuple[str, str]] = []

        async def record_kill(t: Target, down: float) -> None:
            done.append(("kill", t.name))

        async def record_pause(t: Target, down: float) -> None:
            done.append(("pause", t.name))

        n.kill, n.pause = record_kill, record_pause  # type: ignore[method-assign]
        a.alive = b.alive = lambda: True  # type: ignore[method-assign]
        await n.run(1.5)
        return done

    first = await schedule(4)
    assert first and first == await schedule(4)


@pytest.mark.parametrize("argv, message", [
    (["verify"], "needs --addr HOST:PORT"),
    (["verify", "--addr", "127.0.0.1:1", "--nemesis", "local"], "--nemesis local needs --pids"),
    (["verify", "--addr", "127.0.0.1:1", "--pids", "123"], "--pids is for --nemesis local"),
    (["verify", "--addr", "127.0.0.1:1", "--keys", "2"], "needs --keys 3 or more"),
    (["verify", "--addr", "127.0.0.1:1", "--prefix", ".sbus/x"], "is empty or reserved"),
    (["verify", "--addr", "127.0.0.1:1", "--replicas", "3"], "--replicas is for --start-local"),
])
def test_the_command_line_refuses_bad_options_before_touching_anything(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--duration", "soon"], ["--duration", "0s"], ["--pids", "a,b"]])
def test_bad_values_are_refused_by_the_parser(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", "--addr", "127.0.0.1:1", *bad])
    assert e.value.code == 2


# ---- the replica groups of --start-local --replicas (oribus.verify.groups) ----------------------


def test_a_member_is_read_from_the_command_line_oribus_up_gives_it(tmp_path):
    """The nemesis parses what `oribus up --replicas` actually runs (UpHost.member_command)."""
    from oribus.hosts.up import UpHost
    from oribus.verify.groups import parse_member

    up = UpHost(tmp_path / "data", processes=True, shards=2, replicas=3)
    argv = up.member_command(1, 2, tmp_path / "m", "http://127.0.0.1:2379", parent_fd=5)
    member = parse_member(4242, argv)
    assert member is not None
    assert (member.shard, member.member, member.pid, member.data_dir) == (1, 2, 4242, tmp_path / "m")
    assert member.stream.startswith("unix:") and member.stream.endswith("shard-1-member-2.sock")
    assert (member.etcd, member.cluster, member.name) == ("http://127.0.0.1:2379", "oribus", "shard 1 member 2")
    # a shard process of an unreplicated `up`, or anything else, is not a member
    assert parse_member(1, [sys.executable, "-m", "oribus.cli", "shard", "--id", "0", "--data-dir", "d"]) is None
    assert parse_member(1, ["etcd", "--data-dir", "d"]) is None


def _view(statuses, primary=(0, 2), members=(0, 1, 2)):
    from pathlib import Path

    from oribus.meta.groups import PrimaryRecord
    from oribus.rpc.replica_codec import MemberStatus
    from oribus.verify.groups import GroupView, MemberProcess

    procs = {m: MemberProcess(0, m, 100 + m, Path(f"m{m}"), f"unix:m{m}", "http://e", "oribus") for m in members}
    return GroupView(0, procs, {m: MemberStatus(m, role, 2, voter, (2, last), commit_lsn=commit)
                                for m, (role, voter, last, commit) in statuses.items()},
                     PrimaryRecord(*primary) if primary else None)


def test_a_group_is_healthy_only_complete_with_its_primary_serving():
    ok = {0: ("primary", True, 10, 10), 1: ("follower", True, 10, 9), 2: ("follower", True, 11, 9)}
    assert _view(ok).healthy(3)
    view = _view(ok)
    assert view.primary_process().pid == 100 and [p.member for p in view.followers()] == [1, 2]
    assert not _view({**ok, 2: ("follower", False, 10, 9)}).healthy(3)  # a learner catching up
    assert not _view({**ok, 1: ("follower", True, 7, 7)}).healthy(3)  # a follower behind the commit index
    assert not _view({0: ok[0], 1: ok[1]}).healthy(3)  # a member that does not answer (paused)
    assert not _view(ok, members=(0, 1)).healthy(3)  # a member process that is gone
    assert not _view(ok, primary=None).healthy(3)  # an election under way
    assert not _view(ok, primary=(0, 3)).healthy(3)  # etcd's term is newer than the member's
    assert not _view({**ok, 0: ("follower", True, 10, 10)}).healthy(3)  # it stepped down
