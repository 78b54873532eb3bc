"""The performance targets, checked against a comparison's results.

Each target is computed from the runs of one comparison (same machine, same
window), never from figures taken elsewhere. A target whose runs are missing
(a backend or scenario not run, a run that failed) is reported as not
measured, not as met.

- agent-step: oribus embedded ≥ 1.5× PostgreSQL and ≥ 1.0× Redis (appendfsync
  always) committed steps/s, with a p99 no worse than either; ``oribus up`` ≥
  1.0× PostgreSQL.
- hot contention (``hot`` = 0.5: half the picks from the hot 1% of keys):
  committed steps/s ≥ Redis's, retries per commit ≤ Redis's.
- read-set size: the p50 of a committed step grows at most linearly — for
  every size n, p50(n) ≤ n × p50(1) (the cost per key read never exceeds
  what a one-key step costs).
- live sessions: committed steps/s stay within 20% over the sweep (the
  slowest point ≥ 0.8 × the fastest).
"""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDED, UP, POSTGRES, REDIS = "oribus-embedded", "oribus-up", "postgres", "redis-always"
HOT = 0.5


@dataclass
class Target:
    name: str
    measured: str  # the figures it was decided on
    met: bool | None  # None: not measured

    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[self.met]


def _ok(run: dict | None) -> dict | None:
    return run if run is not None and run.get("status") == "ok" and run.get("audit", {}).get("ok") else None


def _sweep(doc: dict, name: str) -> list[tuple[float, str]]:
    for sc in doc["scenarios"]:
        if sc["name"] == name and sc["param"] is not None:
            return list(zip(sc["values"], sc["points"], strict=True))
    return []


def _base(doc: dict) -> str | None:
    for sc in doc["scenarios"]:
        if sc["name"] == "agent-step":
            return sc["points"][0]
    for value, pid in _sweep(doc, "contention"):
        if value == 0:
            return pid
    return None


def check(doc: dict) -> list[Target]:
    runs = {(r["backend"], r["point_id"]): r for r in doc["runs"]}
    out: list[Target] = []

    def run(backend: str, pid: str | None) -> dict | None:
        return _ok(runs.get((backend, pid))) if pid is not None else None

    def ratio(name: str, mine: str, peer: str, pid: str | None, at_least: float) -> None:
        a, b = run(mine, pid), run(peer, pid)
        if a is None or b is None:
            out.append(Target(name, "runs missing or failed", None))
            return
        r = a["committed_per_s"] / b["committed_per_s"] if b["committed_per_s"] > 0 else float("inf")
        out.append(Target(name, f"{a['committed_per_s']:,.0f} / {b['committed_per_s']:,.0f} = {r:.2f}× "
                                f"(target ≥ {at_least:g}×)", r >= at_least))

    def p99_no_worse(name: str, mine: str, peer: str, pid: str | None) -> None:
        a, b = run(mine, pid), run(peer, pid)
        if a is None or b is None:
            out.append(Target(name, "runs missing or failed", None))
            return
        out.append(Target(name, f"p99 {a['p99_ms']:.1f} ms vs {b['p99_ms']:.1f} ms", a["p99_ms"] <= b["p99_ms"]))

    base = _base(doc)
    ratio("agent-step: embedded ≥ 1.5× PostgreSQL", EMBEDDED, POSTGRES, base, 1.5)
    ratio("agent-step: embedded ≥ 1.0× Redis (always)", EMBEDDED, REDIS, base, 1.0)
    p99_no_worse("agent-step: embedded p99 ≤ PostgreSQL's", EMBEDDED, POSTGRES, base)
    p99_no_worse("agent-step: embedded p99 ≤ Redis's", EMBEDDED, REDIS, base)
    ratio("agent-step: oribus up ≥ 1.0× PostgreSQL", UP, POSTGRES, base, 1.0)

    hot = next((pid for value, pid in _sweep(doc, "contention") if abs(value - HOT) < 1e-9), None)
    for mine in (EMBEDDED, UP):
        a, b = run(mine, hot), run(REDIS, hot)
        name = f"hot={HOT:g}: {mine} commits ≥ Redis's, retries/commit ≤ Redis's"
        if a is None or b is None:
            out.append(Target(name, "runs missing or failed", None))
            continue
        out.append(Target(name, f"{a['committed_per_s']:,.0f} vs {b['committed_per_s']:,.0f} commit/s; "
                                f"{a['retries_per_commit']:.2f} vs {b['retries_per_commit']:.2f} retries/commit",
                          a["committed_per_s"] >= b["committed_per_s"]
                          and a["retries_per_commit"] <= b["retries_per_commit"]))

    for mine in (EMBEDDED, UP):
        points = [(int(v), run(mine, pid)) for v, pid in _sweep(doc, "read-set")]
        name = f"read-set: {mine} p50 grows at most linearly (p50(n) ≤ n × p50(1))"
        one = next((r for n, r in points if n == 1), None)
        if one is None or len(points) < 2 or any(r is None for _, r in points):
            out.append(Target(name, "runs missing or failed", None))
            continue
        worst = max(r["p50_ms"] / (n * one["p50_ms"]) for n, r in points if n > 1)
        shown = ", ".join(f"{n}: {r['p50_ms']:.1f}" for n, r in points)
        out.append(Target(name, f"p50 ms by reads {shown}; max p50(n) / (n × p50(1)) = {worst:.2f}",
                          worst <= 1.0))

    for mine in (EMBEDDED, UP):
        points = [(int(v), run(mine, pid)) for v, pid in _sweep(doc, "sessions")]
        name = f"sessions: {mine} throughput within 20% over the sweep"
        if len(points) < 2 or any(r is None for _, r in points):
            out.append(Target(name, "runs missing or failed", None))
            continue
        rates = [r["committed_per_s"] for _, r in points]
        spread = min(rates) / max(rates)
        shown = ", ".join(f"{n:,}: {r['committed_per_s']:,.0f}" for n, r in points)
        out.append(Target(name, f"commit/s by live sessions {shown}; slowest / fastest = {spread:.2f}",
                          spread >= 0.8))
    return out


def markdown(rows: list[dict]) -> list[str]:
    """The targets as results.json keeps them (name, measured, met), as a markdown section."""
    out = ["## Targets", "", "Checked on this run's own figures (`harness/targets.py`).", "",
           "| target | measured | verdict |", "|---|---|---|"]
    out += [f"| {t['name']} | {t['measured']} | {Target(**t).verdict()} |" for t in rows]
    return [*out, ""]
