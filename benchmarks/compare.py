"""oribus against its peers: the same workloads, every backend durable, every run audited.

Backends (``benchmarks/peers``, a file each; each started by this harness on
loopback free ports in a temporary directory, Debian packages installed with
apt-get when missing and running as root): oribus embedded (``open_local``),
``oribus up``, ``oribus up --processes``, Redis 7 WATCH/MULTI/EXEC
(``appendfsync always``, and ``everysec`` — the one row that is not durable),
PostgreSQL 15 SERIALIZABLE (the rows read locked FOR SHARE, so a step commits
only if its reads are still current), etcd 3.4 Txn with a mod-revision
compare on every key read. ``--list`` prints them with the scenarios.

Workloads and sweeps (``harness/workloads.py``): agent-step (read 3 random
keys of 1000, write one, commit only if all reads are unchanged),
read-only, cross-shard (write the 3 keys), and sweeps from the agent-step
base point over contention (fraction of picks from the hot 1% of keys),
concurrent clients, read-set size, key count, value size and live sessions.

Every run: fresh store, populate, ``--warmup`` s, ``--duration`` s measured,
then the audit (``harness/audit.py``): the backend's final state against
every acknowledged commit (no lost update, nothing refused applied), no
accepted stale commit, no dependency cycle. Output in ``--out`` (default
``benchmarks/results/<UTC time>/``): ``results.json`` (everything, latency
quantiles included), ``results.md`` (tables, ratios oribus / peer, audit),
``machine.md`` (CPU, memory, kernel, disk and its fsync latency, versions of
every backend and Python package) and PNG plots (throughput vs each swept
parameter, latency CDF).

Time bounds: a full run is (backends x distinct points) runs of warm-up +
window (2 + 10 s) plus reset, populate and audit: 7 backends x 29 points
≈ 200 runs, about an hour on a 2-core machine. Populating is bounded by
``--populate-timeout`` (300 s; ``--quick``: 60 s): a point whose store cannot
be filled in time is recorded as skipped and the backend restarted, never
left running (measured: 1e6 keys take 6-50 s on every backend here). The
largest defaults: 1e6 keys, 100 KB values (1000 keys: 100 MB per store),
10 000 live sessions, 256 clients. ``--quick`` (what ``make bench`` runs):
2 s windows after 0.5 s warm-up, two or three points per sweep (12 points):
about 6 minutes for the 7 backends.

Not in the default set (name them with ``--backends``): ``oribus-procs-r3``
(``oribus-procs`` with every shard a replica group of 3: run it beside ``oribus-procs``
for what replication costs), ``oribus-up-lmdb`` (``oribus up --history-store lmdb``: the
kept versions on disk, beside ``oribus-up`` whose history is in memory), ``postgres-ssi``
(SERIALIZABLE with plain reads: its audit reports the stale commits SSI
allows), and two clients broken on purpose to show the audit catching them,
``redis-always-nowatch`` and ``oribus-embedded-blind``.

Usage::

    .venv/bin/python benchmarks/compare.py [--quick] [--backends redis-always postgres ...]
        [--scenarios agent-step clients ...] [--sweep clients=1,8,64] [--duration 10]
        [--warmup 2] [--clients 32] [--keys 1000] [--out DIR] [--no-install] [--list]
    oribus bench [same options]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from harness import report, targets  # noqa: E402
from harness.audit import AuditReport  # noqa: E402
from harness.machine import describe_machine, machine_markdown  # noqa: E402
from harness.runner import RunOptions, RunResult, run_point  # noqa: E402
from harness.workloads import BASE, SWEEPS, Point, parse_value, scenario_points  # noqa: E402
from peers import BACKENDS, DEFAULT_BACKENDS, make_backend  # noqa: E402

try:
    import uvloop
except ImportError:  # the figures are meant to be taken with uvloop
    uvloop = None

QUICK = {"duration": 2.0, "warmup": 0.5, "populate_timeout": 60.0}
FULL = {"duration": 10.0, "warmup": 2.0, "populate_timeout": 300.0}
RUN_OVERHEAD_S = 3.0  # rough reset + populate + audit per run, for the estimate


# ---- progress on stderr -------------------------------------------------------------------------


class Progress:
    """A bar over the runs (tqdm when installed), with the current run's phase and live rate."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.done = 0
        self.bar = None
        self.desc = ""
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} runs [{elapsed}<{remaining}]{postfix}")
            except ImportError:
                pass

    def start(self, desc: str) -> None:
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc, refresh=True)

    def phase(self, name: str, rate: float) -> None:
        if not self.enabled:
            return
        text = f"{name} {rate:,.0f} attempts/s" if rate else name
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
        else:
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.desc}: "
                  f"{text}\033[K", end="", file=sys.stderr, flush=True)

    def finish_run(self, line: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.bar.update(1)
        elif self.enabled:
            print(f"\r{line}\033[K", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- planning ---------------------------------------------------------------------------------


def base_point(args: argparse.Namespace) -> Point:
    return replace(BASE, clients=args.clients, keys=args.keys, reads=args.reads, value_size=args.value_size)


def plan(args: argparse.Namespace) -> tuple[list[dict], dict[str, Point]]:
    """The scenarios (with their point ids) and the distinct points, in run order."""
    base = base_point(args)
    overrides: dict[str, tuple] = {}
    for spec in args.sweep:
        name, _, raw = spec.partition("=")
        if name not in SWEEPS or SWEEPS[name].param is None or not raw:
            raise SystemExit(f"--sweep {spec!r}: expected NAME=v1,v2,... with NAME one of "
                             f"{', '.join(n for n, s in SWEEPS.items() if s.param)}")
        overrides[name] = tuple(parse_value(SWEEPS[name].param, v) for v in raw.split(","))
    scenarios: list[dict] = []
    points: dict[str, Point] = {}
    for name in args.scenarios:
        sweep = SWEEPS[name]
        pts = scenario_points(sweep, base, args.quick, overrides.get(name))
        for p in pts:
            if p.canonical().reads > p.keys:
                raise SystemExit(f"{name}: cannot read {p.reads} keys of {p.keys}")
            points.setdefault(p.id, p.canonical())
        values = [getattr(p, sweep.param) for p in pts] if sweep.param else [None]
        scenarios.append({"name": name, "param": sweep.param, "values": values, "points": [p.id for p in pts]})
    return scenarios, points


def result_line(r: RunResult) -> str:
    label = Point(**r.point).label()
    if r.status != "ok":
        return f"{r.backend:<16} {label}: {r.status}: {r.reason}"
    audit = "audit ok" if r.audit_ok else "AUDIT " + r.audit.get("summary", "FAILED")
    return (f"{r.backend:<16} {label}: {r.committed_per_s:,.0f} commit/s, {r.conflicts_per_s:,.0f} "
            f"conflicts/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, {audit}"
            + (f", {r.errors} errors ({r.first_error[:80]})" if r.errors else ""))


# ---- running ----------------------------------------------------------------------------------


async def run_backend(name: str, points: dict[str, Point], opts: RunOptions, work: Path,
                      args: argparse.Namespace, progress: Progress) -> tuple[dict, list[RunResult]]:
    results: list[RunResult] = []
    backend = None
    generation = 0

    async def start() -> None:
        nonlocal generation
        generation += 1
        await backend.start(work / f"{name}-{generation}")

    try:
        progress.start(f"{name} starting")
        backend = make_backend(name, shards=args.shards, install=not args.no_install)
        await start()
        info = await backend.describe()
    except Exception as e:  # noqa: BLE001 - BackendUnavailable, or a server that fails to start
        if backend is not None:
            await _quiet_stop(backend)
        for pid, p in points.items():
            r = RunResult(name, pid, p.as_dict(), status="unavailable",
                          reason=f"{type(e).__name__}: {e}".splitlines()[0])
            results.append(r)
            progress.finish_run(result_line(r))
        return {"error": f"{type(e).__name__}: {e}", "durable": getattr(backend, "durable", True),
                "peer": getattr(backend, "peer", not name.startswith("oribus"))}, results
    info["peer"] = backend.peer

    async def restart() -> str:
        """Stop and start the backend; "" or why it could not be restarted."""
        await _quiet_stop(backend)
        try:
            await start()
        except Exception as e:  # noqa: BLE001
            return f"; restart failed: {type(e).__name__}: {e}"
        return ""

    try:
        for pid, point in points.items():
            progress.start(f"{name} {point.label()}")
            restart_error = ""
            try:
                r = await run_point(backend, point, opts, progress.phase)
                if r.status == "skipped":  # abandon whatever it still has queued from populate
                    restart_error = await restart()
            except Exception as e:  # noqa: BLE001 - the run failed; restart the backend and go on
                r = RunResult(name, pid, point.as_dict(), status="failed",
                              reason=f"{type(e).__name__}: {e}"[:1000])
                restart_error = await restart()
            r.reason += restart_error
            if r.audit:
                r.audit["summary"] = AuditReport(**r.audit).summary()
            results.append(r)
            progress.finish_run(result_line(r))
            if restart_error:
                break
    finally:
        await _quiet_stop(backend)
    for pid, p in points.items():  # runs never reached (the backend could not be restarted)
        if not any(r.point_id == pid for r in results):
            r = RunResult(name, pid, p.as_dict(), status="failed", reason="backend could not be restarted")
            results.append(r)
            progress.finish_run(result_line(r))
    return info, results


async def _quiet_stop(backend) -> None:
    try:
        await backend.stop()
    except Exception as e:  # noqa: BLE001 - reported, the harness goes on
        print(f"  stopping {backend.name}: {type(e).__name__}: {e}", file=sys.stderr)


def new_document(args: argparse.Namespace, scenarios: list[dict]) -> dict:
    """results.json's skeleton; ``run_all`` fills in the machine, backends and runs as it goes."""
    return {
        "started": datetime.now(UTC).isoformat(),
        "finished": None,
        "interrupted": False,
        "argv": sys.argv[1:],
        "options": {"quick": args.quick, "duration": args.duration, "warmup": args.warmup,
                    "max_retries": args.max_retries, "populate_timeout": args.populate_timeout,
                    "seed": args.seed, "oribus_shards": args.shards},
        "base_point": base_point(args).as_dict(),
        "machine": {},
        "backend_order": list(args.backends),
        "backends": {},
        "scenarios": scenarios,
        "runs": [],
    }


async def run_all(args: argparse.Namespace, points: dict[str, Point], work: Path, doc: dict) -> None:
    opts = RunOptions(duration=args.duration, warmup=args.warmup, max_retries=args.max_retries,
                      populate_timeout=args.populate_timeout, seed=args.seed)
    doc["machine"] = describe_machine(work, ROOT)
    progress = Progress(len(args.backends) * len(points), not args.no_progress)
    try:
        for name in args.backends:
            info, results = await run_backend(name, points, opts, work, args, progress)
            doc["backends"][name] = info
            for r in results:
                d = r.as_dict()
                d["audit_summary"] = r.audit.get("summary", "")
                doc["runs"].append(d)
    finally:
        progress.close()


# ---- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # `oribus bench` runs this script and names itself in the usage line through ORIBUS_BENCH_PROG
    p = argparse.ArgumentParser(prog=os.environ.get("ORIBUS_BENCH_PROG", "compare.py"),
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS), choices=list(BACKENDS),
                   metavar="NAME", help=f"default: {' '.join(DEFAULT_BACKENDS)}")
    p.add_argument("--scenarios", nargs="+", default=list(SWEEPS), choices=list(SWEEPS), metavar="NAME",
                   help=f"default: all ({' '.join(SWEEPS)})")
    p.add_argument("--quick", action="store_true",
                   help="short windows and few sweep points (what `make bench` runs)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help="values of one sweep, e.g. clients=1,8,64 (repeatable)")
    p.add_argument("--duration", type=float, help="measured seconds per run (10; quick 2)")
    p.add_argument("--warmup", type=float, help="seconds before measuring (2; quick 0.5)")
    p.add_argument("--populate-timeout", type=float,
                   help="seconds to fill a store before the point is skipped (300; quick 60)")
    p.add_argument("--clients", type=int, default=BASE.clients, help="base point: concurrent clients")
    p.add_argument("--keys", type=int, default=BASE.keys, help="base point: keys in the store")
    p.add_argument("--reads", type=int, default=BASE.reads, help="base point: keys read per step")
    p.add_argument("--value-size", type=int, default=BASE.value_size, help="base point: padding bytes")
    p.add_argument("--max-retries", type=int, default=20, help="retries of a refused step before giving up")
    p.add_argument("--shards", type=int,
                   help="shards of every oribus backend (default: each deployment's own, "
                        "1 embedded and up, one per core with --processes)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help="output directory (default benchmarks/results/<UTC time>)")
    p.add_argument("--work-dir", type=Path, help="where the servers' data directories go (default: TMPDIR)")
    p.add_argument("--keep-work", action="store_true", help="keep the data directories and server logs")
    p.add_argument("--no-install", action="store_true", help="never apt-get install a missing server")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per run)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--list", action="store_true", help="print the backends and scenarios, and exit")
    return p


def print_list(quick: bool) -> None:
    print("backends (default set first):")
    for name in [*DEFAULT_BACKENDS, *(n for n in BACKENDS if n not in DEFAULT_BACKENDS)]:
        print(f"  {name}{'' if name in DEFAULT_BACKENDS else '  (only when named)'}")
    print("scenarios:")
    for s in SWEEPS.values():
        values = s.quick if quick else s.full
        print(f"  {s.name:<12} " + (f"{s.param} in {', '.join(f'{v:g}' for v in values)}" if s.param
                                    else "one point"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print_list(args.quick)
        return 0
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.duration <= 0 or args.warmup < 0 or args.clients < 1:
        raise SystemExit("need --duration > 0, --warmup >= 0 and --clients >= 1")
    scenarios, points = plan(args)
    out = args.out or HERE / "results" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="oribus-compare-", dir=args.work_dir))
    os.chmod(work, 0o755)  # the PostgreSQL server runs as its own user
    runs = len(points) * len(args.backends)
    estimate = runs * (args.warmup + args.duration + RUN_OVERHEAD_S)
    print(f"{len(args.backends)} backends x {len(points)} points = {runs} runs, about "
          f"{estimate / 60:.0f} min or more (windows {args.warmup:g} + {args.duration:g} s); "
          f"results in {out}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    doc = new_document(args, scenarios)
    try:
        factory = uvloop.new_event_loop if uvloop is not None else None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run_all(args, points, work, doc))
    except KeyboardInterrupt:  # write what was measured so far
        doc["interrupted"] = True
        print("interrupted: writing the runs done so far", file=sys.stderr)
    finally:
        if args.keep_work:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc["finished"] = datetime.now(UTC).isoformat()
    doc["elapsed_seconds"] = round(time.monotonic() - t0, 1)
    if not doc["machine"]:
        return 130

    checked = targets.check(doc)
    doc["targets"] = [{"name": t.name, "measured": t.measured, "met": t.met} for t in checked]
    report.write_json(doc, out / "results.json")
    report.write_markdown(doc, out / "results.md")
    (out / "machine.md").write_text(machine_markdown(doc["machine"], doc["backends"]))
    written = [] if args.no_plots else report.write_plots(doc, out)
    print(f"wrote {out / 'results.json'}, results.md, machine.md"
          + (f" and {len(written)} plots" if written else ""), file=sys.stderr)

    for t in checked:
        if t.met is not None:
            print(f"target {t.verdict():<6} {t.name}: {t.measured}", file=sys.stderr)
    bad = [r for r in doc["runs"] if r["status"] in ("failed", "unavailable")
           or (r["status"] == "ok" and not r["audit"].get("ok"))]
    for r in bad:
        print(f"NOT OK: {r['backend']} {Point(**r['point']).label()}: {r['status']} "
              f"{r['reason'] or r['audit_summary']}",
              file=sys.stderr)
    if doc["interrupted"]:
        return 130
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
