"""``oribus proxy``: what it costs per LLM request, and how well it finds references.

**Overhead.** The fake provider (``oribus.integrations.proxy.fake_upstream``) runs in a
process of its own; this process runs the client, the proxy and an embedded bus holding
``--keys`` keys. ``--requests`` chat-completions requests are sent one after the other
(each a ``--prompt-chars`` conversation naming two keys), whole and streamed, three ways:
straight to the provider, through the proxy without an agent header (forwarded only),
and through the proxy as an agent (scanned and recorded). Reported per way: latency p50
and p99, and CPU of this process per request (``os.times``, robust to other work on the
machine); the proxy's cost is the difference with the direct way.

**Precision and recall.** A corpus of ``--prompts`` generated prompts over the same keys,
each mixing filler text with, at random: key names (in prose, in backticks, in JSON, at
the end of a sentence), values of current versions pasted (compact, re-indented, a long
document's paragraph), values of older versions pasted (JSON, re-indented, as Python prints it, or cut short
with "..." — which is not found, and counts against recall), and near misses that must
not count (a key with a suffix, in a path or in another namespace, a value with one
figure changed, short values such as ``true``). A found reference is right when its key, and for a pasted value
its version, is the one planted. Reported: precision and recall of names and of values,
and the scan time per prompt.

Usage::

    .venv/bin/python benchmarks/proxy_overhead.py [--requests 400] [--keys 1000] [--prompts 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

import oribus  # noqa: E402
from oribus.integrations.proxy import (  # noqa: E402
    DeliveryRecorder,
    IndexFeed,
    KeyIndex,
    ProxyConfig,
    ProxyServer,
)
from oribus.integrations.proxy.detect import Ref  # noqa: E402

# Prose to fill prompts and values with: 3,000 made-up words of one to four English-like
# syllables, the same on every run (a small vocabulary would repeat windows far more than prose).
_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ea", "ou")] + ["the", "and", "ing"]
_WORDS_RNG = random.Random(1)
WORDS = sorted({"".join(_WORDS_RNG.choice(_SYLLABLES) for _ in range(_WORDS_RNG.randint(1, 4))) for _ in range(3000)})
NOUNS = ["plan", "budget", "schedule", "notes", "owner", "risks", "draft", "status", "review", "scope"]


def filler(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_keys(n: int, rng: random.Random) -> dict[str, list[object]]:
    """key -> its versions' values (oldest first): dicts, sentences, long documents, flags."""
    out: dict[str, list[object]] = {}
    for i in range(n):
        key = f"team-{i // len(NOUNS)}/{NOUNS[i % len(NOUNS)]}"
        kind = i % 4
        versions: list[object] = []
        for v in range(3):
            if kind == 0:
                versions.append({"step": v, "items": [f"{filler(rng, 4)} {i}-{v}" for _ in range(3)],
                                 "owner": f"agent-{i % 7}"})
            elif kind == 1:
                versions.append(f"Figure {i}.{v}: {filler(rng, 12)} total {rng.randint(1000, 99999)} EUR.")
            elif kind == 2:
                versions.append("\n\n".join(f"Section {s}, version {v}. {filler(rng, 30)}" for s in range(6)))
            else:
                versions.append(v % 2 == 0)  # a short value: never fingerprinted
        out[key] = versions
    return out


# ---- precision and recall -------------------------------------------------------------------------


def corpus(keys: dict[str, list[object]], n: int, rng: random.Random) -> list[tuple[str, set[Ref]]]:
    names = list(keys)
    docs = []
    for _ in range(n):
        parts = [filler(rng, rng.randint(20, 80))]
        want: set[Ref] = set()
        for _ in range(rng.randint(0, 3)):  # names
            k = rng.choice(names)
            form = rng.choice(["see {k} now", "`{k}`", '{{"key": "{k}"}}', "ends with {k}.", "({k})",
                               "**{k}**", "{k}'s owner", "{k}: done"])
            parts.append(form.format(k=k))
            want.add(Ref(k, len(keys[k]), "name"))
        for _ in range(rng.randint(0, 2)):  # pasted values, current or older
            k = rng.choice(names)
            version = rng.choice([len(keys[k]), len(keys[k]), 1])
            value = keys[k][version - 1]
            if isinstance(value, bool):
                parts.append(json.dumps(value))  # not findable, and not planted as findable
                continue
            if isinstance(value, str) and "\n\n" in value:
                text = value.split("\n\n")[rng.randrange(6)]  # one paragraph of a long document
                if len(text) < 160:
                    continue
            elif isinstance(value, str):
                text = value
            else:
                text = rng.choice([json.dumps(value), json.dumps(value, indent=2), str(value),
                                   json.dumps(value)[:len(json.dumps(value)) * 2 // 3] + " ..."])  # cut short
            parts.append(text)
            want.add(Ref(k, version, "value"))
        for _ in range(rng.randint(0, 3)):  # near misses
            k = rng.choice(names)
            miss = rng.choice([k + "s", k + "2", "x" + k, k.replace("team-", "team_"), k.split("/")[1],
                               f"docs/{k}.md", f"{k}/draft-9"])
            if miss in keys:
                continue
            parts.append(f"not {miss} though")
            value = keys[k][-1]
            if isinstance(value, str) and "\n\n" not in value:
                parts.append(value.replace("total ", "total 1"))  # one figure changed
        rng.shuffle(parts)
        docs.append(("\n".join(parts), want))
    return docs


def detection(keys: dict[str, list[object]], prompts: int, seed: int) -> dict:
    rng = random.Random(seed + 1)  # not the keys' seed: the prompts' filler would repeat their values
    index = KeyIndex()
    for k, versions in keys.items():
        for v, value in enumerate(versions, 1):
            index.put(k, v, value)
    docs = corpus(keys, prompts, rng)
    tp = {"name": 0, "value": 0}
    fp = {"name": 0, "value": 0}
    fn = {"name": 0, "value": 0}
    chars = 0
    start = time.process_time()
    found_all = [index.find([text]) for text, _ in docs]
    cpu = time.process_time() - start
    for (text, want), found in zip(docs, found_all, strict=True):
        chars += len(text)
        got = set(found)
        for how in ("name", "value"):
            w = {r for r in want if r.how == how}
            g = {r for r in got if r.how == how}
            tp[how] += len(w & g)
            fp[how] += len(g - w)
            fn[how] += len(w - g)
    out = {}
    for how in ("name", "value"):
        p = tp[how] / (tp[how] + fp[how]) if tp[how] + fp[how] else 1.0
        r = tp[how] / (tp[how] + fn[how]) if tp[how] + fn[how] else 1.0
        out[how] = {"precision": round(p, 4), "recall": round(r, 4), "tp": tp[how], "fp": fp[how], "fn": fn[how]}
    out["scan_us_per_prompt"] = round(cpu / len(docs) * 1e6, 1)
    out["mean_prompt_chars"] = chars // len(docs)
    return out


# ---- overhead ---------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def overhead(keys: dict[str, list[object]], requests: int, prompt_chars: int, seed: int) -> dict:
    rng = random.Random(seed + 2)
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "oribus.integrations.proxy.fake_upstream", "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        fake.stdout.readline()  # its banner: listening
        upstream = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            async with oribus.open_local(Path(tmp) / "data", shards=2, agent="bench", unsafe_no_fsync=True) as bus:
                names = list(keys)
                for i in range(0, len(names), 500):
                    await bus.commit({k: keys[k][-1] for k in names[i:i + 500]})
                index = KeyIndex()
                feed = IndexFeed(bus, index)
                await feed.start(wait=30)
                recorder = DeliveryRecorder(bus)
                async with ProxyServer(ProxyConfig(upstream, port=0), index, recorder) as proxy, \
                        aiohttp.ClientSession() as http:
                    via = f"http://127.0.0.1:{proxy.port}"
                    out: dict = {"keys_indexed": len(index)}
                    for stream in (False, True):
                        for way, base, agent in (("direct", upstream, None), ("proxy, forward only", via, None),
                                                 ("proxy, scan and record", via, "bench-agent")):
                            out[f"{'stream' if stream else 'whole'}: {way}"] = await _run(
                                http, base, agent, stream, requests, prompt_chars, names, rng)
                    out["recorder"] = recorder.counters.as_dict()
                await recorder.close()
                await feed.close()
                return out
    finally:
        fake.terminate()
        fake.wait()


async def _run(http: aiohttp.ClientSession, base: str, agent: str | None, stream: bool, n: int,
               prompt_chars: int, names: list[str], rng: random.Random) -> dict:
    headers = {"Content-Type": "application/json", "X-Fake-Reply": f"Next, update {names[0]} and keep it short."}
    if agent:
        headers["X-Oribus-Agent"] = agent
    lat: list[float] = []
    for i in range(n + 20):  # the first 20 warm up
        history = filler(rng, prompt_chars // 6)[:prompt_chars]
        body = json.dumps({"model": "m", "stream": stream, "messages": [
            {"role": "system", "content": "You plan."},
            {"role": "user", "content": f"{history} Look at {rng.choice(names)} and {rng.choice(names)}."}]})
        if i == 20:
            cpu0, wall0 = os.times(), time.perf_counter()
        t = time.perf_counter()
        async with http.post(f"{base}/v1/chat/completions", data=body, headers=headers) as resp:
            await resp.read()
            assert resp.status == 200, resp.status
        if i >= 20:
            lat.append(time.perf_counter() - t)
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    lat.sort()
    return {"p50_ms": round(statistics.median(lat) * 1e3, 3), "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1e3, 3),
            "cpu_us_per_request": round(cpu / n * 1e6), "wall_s": round(time.perf_counter() - wall0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--prompt-chars", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    keys = make_keys(args.keys, random.Random(args.seed))
    result = {"detection": detection(keys, args.prompts, args.seed),
              "overhead": asyncio.run(overhead(keys, args.requests, args.prompt_chars, args.seed))}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    d = result["detection"]
    print(f"detection over {args.prompts} prompts ({d['mean_prompt_chars']} chars on average), {args.keys} keys:")
    for how in ("name", "value"):
        print(f"  by {how:5}: precision {d[how]['precision']:.4f}  recall {d[how]['recall']:.4f}  "
              f"(tp {d[how]['tp']}, fp {d[how]['fp']}, fn {d[how]['fn']})")
    print(f"  scan: {d['scan_us_per_prompt']} us of CPU per prompt")
    o = result["overhead"]
    print(f"overhead, {args.requests} sequential chat-completions requests of ~{args.prompt_chars} chars:")
    for way, r in o.items():
        if isinstance(r, dict) and "p50_ms" in r:
            print(f"  {way:32} p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
                  f"CPU {r['cpu_us_per_request']:6} us/request")
    print(f"  recorder: {o['recorder']}")


if __name__ == "__main__":
    main()
