// The list-append workload of oribus/checker/listappend.py, run by TypeScript agents, for a
// history recorded by a Python test (tests/e2e/test_typescript_sdk.py).
//
//   node list_append_agent.mjs URL CLIENTS TXNS SEED
//
// Each client is a session of its own; a transaction reads keys and appends unique elements
// ((100 + client + 1) * 1,000,000 + counter) to the lists at keys la/k0..la/k7, in transaction
// scope, as the Python workload does. Before a transaction starts, the agent asks the recorder
// for its id (stdout: {"t": "invoke", "req", "session", "ops"}; stdin: "REQ TID"), so its invoke
// is recorded before the transaction begins; its completion is reported after it ended
// (stdout: {"t": "ok" | "fail" | "info", "tid", ...}). Both keep the recorder's line order a
// real-time order.
import { createInterface } from "node:readline";

import { Conflict, connect, InvalidRequest, OribusError, SessionExpired } from "../dist/index.js";

const [url, clients, txns, seed] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4]), Number(process.argv[5])];
const KEYS = Array.from({ length: 8 }, (_, i) => `la/k${i}`);
const STRIDE = 1_000_000;
const FIRST_CLIENT = 100;

const pending = new Map();
let nextReq = 0;
createInterface({ input: process.stdin }).on("line", (line) => {
  const [req, tid] = line.trim().split(/\s+/).map(Number);
  pending.get(req)?.(tid);
  pending.delete(req);
});

function say(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

function invoke(session, ops) {
  const req = nextReq++;
  return new Promise((resolve) => {
    pending.set(req, resolve);
    say({ t: "invoke", req, session: [session.agent, session.sessionId], ops });
  });
}

// A small seeded generator (mulberry32): each run plans the same transactions.
function random(seedText) {
  let a = [...seedText].reduce((h, c) => Math.imul(h ^ c.charCodeAt(0), 2654435761) >>> 0, 1779033703);
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function plan(rng, nextElement) {
  const ops = [];
  const read = new Set();
  const appended = new Set();
  const n = 1 + Math.floor(rng() * 4);
  for (let i = 0; i < n; i++) {
    const key = KEYS[Math.floor(rng() * KEYS.length)];
    if (rng() < 0.5) {
      if (read.has(key) || appended.has(key)) continue;
      ops.push(["r", key, null]);
      read.add(key);
    } else {
      if (!read.has(key) && !appended.has(key)) {
        ops.push(["r", key, null]);
        read.add(key);
      }
      ops.push(["append", key, nextElement()]);
      appended.add(key);
    }
  }
  return ops;
}

async function runOne(session, ops) {
  const tid = await invoke(session, ops);
  const tx = session.transaction();
  const results = [];
  const lists = {};
  try {
    for (const [f, key, arg] of ops) {
      if (f === "r") {
        const item = await tx.get(key);
        lists[key] = Array.isArray(item.value) ? item.value : [];
        results.push(["r", key, item.value, item.version]);
      } else {
        lists[key] = [...lists[key], arg];
        tx.put(key, lists[key]);
        results.push(["append", key, arg, null]);
      }
    }
    const versions = await tx.commit();
    for (const op of results) if (op[0] === "append") op[3] = versions[op[1]] ?? null;
    say({ t: "ok", tid, ops: results, commit_id: tx.commitId });
    return "ok";
  } catch (e) {
    if (!(e instanceof OribusError)) {
      say({ t: "info", tid, error: String(e), commit_id: tx.sent ? tx.commitId : null });
      throw e;
    }
    const definite = !tx.sent || e instanceof Conflict || e instanceof SessionExpired || e instanceof InvalidRequest;
    say({ t: definite ? "fail" : "info", tid, error: e.code, commit_id: tx.commitId });
    if (e instanceof SessionExpired) await session.resetSession().catch(() => undefined);
    return definite ? "fail" : "info";
  }
}

const bus = await connect(url, { agent: "ts-agent" });
const outcomes = { ok: 0, fail: 0, info: 0 };
await Promise.all(Array.from({ length: clients }, async (_, i) => {
  const index = FIRST_CLIENT + i;
  const session = bus.session({ agent: `ts-${i}` });
  const rng = random(`${seed}/${index}`);
  let counter = 0;
  for (let n = 0; n < txns; n++) {
    outcomes[await runOne(session, plan(rng, () => (index + 1) * STRIDE + ++counter))] += 1;
  }
}));
say({ t: "done", outcomes });
await bus.close();
process.exit(0);
