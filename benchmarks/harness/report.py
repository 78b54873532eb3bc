"""Writing a run's results: ``results.json``, ``results.md``, ``machine.md`` and PNG plots.

``results.md`` has, in order: the base points of each workload side by side
(throughput, conflicts, retries, latency, audit), the ratios oribus / peer
of committed steps per second at every point, one table per sweep, every
run in full, and the audit's findings. Plots (matplotlib, Agg): committed
steps per second against each swept parameter (one line per backend), and
the latency CDF of committed steps at the agent-step base point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from harness import targets
from harness.workloads import SWEEPS, Point

NOT_DURABLE = "†"
AUDIT_FAILED = "✗"


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _cell(run: dict | None) -> str:
    if run is None:
        return "–"
    if run["status"] != "ok":
        return run["status"]
    mark = "" if run["audit"].get("ok") else f" {AUDIT_FAILED}"
    return _fmt_rate(run["committed_per_s"]) + mark


def _latency_cell(run: dict | None) -> str:
    if run is None or run["status"] != "ok":
        return "–"
    return f"{run['p50_ms']:.1f} / {run['p99_ms']:.1f}"


def _label(doc: dict, name: str) -> str:
    info = doc["backends"].get(name, {})
    return name + ("" if info.get("durable", True) else NOT_DURABLE)


def _runs_by(doc: dict) -> dict[tuple[str, str], dict]:
    return {(r["backend"], r["point_id"]): r for r in doc["runs"]}


def _backend_table(doc: dict, backends: list[str]) -> list[str]:
    """Each backend as read back from the running server: version, layout, commit mechanism."""
    out = ["## Backends", "", "| backend | version | layout | durable | commit |", "|---|---|---|---|---|"]
    for b in backends:
        info = doc["backends"].get(b, {})
        if "shards" in info:
            layout = f"{info['shards']} shard" + ("s" if info["shards"] != 1 else "")
            if info.get("shard_processes"):
                layout += " (a process each)"
        else:
            layout = "single server"
        mech = str(info.get("mechanism", "")).replace("|", "/")
        durable = "yes" if info.get("durable", True) else "no"
        out.append(f"| {_label(doc, b)} | {info.get('version', info.get('status', '?'))} | {layout} "
                   f"| {durable} | {mech} |")
    return [*out, ""]


def write_markdown(doc: dict, path: Path) -> None:
    runs = _runs_by(doc)
    labels = {r["point_id"]: Point(**r["point"]).label() for r in doc["runs"]}
    backends = doc["backend_order"]
    oribus = [b for b in backends if not doc["backends"].get(b, {}).get("peer", True)]
    peers = [b for b in backends if doc["backends"].get(b, {}).get("peer", True)]
    opts = doc["options"]
    base = doc["base_point"]
    out = [
        f"# oribus and its peers — {doc['started'][:19].replace('T', ' ')}",
        "",
        f"{'Quick run (`--quick`): short windows, few sweep points; figures are indicative only. ' if opts['quick'] else ''}"
        f"Each point: a fresh store, {opts['warmup']:g} s warm-up, {opts['duration']:g} s measured, "
        f"then the audit (no lost update, no accepted stale commit, serializable). Clients: Python asyncio "
        f"in one process ({doc['machine']['event_loop']}). Base point: {base['clients']} clients, "
        f"{base['keys']} keys, read {base['reads']}, write {base['writes']}, {base['value_size']}-byte "
        f"values, uniform picks. A refused step is retried on the same keys up to {opts['max_retries']} "
        "times. Every backend is durable (fsync before the commit is acknowledged) except those marked "
        f"{NOT_DURABLE}. {AUDIT_FAILED}: the audit failed. Machine: see machine.md "
        f"({doc['machine']['cpu']}, {doc['machine']['cores']} cores).",
        "",
        *(["**Interrupted**: only the runs below were done.", ""] if doc.get("interrupted") else []),
        *_backend_table(doc, backends),
        *(targets.markdown(doc["targets"]) if doc.get("targets") else []),
        "## Base points",
        "",
        "| workload | backend | commit/s | CPU ms/commit | conflicts/s | retries/commit | gave up | p50 ms | p95 ms | "
        "p99 ms | audit |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for sc in doc["scenarios"]:
        if sc["param"] is not None:
            continue
        pid = sc["points"][0]
        for b in backends:
            r = runs.get((b, pid))
            if r is None:
                continue
            if r["status"] != "ok":
                out.append(f"| {sc['name']} | {_label(doc, b)} | {r['status']}: {r['reason'][:80]} ||||||||| |")
                continue
            out.append(f"| {sc['name']} | {_label(doc, b)} | {_fmt_rate(r['committed_per_s'])} | "
                       f"{_cpu_per_op(r)} | {_fmt_rate(r['conflicts_per_s'])} | {r['retries_per_commit']:.3f} | {r['gave_up']} | "
                       f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                       f"{_audit_text(r)} |")

    if oribus and peers:
        out += ["", "## Ratios oribus / peer (committed steps per second)", ""]
        for o in oribus:
            out += [f"### {o}", "", "| point | " + " | ".join(_label(doc, p) for p in peers) + " |",
                    "|---|" + "--:|" * len(peers)]
            shown: set[str] = set()
            for sc in doc["scenarios"]:
                for pid in sc["points"]:
                    if pid in shown:  # a sweep point equal to the base point is shown once
                        continue
                    shown.add(pid)
                    mine = runs.get((o, pid))
                    cells = [_ratio(mine, runs.get((p, pid))) for p in peers]
                    out.append(f"| {labels.get(pid, pid)} | " + " | ".join(cells) + " |")
            out.append("")

    for sc in doc["scenarios"]:
        if sc["param"] is None:
            continue
        out += [f"## Sweep: {sc['name']} — {SWEEPS[sc['name']].title}; committed steps per second", "",
                f"| {sc['param']} | " + " | ".join(_label(doc, b) for b in backends) + " |",
                "|--:|" + "--:|" * len(backends)]
        for value, pid in zip(sc["values"], sc["points"], strict=True):
            out.append(f"| {value:g} | " + " | ".join(_cell(runs.get((b, pid))) for b in backends) + " |")
        out += ["", f"Latency of a committed step, p50 / p99 ms, by {sc['param']}:", "",
                f"| {sc['param']} | " + " | ".join(_label(doc, b) for b in backends) + " |",
                "|--:|" + "--:|" * len(backends)]
        for value, pid in zip(sc["values"], sc["points"], strict=True):
            out.append(f"| {value:g} | " + " | ".join(_latency_cell(runs.get((b, pid))) for b in backends) + " |")
        out.append("")

    out += ["", "## Every run", "",
            "| backend | point | commit/s | confl/s | retries/commit | gave up | errors | p50 ms | p95 ms | "
            "p99 ms | populate s | CPU ms/op | faults/op | client CPU | server CPU | other CPU | load | audit |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in doc["runs"]:
        if r["status"] != "ok":
            out.append(f"| {_label(doc, r['backend'])} | {Point(**r['point']).label()} | {r['status']}: {r['reason'][:100]} "
                       "|||||||||||||||")
            continue
        out.append(f"| {_label(doc, r['backend'])} | {Point(**r['point']).label()} | {_fmt_rate(r['committed_per_s'])} | "
                   f"{_fmt_rate(r['conflicts_per_s'])} | {r['retries_per_commit']:.3f} | {r['gave_up']} | "
                   f"{r['errors']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                   f"{r['populate_seconds']:.1f} | {_cpu_per_op(r)} | {_faults_per_op(r)} | {r['client_cpu']:.0%} | "
                   f"{r.get('server_cpu', 0.0):.0%} | {r.get('other_cpu', 0.0):.0%} | {r['load_average']:.1f} | "
                   f"{_audit_text(r)} |")
    out += ["", "CPU ms/op: the CPU time the client process and the server processes spent in the "
            "measured window per committed step (per read step for read-only), from /proc; client, "
            "server and other CPU are cores busy on average (other: everything else on the machine; "
            "a high value there means the run shared the machine). faults/op: minor page faults of the "
            "client and the servers per committed step, one per 4 KiB page of memory a run grows into "
            "(machine.md gives what a fault costs on this machine).", ""]
    out += ["", "A point is its workload and what differs from the default (32 clients, 1000 keys, "
            "3 reads, 100-byte values, uniform picks, a session per client); results.json has "
            "every parameter. For read-only, commit/s counts completed read steps.", ""]

    out += ["## Audit", ""]
    failed = [r for r in doc["runs"] if r["status"] == "ok" and not r["audit"].get("ok")]
    ok_runs = [r for r in doc["runs"] if r["status"] == "ok" and r["audit"].get("ok")]
    total = sum(r["audit"]["acknowledged"] for r in ok_runs)
    out.append(f"{len(ok_runs)} runs passed the audit ({total:,} acknowledged commits checked against the "
               f"backends' final state and against one another); {len(failed)} failed.")
    for r in failed:
        out += ["", f"### {r['backend']}, {Point(**r['point']).label()}: {r['audit_summary']}", ""]
        out += [f"- {p}" for p in r["audit"].get("problems", [])]
    errors = [r for r in doc["runs"] if r["errors"]]
    if errors:
        out += ["", "Runs with errors (outcome unknown; the audit allows for them):", ""]
        out += [f"- {r['backend']}, {Point(**r['point']).label()}: {r['errors']} errors, first: {r['first_error']}"
                for r in errors]
    path.write_text("\n".join(out) + "\n")


def _audit_text(r: dict) -> str:
    return r.get("audit_summary") or ("ok" if r["audit"].get("ok") else "FAIL")


def _ratio(mine: dict | None, theirs: dict | None) -> str:
    if not mine or not theirs or mine["status"] != "ok" or theirs["status"] != "ok":
        return "–"
    if theirs["committed_per_s"] <= 0:
        return "∞" if mine["committed_per_s"] > 0 else "–"
    return f"{mine['committed_per_s'] / theirs['committed_per_s']:.2f}×"


# ---- plots ------------------------------------------------------------------------------------

LOG_X = {"clients", "keys", "value_size", "sessions", "reads"}


def write_plots(doc: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs_by(doc)
    backends = doc["backend_order"]
    written: list[Path] = []
    for sc in doc["scenarios"]:
        if sc["param"] is None or len(sc["values"]) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for b in backends:
            xs, ys = [], []
            for value, pid in zip(sc["values"], sc["points"], strict=True):
                r = runs.get((b, pid))
                if r and r["status"] == "ok":
                    xs.append(value)
                    ys.append(r["committed_per_s"])
            if xs:
                style = "-o" if not doc["backends"].get(b, {}).get("peer", True) else "--s"
                ax.plot(xs, ys, style, label=_label(doc, b), markersize=4)
        if sc["param"] in LOG_X:
            ax.set_xscale("log")
        ax.set_xlabel(SWEEPS[sc["name"]].title)
        ax.set_ylabel("committed steps / s")
        ax.set_title(f"throughput vs {SWEEPS[sc['name']].title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"throughput_vs_{sc['name'].replace('-', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    base = next((sc for sc in doc["scenarios"] if sc["name"] == "agent-step"), None)
    cdfs = {} if base is None else {
        b: r["latency_cdf_ms"] for b in backends
        if (r := runs.get((b, base["points"][0]))) and r["status"] == "ok" and r["latency_cdf_ms"]}
    if cdfs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for b, q in cdfs.items():
            ax.plot(q, [i / (len(q) - 1) for i in range(len(q))], label=_label(doc, b))
        ax.set_xscale("log")
        ax.set_xlabel("latency of a committed step, first read to acknowledgement (ms)")
        ax.set_ylabel("fraction of committed steps")
        ax.set_title("latency CDF, agent-step base point")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "latency_cdf.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_json(doc: dict, path: Path) -> None:
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps(clean(doc), indent=1) + "\n")


def _cpu_per_op(r: dict) -> str:
    v = r.get("cpu_ms_per_op", 0.0)
    return f"{v:.2f}" if v else "–"


def _faults_per_op(r: dict) -> str:
    v = r.get("faults_per_op")
    return "–" if v is None else f"{v:.1f}"
