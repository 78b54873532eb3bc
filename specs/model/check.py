#!/usr/bin/env python3
"""Model-check the oribus commit protocol with SPIN: the model, then its broken variants.

    python3 specs/model/check.py [--cycles] [--crashes N] [--shortest] [--json] [--jobs N]
                                 [--keep DIR]

The correct model (``oribus.pml``) must verify with no error in an exhaustive search:

* ``assertions`` — compiled with ``-DSAFETY -DNOCLAIM``: every ``assert`` of the model
  (I-1 at each commit point, I-2 at each read, I-2/I-3/I-4 in every state through the
  Monitor process, the quiescent end checks) and invalid end states (a session or the
  recovery sweep stuck forever);
* one run per ``ltl`` block (``./pan -a -N name``);
* with ``--cycles`` (``make spec`` passes it), ``cycles`` — compiled with ``-DNP``,
  ``./pan -l``: the model has no progress labels, so any cycle at all is reported; none
  means every run of the model ends (and, with the invalid-end-state check, ends with
  nothing left prepared: I-6). It doubles the time of the whole check.

Each ``broken_*.pml`` (one deliberate bug, named by its ``expect:`` line) must yield a
counterexample twice: once through the model's assertions, once through the named ltl
property alone (built with ``-DONLY_LTL``, which turns the model's own assertions off).
A counterexample means pan reports errors > 0 and writes a trail; the trail is replayed
and its ``EV`` lines (the protocol events) are printed.

The model has two configurations (``CONFIGS``), each checked in full: ``default`` (3
sessions, 2 shards), and ``ro_2pc`` (``-DRO_2PC``: a third shard, read only by a two-phase
commit among two writers, and written by another transaction). A broken variant is searched
in the configurations its ``configs:`` line names (``default`` alone without one); in
``ro_2pc`` its counterexample must also go through that configuration's transaction shape
(``SHAPE``: the two-phase commit's lease on its read-only participant, then its commit point).

A second model, ``replication.pml`` (one replica group, ``specs/replication.md``), is
checked the same way with its own variants, ``broken_repl_*.pml`` (one configuration; no
cycle search: its members run for ever by design).

With ``--shortest`` the broken variants are searched with ``-i`` (iterative shortening:
a shortest counterexample, a few seconds more each). Build artefacts go to a temporary
directory (``--keep DIR`` copies the trails out). The exit status is 0 when every
expectation holds, 1 when one does not (an error in the correct model, an incomplete
search, or a broken variant without a counterexample), and 2 when spin or a C compiler is
missing. ``--json`` prints one JSON document instead of the
table (tests/consistency/test_protocol_model.py reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "oribus.pml"  # the commit protocol
REPLICATION = HERE / "replication.pml"  # one replica group (specs/replication.md)
REPLICATION_VARIANTS = "broken_repl_"  # the prefix of the replication model's broken variants
CC = os.environ.get("CC", "gcc")
SEARCH_DEPTH = 20_000  # the model's deepest path is a few hundred steps

# the model's configurations and the spin -D flags that select them
CONFIGS: dict[str, list[str]] = {"default": [], "ro_2pc": ["-DRO_2PC"]}
# what every counterexample found in a configuration must show (each an EV line's start)
SHAPE: dict[str, list[str]] = {
    "ro_2pc": ["A: validate on S2 (read-only): YES", "A: commit point"],
}

_LTL = re.compile(r"^\s*ltl\s+(\w+)\s*\{", re.M)
_EXPECT = re.compile(r"expect:\s*(\w+)")
_CONFIGS_LINE = re.compile(r"configs:\s*(\w+(?:[ \t]+\w+)*)")
_ERRORS = re.compile(r"depth reached (\d+), errors: (\d+)")
_STATES = re.compile(r"^\s*(\d+) states, stored", re.M)
_TRANSITIONS = re.compile(r"^\s*(\d+) transitions", re.M)
_CODE = re.compile(r"\{(\w+):(\d+)\}")
# the codes in the model's EV lines, spelled out
_WORDS = {
    "state": {0: "nothing", 1: "PREPARED", 2: "COMMITTED", 3: "ABORTED"},
    "vote": {2: "COMMITTED", 11: "YES", 12: "NO (Conflict)", 13: "NO (SessionExpired)",
             14: "NOTHING", 15: "Unavailable (restart grace)", 16: "Aborted (deadline passed)"},
    "mask": {1: "A", 2: "B", 3: "A, B", 4: "C", 5: "A, C", 6: "B, C", 7: "A, B, C"},
    "ask": {0: "asked to abort", 1: "asked to commit"},
    "durable": {0: " (not yet fsynced)", 1: ""},
}


@dataclass
class Run:
    """One pan search and what came of it."""

    model: str  # file name under specs/model/
    check: str  # "assertions", "ltl" or "cycles"
    prop: str | None  # the ltl property, for check == "ltl"
    expect: str  # "verified" or "counterexample"
    config: str = "default"  # a key of CONFIGS
    states: int = 0
    transitions: int = 0
    depth: int = 0
    errors: int = -1
    complete: bool = False  # the search covered the whole state space
    trail: bool = False
    events: list[str] = field(default_factory=list)  # the counterexample, replayed
    seconds: float = 0.0
    ok: bool = False
    problem: str | None = None


@dataclass
class Build:
    """One pan binary (one model, one set of flags) and the runs that use it."""

    model: Path
    spin_defines: list[str]
    cc_flags: list[str]
    runs: list[Run]
    pan: Path | None = None  # the compiled verifier, once built


def ltl_names(model: Path) -> list[str]:
    return _LTL.findall(model.read_text())


def broken_configs(text: str) -> list[str]:
    """The configurations a broken variant is searched in: its ``configs:`` line, or default."""
    m = _CONFIGS_LINE.search(text)
    return m.group(1).split() if m else ["default"]


def variants(model: Path) -> list[Path]:
    """The broken variants of ``model``: ``broken_repl_*.pml`` for the replication model, every
    other ``broken_*.pml`` for the commit protocol's."""
    every = sorted(HERE.glob("broken_*.pml"))
    repl = [p for p in every if p.name.startswith(REPLICATION_VARIANTS)]
    return repl if model == REPLICATION else [p for p in every if p not in repl]


def configs_of(model: Path) -> dict[str, list[str]]:
    return CONFIGS if model == MODEL else {"default": []}


def plan(crashes: int | None, cycles: bool) -> list[Build]:
    extra = [] if crashes is None else [f"-DMAXCRASH={crashes}"]
    builds = []
    for model in (MODEL, REPLICATION):
        names = ltl_names(model)
        configs = configs_of(model)
        for config, defines in configs.items():
            flags = [*extra, *defines]
            builds += [
                Build(model, flags, ["-O2", "-DSAFETY", "-DNOCLAIM"],
                      [Run(model.name, "assertions", None, "verified", config)]),
                Build(model, flags, ["-O2"],
                      [Run(model.name, "ltl", name, "verified", config) for name in names]),
            ]
            if cycles and model == MODEL:  # the replication model's members run forever by design
                builds.append(Build(model, flags, ["-O2", "-DNP", "-DNOCLAIM"],
                                    [Run(model.name, "cycles", None, "verified", config)]))
        for broken in variants(model):
            text = broken.read_text()
            m = _EXPECT.search(text)
            if m is None:
                raise SystemExit(f"{broken.name}: no 'expect: <ltl property>' line")
            if m.group(1) not in names:
                raise SystemExit(f"{broken.name}: expects {m.group(1)!r}, which {model.name} does not define")
            for config in broken_configs(text):
                if config not in configs:
                    raise SystemExit(f"{broken.name}: names {config!r}, not a configuration of {model.name}")
                flags = [*extra, *configs[config]]
                # the searches stop at the first error and are small: compile fast, not optimised
                builds.append(Build(broken, flags, ["-O0", "-DSAFETY", "-DNOCLAIM"],
                                    [Run(broken.name, "assertions", None, "counterexample", config)]))
                builds.append(Build(broken, [*flags, "-DONLY_LTL"], ["-O0"],
                                    [Run(broken.name, "ltl", m.group(1), "counterexample", config)]))
    return builds


def _sh(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def compile_pan(build: Build, workdir: Path) -> None:
    """spin -a, then the C compiler: build.pan, or a problem on every run of the build."""
    workdir.mkdir(parents=True)
    gen = _sh(["spin", *build.spin_defines, "-a", str(build.model)], workdir)
    if gen.returncode != 0 or not (workdir / "pan.c").exists():
        for run in build.runs:
            run.problem = f"spin -a failed:\n{gen.stdout}{gen.stderr}"
        return
    comp = _sh([CC, "-w", *build.cc_flags, "-o", "pan", "pan.c"], workdir)
    if comp.returncode != 0:
        for run in build.runs:
            run.problem = f"{CC} failed:\n{comp.stderr[-2000:]}"
        return
    build.pan = workdir / "pan"


def search(build: Build, run: Run, workdir: Path, hash_bits: int, keep: Path | None,
           shortest: bool) -> None:
    """One pan search in its own directory (pan writes its trail to the working directory)."""
    if build.pan is None:
        return
    workdir.mkdir(parents=True)
    args = [str(build.pan), f"-m{SEARCH_DEPTH}", f"-w{hash_bits}", "-n"]
    if shortest and run.expect == "counterexample":
        args.append("-i")
    if run.prop is not None:
        args += ["-a", "-N", run.prop]
    if run.check == "cycles":
        args.append("-l")
    t0 = time.monotonic()
    out = _sh(args, workdir)
    run.seconds = round(time.monotonic() - t0, 2)
    text = out.stdout + out.stderr
    judge(run, text)
    trail = workdir / f"{build.model.name}.trail"
    run.trail = trail.exists()
    if run.trail:
        replay = [str(build.pan), "-r", trail.name] + (["-N", run.prop] if run.prop else [])
        shown = _sh(replay, workdir).stdout
        for line in shown.splitlines():
            if line.startswith("EV "):
                run.events.append(_CODE.sub(_spell, line[3:].strip()))
            elif "violated" in line:
                run.events.append(line.strip())
                break
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            name = (f"{build.model.stem}.{run.config}.{run.check}"
                    f"{'.' + run.prop if run.prop else ''}.trail")
            shutil.copy(trail, keep / name)
    decide(run, text)


def _spell(m: re.Match[str]) -> str:
    return _WORDS.get(m.group(1), {}).get(int(m.group(2)), m.group(0))


def judge(run: Run, text: str) -> None:
    m = _ERRORS.search(text)
    if m is None:
        run.problem = f"unexpected pan output:\n{text[-2000:]}"
        return
    run.depth, run.errors = int(m.group(1)), int(m.group(2))
    if (s := _STATES.search(text)) is not None:
        run.states = int(s.group(1))
    if (t := _TRANSITIONS.search(text)) is not None:
        run.transitions = int(t.group(1))
    run.complete = (
        run.errors == 0
        and "Search not completed" not in text
        and "max search depth too small" not in text
    )


def decide(run: Run, text: str) -> None:
    if run.problem is not None:
        return
    if run.expect == "verified":
        if run.errors != 0:
            run.problem = "the correct model has an error:\n" + "\n".join(run.events[-20:])
        elif not run.complete:
            run.problem = f"the search was not exhaustive:\n{text[-1500:]}"
        elif run.states <= 0:
            run.problem = "no states were explored"
    elif run.errors < 1:
        run.problem = "the broken variant produced no counterexample"
    elif not run.trail:
        run.problem = "pan reported an error but wrote no trail"
    elif missing := [ev for ev in (SHAPE.get(run.config, []) if not run.model.startswith(
            ("replication", REPLICATION_VARIANTS)) else [])
                     if not any(e.startswith(ev) for e in run.events)]:
        run.problem = (f"the counterexample does not go through the {run.config} shape "
                       f"(no event {missing[0]!r})")
    run.ok = run.problem is None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="builds compiled and searched at once")
    ap.add_argument("--crashes", type=int, default=None,
                    help="crash budget (MAXCRASH; the model's default is 1)")
    ap.add_argument("--hash-bits", type=int, default=None,
                    help="pan -w: a hash table of 2**N slots (default: sized for the crash budget)")
    ap.add_argument("--cycles", action="store_true",
                    help="also search the correct model for cycles (every run must end)")
    ap.add_argument("--shortest", action="store_true",
                    help="find a shortest counterexample for each broken variant (pan -i)")
    ap.add_argument("--keep", type=Path, default=None, help="copy the trails into this directory")
    args = ap.parse_args(argv)

    missing = [tool for tool in ("spin", CC) if shutil.which(tool) is None]
    if missing:
        print(f"check.py: {' and '.join(missing)} not found; install them "
              "(Debian: apt-get install spin gcc, or `make spec`)", file=sys.stderr)
        return 2

    # at most 1.5 million states with one crash, 12.3 million with two
    hash_bits = args.hash_bits or (22 if (args.crashes or 1) <= 1 else 24)
    builds = plan(args.crashes, args.cycles)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="oribus-spin-") as tmp:
        work = Path(tmp)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda ib: compile_pan(ib[1], work / f"build{ib[0]:02d}"), enumerate(builds)))
            jobs = [(b, r) for b in builds for r in b.runs]
            # the long searches of the correct model first
            jobs.sort(key=lambda br: br[1].expect != "verified")
            list(pool.map(
                lambda ibr: search(ibr[1][0], ibr[1][1], work / f"run{ibr[0]:02d}", hash_bits,
                                   args.keep, args.shortest),
                enumerate(jobs),
            ))
    runs = [r for b in builds for r in b.runs]
    ok = all(r.ok for r in runs)
    total = round(time.monotonic() - started, 1)

    if args.json:
        print(json.dumps({"ok": ok, "seconds": total, "runs": [asdict(r) for r in runs]}, indent=2))
    else:
        report(runs, ok, total)
    return 0 if ok else 1


def report(runs: list[Run], ok: bool, total: float) -> None:
    for r in runs:
        what = r.check if r.prop is None else f"ltl {r.prop}"
        verdict = "ok" if r.ok else "FAILED"
        outcome = "verified" if r.errors == 0 else f"counterexample ({len(r.events)} events)"
        print(f"{r.model:28} {r.config:8} {what:40} {r.states:>10,} states {r.transitions:>11,} transitions "
              f"errors {r.errors:<2} {r.seconds:6.2f} s  {outcome:28} {verdict}")
        if r.expect == "counterexample" and r.events:
            for ev in r.events:
                print(f"    {ev}")
        if r.problem:
            print("    " + r.problem.replace("\n", "\n    "))
    print(f"{'all expectations hold' if ok else 'SOME EXPECTATIONS FAILED'} ({total} s)")


if __name__ == "__main__":
    sys.exit(main())
