"""One verify run: reach the deployment, run the clients (and the nemesis), read the final
state, check the history, write the reports, remove the run's keys.

Exit codes: 0 no anomaly found; 1 anomalies found; 2 the deployment cannot be
reached (or a bad option); 3 inconclusive: nothing committed, or the final
state could not be read once the faults healed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import oribus
from oribus.checker import Recorder, check, record_final
from oribus.errors import OribusError, Unavailable
from oribus.verify import report as reports
from oribus.verify.groups import LocalGroups
from oribus.verify.local import LocalDeployment
from oribus.verify.nemesis import GroupNemesis, LocalNemesis, Target
from oribus.verify.plan import draw_mix
from oribus.verify.workloads import (
    AGENT_STEP,
    LIST_APPEND,
    Clients,
    Executor,
    HttpExecutor,
    KeyRing,
    Limiter,
    SdkExecutor,
)

OK, ANOMALIES, UNREACHABLE, INCONCLUSIVE = 0, 1, 2, 3
REACH_TIMEOUT = 10.0  # seconds to wait for the deployment's first answer
FINAL_TIMEOUT = 90.0  # seconds to keep trying the final read after the faults healed
DRAIN_TIMEOUT = 30.0  # seconds clients get to finish their last transaction after the deadline


@dataclass
class VerifyConfig:
    addr: str | None  # the bus's gRPC address (None with start_local)
    http: str | None = None  # the HTTP gateway's base URL: a quarter of the clients go over HTTP
    tls_dir: str | None = None  # mutual TLS for the SDK's connections
    # a bus run with --auth: the token every client presents (SDK and HTTP); its identity must
    # be allowed to act for the run's agents (``oribus auth token --act-for '*'``)
    token: str | None = None
    duration: float = 60.0  # seconds of workload
    clients: int = 16
    keys: int = 12  # keys per workload
    workload: str = "both"  # list-append, agent-step or both
    prefix: str | None = None  # every key of the run is under it (default verify/<run id>/)
    out: Path = Path("verify-out")
    seed: int | None = None  # the mix and every client's path (default: random, printed)
    rate: float = 0.0  # at most this many transactions per second in all (0: no limit)
    keep: bool = False  # keep the run's keys afterwards
    nemesis: str | None = None  # "local"
    pids: list[int] = field(default_factory=list)
    start_local: bool = False
    replicas: int = 1  # with start_local: > 1 runs every shard as a replica group of this many members
    run_id: str = field(default_factory=lambda: "r" + secrets.token_hex(4))


class Unreachable(Exception):
    """The deployment did not answer."""


def _line(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()


async def _reach(cfg: VerifyConfig, addr: str, http: Any) -> None:
    try:
        async with oribus.connect(addr, agent=f"verify-{cfg.run_id}", tls=cfg.tls_dir, token=cfg.token,
                                  timeout=REACH_TIMEOUT) as s:
            await asyncio.wait_for(s.get(f"{cfg.prefix}probe"), REACH_TIMEOUT)
    except (TimeoutError, OribusError, OSError) as e:
        raise Unreachable(f"cannot reach the bus at {addr}: {getattr(e, 'message', None) or e!r}") from e
    if http is not None and cfg.http:
        import aiohttp

        try:
            async with http.get(cfg.http.rstrip("/") + "/healthz",
                                timeout=aiohttp.ClientTimeout(total=REACH_TIMEOUT)) as r:
                if r.status != 200:
                    raise Unreachable(f"the HTTP gateway at {cfg.http} answered /healthz with {r.status}")
        except (TimeoutError, aiohttp.ClientError) as e:
            raise Unreachable(f"cannot reach the HTTP gateway at {cfg.http}: {e!r}") from e


async def _final(addr: str, cfg: VerifyConfig, recorder: Recorder, keys: list[str]) -> str | None:
    """Read the final state into the recorder; an error message if it cannot be read in time."""
    deadline = time.monotonic() + FINAL_TIMEOUT
    while True:
        try:
            async with oribus.connect(addr, agent=f"verify-{cfg.run_id}-final", tls=cfg.tls_dir, token=cfg.token) as s:
                await record_final(s, recorder, keys=keys)
            return None
        except OribusError as e:
            # a two-phase commit whose coordinator died keeps its keys locked until the
            # bus's sweep resolves it: Unavailable meanwhile
            if not isinstance(e, Unavailable) or time.monotonic() > deadline:
                return f"{e.code}: {e.message}"
            await asyncio.sleep(1)


async def _remove(addr: str, cfg: VerifyConfig, keys: list[str]) -> str:
    """Delete the run's keys (their history stays: a delete is one more version)."""
    try:
        async with oribus.connect(addr, agent=f"verify-{cfg.run_id}-cleanup", tls=cfg.tls_dir, token=cfg.token) as s:
            for i in range(0, len(keys), 64):
                await s.commit({k: oribus.DELETE for k in keys[i:i + 64]})
    except OribusError as e:
        return f"could not remove the run's keys ({e.code}: {e.message}); they are under {cfg.prefix}"
    return f"removed the run's {len(keys)} keys (their history stays, as for any delete); --keep keeps them"


def _nemesis_line(nemesis: LocalNemesis | GroupNemesis | None) -> str | None:
    if nemesis is None:
        return None
    if isinstance(nemesis, GroupNemesis):
        return nemesis.describe()
    return f"{nemesis.faults} faults on {', '.join(t.name for t in nemesis.targets)}"


async def _progress(clients: Clients, started: float, duration: float, stream: TextIO) -> None:
    tty = stream.isatty()
    while True:
        await asyncio.sleep(1 if tty else 5)
        elapsed = time.monotonic() - started
        text = f"[{min(elapsed, duration):5.0f}s/{duration:.0f}s] {clients.progress.line()}"
        stream.write(f"\r{text}" if tty else text + "\n")
        stream.flush()


async def verify(cfg: VerifyConfig, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run verify as configured; returns the exit code (see the module docstring)."""
    import aiohttp

    cfg.prefix = cfg.prefix or f"verify/{cfg.run_id}/"
    if cfg.seed is None:
        cfg.seed = secrets.randbelow(2**31)
    local: LocalDeployment | None = None
    result = UNREACHABLE
    try:
        if cfg.start_local:
            local = LocalDeployment(replicas=cfg.replicas)
            groups = (f" --replicas {cfg.replicas} --lease-ttl {local.lease_ttl}" if cfg.replicas > 1 else "")
            _line(err, f"starting oribus up --processes{groups} in {local.dir} ...")
            pid = await local.start()
            cfg.addr, cfg.http = local.address, cfg.http or local.http_url
            cfg.pids = [pid]
        assert cfg.addr is not None
        headers = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else None
        async with aiohttp.ClientSession(headers=headers) as http:
            try:
                await _reach(cfg, cfg.addr, http)
            except Unreachable as e:
                _line(err, f"oribus verify: {e}")
                return UNREACHABLE
            result = await _run(cfg, cfg.addr, http, local, out, err)
            return result
    finally:
        if local is not None:
            local.stop()
            if result == 0:
                local.remove()  # nothing to look into: its data and logs go
            else:
                _line(err, f"kept the deployment's directory for a look (up.log, the data): {local.dir}")


async def _run(cfg: VerifyConfig, addr: str, http: Any, local: LocalDeployment | None,
               out: TextIO, err: TextIO) -> int:
    assert cfg.prefix is not None and cfg.seed is not None
    mix = draw_mix(cfg.seed)
    workloads = [LIST_APPEND, AGENT_STEP] if cfg.workload == "both" else [cfg.workload]
    list_keys = KeyRing(f"{cfg.prefix}la/", cfg.keys if LIST_APPEND in workloads else 0)
    step_keys = KeyRing(f"{cfg.prefix}step/", cfg.keys if AGENT_STEP in workloads else 0)
    recorder = Recorder()
    started = time.monotonic()
    clients = Clients(mix, recorder, Limiter(cfg.rate), started + cfg.duration, list_keys, step_keys)
    sessions: list[Any] = []
    tasks = []
    n_http = max(1, cfg.clients // 4) if cfg.http else 0
    for i in range(cfg.clients):
        workload = workloads[i % len(workloads)]
        ex: Executor
        if i < n_http:
            assert cfg.http is not None
            ex = HttpExecutor(http, cfg.http, f"verify-{cfg.run_id}-h{i}", "verify", f"{cfg.run_id}-h{i}",
                              timeout=10.0)
            process = f"h{i}"
        else:
            session = oribus.connect(addr, agent=f"verify-{cfg.run_id}-c{i}", tls=cfg.tls_dir, token=cfg.token)
            sessions.append(session)
            ex = SdkExecutor(session)
            process = f"c{i}"
        tasks.append(asyncio.create_task(clients.run_client(ex, process, workload, i)))
    _line(err, f"oribus verify {cfg.run_id}: {len(tasks)} clients ({n_http} over HTTP) for {cfg.duration:.0f}s "
               f"under {cfg.prefix}, seed {cfg.seed} (--seed {cfg.seed} replays the same operations)")
    nemesis: LocalNemesis | GroupNemesis | None = None
    nemesis_task = None
    if cfg.nemesis == "local" and local is not None and local.replicas > 1:
        nemesis = GroupNemesis(LocalGroups(cfg.pids[0], local.shards, local.replicas), local.lease_ttl,
                               seed=cfg.seed)
        nemesis_task = asyncio.create_task(nemesis.run(cfg.duration))
    elif cfg.nemesis == "local":
        targets = [Target(f"pid {p}", p) for p in cfg.pids]
        if local is not None:
            targets = [Target("oribus up", cfg.pids[0], restart=local.restart)]
        nemesis = LocalNemesis(targets, seed=cfg.seed)
        nemesis_task = asyncio.create_task(nemesis.run(cfg.duration))
    progress = asyncio.create_task(_progress(clients, started, cfg.duration, err))
    try:
        if nemesis_task is not None:
            await nemesis_task
        _, pending = await asyncio.wait(tasks, timeout=cfg.duration + DRAIN_TIMEOUT)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        progress.cancel()
        if nemesis is not None:
            await nemesis.heal()
        if isinstance(nemesis, GroupNemesis):
            await nemesis.groups.close()
        for s in sessions:
            await s.close()
    if err.isatty():
        _line(err, "")
    keys = list_keys.used + step_keys.used
    final_error = await _final(addr, cfg, recorder, keys)
    elapsed = time.monotonic() - started
    events = recorder.events
    cfg.out.mkdir(parents=True, exist_ok=True)
    recorder.dump(cfg.out / "history.jsonl")
    report = check(events)
    info: dict[str, Any] = {
        "run_id": cfg.run_id, "target": addr + (f" and {cfg.http}" if cfg.http else ""),
        "workload": cfg.workload, "clients": cfg.clients, "keys": cfg.keys, "seed": cfg.seed,
        "prefix": cfg.prefix, "duration": cfg.duration, "rate": cfg.rate, "elapsed": elapsed,
        "http_clients": n_http, "mix": mix.to_dict(),
        "nemesis": _nemesis_line(nemesis),
        "faults": nemesis.by_kind() if isinstance(nemesis, GroupNemesis) else None,
        "nemesis_events": nemesis.events if nemesis is not None else [],
        "final_read_error": final_error,
    }
    data = reports.to_json(report, info, reports.series(events))
    (cfg.out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    (cfg.out / "report.html").write_text(reports.to_html(data))
    _line(out, reports.summary(report, info))
    if not cfg.keep:
        _line(err, await _remove(addr, cfg, keys))
    _line(out, f"history, report.json and report.html in {cfg.out}{os.sep}")
    if not report.ok:
        kinds = ", ".join(report.by_kind())
        _line(out, f"FAILED: the deployment broke its promises: {kinds}")
        return ANOMALIES
    if final_error is not None:
        _line(out, f"INCONCLUSIVE: the final state could not be read ({final_error}): "
                   "durability was not checked")
        return INCONCLUSIVE
    if report.counts.get("ok", 0) == 0:
        _line(out, "INCONCLUSIVE: no transaction committed, so nothing was checked")
        return INCONCLUSIVE
    _line(out, "OK: no anomaly found")
    return OK
