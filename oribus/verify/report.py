"""What a verify run prints and writes: the summary, ``report.json`` and ``report.html``.

The time series come from the history itself (every event carries the wall-clock
``time`` the recorder saw it): per second of the run, the transactions that
completed, committed, were refused by a conflict, or ended unknown, and the
median and 99th-percentile latency of those that committed (invoke to ok).
The HTML page is self-contained: inline SVG, no script, nothing fetched.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from oribus.checker import Report

CONFLICT_CODES = ("Conflict", "Aborted", "VersionMismatch", "CrossShardStale", "TokenConflict")


def series(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per second since the first event: completed, ok, conflict, other refusals, unknown, p50/p99 ms."""
    starts: dict[int, float] = {}
    t0: float | None = None
    buckets: dict[int, dict[str, Any]] = {}
    for ev in events:
        if ev["type"] == "final" or "time" not in ev:
            continue
        t = float(ev["time"])
        t0 = t if t0 is None else t0
        if ev["type"] == "invoke":
            starts[ev["id"]] = t
            continue
        second = int(t - t0)
        b = buckets.setdefault(second, {"second": second, "ok": 0, "conflict": 0, "refused": 0, "unknown": 0,
                                        "latencies": []})
        if ev["type"] == "ok":
            b["ok"] += 1
            if ev["id"] in starts:
                b["latencies"].append((t - starts[ev["id"]]) * 1000)
        elif ev["type"] == "fail":
            b["conflict" if ev.get("error") in CONFLICT_CODES else "refused"] += 1
        else:
            b["unknown"] += 1
    out = []
    for second in range(max(buckets) + 1 if buckets else 0):
        b = buckets.get(second, {"second": second, "ok": 0, "conflict": 0, "refused": 0, "unknown": 0,
                                 "latencies": []})
        lat = sorted(b.pop("latencies"))
        b["p50_ms"] = round(_quantile(lat, 0.5), 2) if lat else None
        b["p99_ms"] = round(_quantile(lat, 0.99), 2) if lat else None
        out.append(b)
    return out


def _quantile(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)] if values else 0.0


def _short(value: Any) -> str:
    """A value for one line: a long list shows its ends and its length."""
    if isinstance(value, list) and len(value) > 6:
        head = ",".join(json.dumps(v) for v in value[:2])
        tail = ",".join(json.dumps(v) for v in value[-2:])
        return f"[{head},...({len(value)} elements)...,{tail}]"
    return json.dumps(value, separators=(",", ":"))


def _describe_txn(t: Mapping[str, Any]) -> str:
    ops = []
    for op in t.get("ops", []):
        f, key, arg = op[0], op[1], op[2]
        version = f" @v{op[3]}" if len(op) > 3 and op[3] is not None else ""
        ops.append(f"{f} {key} {_short(arg)}{version}")
    return f"txn {t.get('id')} ({t.get('process')}, {t.get('outcome')}, commit {t.get('commit_id')}): " + "; ".join(ops)


def summary(report: Report, info: Mapping[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    c = report.counts
    lines = [
        f"oribus verify {info['run_id']}: {info['target']}, workload {info['workload']}, "
        f"{info['clients']} clients, {info['keys']} keys per workload, seed {info['seed']}, "
        f"{info['elapsed']:.1f}s",
        f"transactions: {c.get('transactions', 0)}   committed: {c.get('ok', 0)}   "
        f"refused: {c.get('fail', 0)}   unknown outcome: {c.get('info', 0)} "
        f"({c.get('info_committed', 0)} of them found committed)",
        f"checked: {c.get('committed', 0)} committed transactions over {c.get('keys', 0)} keys, "
        f"{c.get('edges', 0)} dependency edges",
    ]
    if info.get("nemesis"):
        lines.append(f"nemesis: {info['nemesis']}")
    if report.ok:
        lines.append("anomalies: none")
    else:
        kinds = ", ".join(f"{k} x{n}" for k, n in report.by_kind().items())
        lines.append(f"anomalies: {len(report.anomalies)} ({kinds})")
        for kind, a in sorted(report.examples().items()):
            lines.append(f"  {kind} [{a.category}]: {a.message}")
            for t in a.ops[:4]:
                lines.append(f"    {_describe_txn(t)}")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


def to_json(report: Report, info: Mapping[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **info,
        "ok": report.ok,
        "counts": report.counts,
        "by_kind": report.by_kind(),
        "examples": {k: a.to_dict() for k, a in sorted(report.examples().items())},
        "anomalies": [a.to_dict() for a in report.anomalies],
        "notes": report.notes,
        "series": points,
    }


# ---- HTML --------------------------------------------------------------------------------

_COLOURS = ("#2b6cb0", "#c53030", "#b7791f", "#6b46c1", "#2f855a")


def svg_chart(title: str, xs: Sequence[float], lines: Mapping[str, Sequence[float | None]], unit: str,
              width: int = 720, height: int = 220) -> str:
    """A line chart as inline SVG: one polyline per named series over ``xs`` (None: no point)."""
    pad_l, pad_r, pad_t, pad_b = 56, 12, 28, 28
    values = [v for ys in lines.values() for v in ys if v is not None]
    top = max(values) if values else 1.0
    top = top if top > 0 else 1.0
    x_max = max(xs) if xs and max(xs) > 0 else 1.0

    def sx(x: float) -> float:
        return pad_l + (width - pad_l - pad_r) * x / x_max

    def sy(y: float) -> float:
        return height - pad_b - (height - pad_t - pad_b) * y / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{pad_l}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#888"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#888"/>',
             f'<text x="4" y="{pad_t + 4}" font-size="11">{top:.4g} {html.escape(unit)}</text>',
             f'<text x="4" y="{height - pad_b}" font-size="11">0</text>',
             f'<text x="{width - pad_r - 40}" y="{height - 8}" font-size="11">{x_max:.0f} s</text>']
    for n, (name, ys) in enumerate(lines.items()):
        colour = _COLOURS[n % len(_COLOURS)]
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=True) if y is not None)
        if points:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
        parts.append(f'<text x="{pad_l + 10 + 110 * n}" y="{pad_t + 12}" font-size="11" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(data: Mapping[str, Any]) -> str:
    points = data["series"]
    xs = [p["second"] for p in points]
    latency = svg_chart("Latency of committed transactions", xs,
                        {"p50": [p["p50_ms"] for p in points], "p99": [p["p99_ms"] for p in points]}, "ms")
    rates = svg_chart("Outcomes per second", xs,
                      {"committed": [p["ok"] for p in points], "conflicts": [p["conflict"] for p in points],
                       "other refusals": [p["refused"] for p in points],
                       "unknown": [p["unknown"] for p in points]}, "/s")
    c = data["counts"]
    verdict = ("no anomalies" if data["ok"] else
               f"{len(data['anomalies'])} anomalies: " + ", ".join(f"{k} x{n}" for k, n in data["by_kind"].items()))
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(a['category'])}</td><td>{html.escape(a['message'])}"
        f"</td><td><pre>{html.escape(chr(10).join(_describe_txn(t) for t in a['ops'][:4]))}</pre></td></tr>"
        for k, a in data["examples"].items())
    anomalies = (f"<table><tr><th>kind</th><th>class</th><th>example</th><th>transactions</th></tr>{rows}</table>"
                 if rows else "<p>None found.</p>")
    nemesis = "".join(f"<li>{e['at']:.1f}s {html.escape(e['fault'])} {html.escape(str(e['target']))} "
                      f"{html.escape(e.get('detail', ''))}</li>" for e in data.get("nemesis_events", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>oribus verify {html.escape(data['run_id'])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}}pre{{margin:0;white-space:pre-wrap}}
.bad{{color:#c53030}}.good{{color:#2f855a}}</style></head><body>
<h1>oribus verify {html.escape(data['run_id'])}</h1>
<p>{html.escape(data['target'])} &middot; workload {html.escape(data['workload'])} &middot; {data['clients']} clients
&middot; seed {data['seed']} &middot; {data['elapsed']:.1f}s</p>
<h2 class="{'good' if data['ok'] else 'bad'}">{html.escape(verdict)}</h2>
<p>{c.get('transactions', 0)} transactions: {c.get('ok', 0)} committed, {c.get('fail', 0)} refused,
{c.get('info', 0)} unknown ({c.get('info_committed', 0)} of them found committed);
{c.get('edges', 0)} dependency edges over {c.get('keys', 0)} keys.</p>
{latency}
{rates}
<h2>Anomalies (one minimal example per kind)</h2>
{anomalies}
{'<h2>Nemesis</h2><ul>' + nemesis + '</ul>' if nemesis else ''}
</body></html>
"""
