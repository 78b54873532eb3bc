// The agent-step workload of benchmarks/agent_step_http.py (native flavour) through this SDK:
// CLIENTS agents loop over one step — read 3 distinct random keys of KEYS in a transaction,
// write one of them with its counter + 1, commit only if all three are unchanged (a refused
// commit is counted, not retried). Then the audit: every key's counter equals the commits
// acknowledged for it.
//
//   node bench/agent-step.mjs [--url URL] [--clients 32] [--keys 1000] [--duration 10] [--shards 2]
//
// Without --url it starts an `oribus up` of its own (as the tests do). Prints one JSON line.
import { parseArgs } from "node:util";

import { connect, Conflict } from "../dist/index.js";
import { startServer } from "../tests/server.mjs";

const { values: opt } = parseArgs({
  options: {
    url: { type: "string" }, clients: { type: "string", default: "32" }, keys: { type: "string", default: "1000" },
    duration: { type: "string", default: "10" }, warmup: { type: "string", default: "2" }, shards: { type: "string", default: "2" },
  },
});
const clients = Number(opt.clients);
const keys = Number(opt.keys);
const server = opt.url ? undefined : await startServer({ shards: Number(opt.shards) });
const url = opt.url ?? server.url;
try {
  const bus = await connect(url, { agent: "bench" });
  const run = Date.now().toString(36);
  const key = (i) => `bench/${run}/k${i}`;
  const acked = new Array(keys).fill(0);
  let measuring = false;
  let stop = false;
  let commits = 0;
  let conflicts = 0;
  const latencies = [];
  let cpu;
  await Promise.all(Array.from({ length: clients }, async (_, c) => {
    const agent = bus.session({ agent: `bench-${c}` });
    while (!stop) {
      const picks = new Set();
      while (picks.size < 3) picks.add(Math.floor(Math.random() * keys));
      const [target] = picks;
      const started = performance.now();
      const tx = agent.transaction();
      const items = await tx.getMany([...picks].map(key));
      tx.put(key(target), (items[key(target)].value ?? 0) + 1);
      try {
        await tx.commit();
        acked[target] += 1;
        if (measuring) {
          commits += 1;
          latencies.push(performance.now() - started);
        }
      } catch (e) {
        if (!(e instanceof Conflict)) throw e;
        if (measuring) conflicts += 1;
      }
    }
  }).concat((async () => {
    await new Promise((r) => setTimeout(r, Number(opt.warmup) * 1000));
    measuring = true;
    cpu = process.cpuUsage();
    await new Promise((r) => setTimeout(r, Number(opt.duration) * 1000));
    measuring = false;
    cpu = process.cpuUsage(cpu);
    stop = true;
  })()));
  const reader = bus.session({ agent: "audit" });
  const wrong = [];
  for (let i = 0; i < keys; i += 500) {
    const got = await reader.getMany(Array.from({ length: Math.min(500, keys - i) }, (_, j) => key(i + j)));
    for (let j = i; j < Math.min(i + 500, keys); j++) {
      if ((got[key(j)].value ?? 0) !== acked[j]) wrong.push(key(j));
    }
  }
  latencies.sort((a, b) => a - b);
  const q = (p) => Math.round(latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] * 10) / 10;
  console.log(JSON.stringify({
    clients, keys, seconds: Number(opt.duration), steps_per_s: Math.round(commits / Number(opt.duration)),
    conflicts, p50_ms: q(0.5), p99_ms: q(0.99),
    client_cpu_s: Math.round((cpu.user + cpu.system) / 1e4) / 100, audit: wrong.length === 0 ? "ok" : `${wrong.length} keys wrong`,
  }));
  await bus.close();
  if (wrong.length) process.exitCode = 1;
} finally {
  await server?.stop();
}
