// kill -9 of the server mid-traffic, restarted on the same data directory: no acknowledged
// commit lost, none applied twice; a watch resumes over the broken connection and misses nothing.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { connect, Unavailable } from "../dist/index.js";
import { startServer } from "./server.mjs";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let server;
const servers = [];

before(async () => {
  server = await startServer({ shards: 2 });
  servers.push(server);
});

after(async () => {
  for (const s of servers) await s.stop();
});

// Outlive a restart: a run keeps retrying (and settling unknown outcomes) for tens of seconds.
const PATIENT = { retries: 200, baseDelay: 5, maxDelay: 500 };

// Agents append unique elements to three lists (and count them) in run() transactions while
// the server is killed by `crash`, then restarted on the same data directory.
async function trafficThroughACrash(server, crash) {
  const bus = await connect(server.url, { agent: "crash", timeout: 5000 });
  const workers = 6;
  const acked = new Set();
  const unknown = new Set();
  let stop = false;
  let killed = false;
  let ackedAfterRestart = 0;
  const work = Array.from({ length: workers }, async (_, w) => {
    const agent = bus.session({ agent: `crash-${w}` });
    for (let n = 0; !stop; n++) {
      const element = w * 1_000_000 + n;
      const key = `log/${n % 3}`;
      try {
        await agent.run(async (tx) => {
          const cur = await tx.get(key);
          const count = await tx.get(`count/${w}`);
          tx.put(key, [...(cur.value ?? []), element]);
          tx.put(`count/${w}`, (count.value ?? 0) + 1);
        }, PATIENT);
        acked.add(element);
        if (killed && server.running) ackedAfterRestart += 1;
      } catch (e) {
        if (!(e instanceof Unavailable)) throw e;
        unknown.add(element); // its outcome is unknown: it may or may not be there
      }
    }
  });
  await crash();
  const before = acked.size;
  killed = true;
  await sleep(300);
  await server.start();
  for (let i = 0; i < 300 && ackedAfterRestart < 60; i++) await sleep(100);
  stop = true;
  await Promise.all(work);
  console.log(`# ${before} commits before the crash, ${acked.size} acknowledged, ${unknown.size} unknown`);
  assert.ok(before > 10, `traffic before the crash: ${before} commits`);
  assert.ok(ackedAfterRestart >= 60, `traffic after the restart: ${ackedAfterRestart} commits`);

  const check = bus.session({ agent: "checker" });
  const logs = await check.getMany(["log/0", "log/1", "log/2"]);
  const all = Object.values(logs).flatMap((i) => i.value ?? []);
  assert.equal(new Set(all).size, all.length, "an element appended twice: a commit applied twice");
  const present = new Set(all);
  const lost = [...acked].filter((e) => !present.has(e));
  assert.deepEqual(lost, [], "acknowledged commits lost");
  for (const e of present) assert.ok(acked.has(e) || unknown.has(e), `element ${e} was never committed`);
  // each commit appended one element and counted it: the counts agree with the lists
  const counts = await check.getMany(Array.from({ length: workers }, (_, w) => `count/${w}`));
  const counted = Object.values(counts).reduce((sum, i) => sum + (i.value ?? 0), 0);
  assert.equal(counted, all.length);
  await bus.close();
}

test("kill -9 mid-traffic loses no acknowledged commit and duplicates none", async () => {
  await trafficThroughACrash(server, async () => {
    await sleep(1500);
    await server.kill9();
  });
});

test("a crash right after a commit is durable, before it is answered: the retry with its commit id applies it once", async () => {
  // SIGKILL of itself right after the 150th fsync: the commits of that fsync are durable, unanswered
  const crashing = await startServer({ shards: 2, env: { ORIBUS_FAILPOINTS: "wal.after_fsync=kill@150" } });
  servers.push(crashing);
  await trafficThroughACrash(crashing, async () => {
    assert.ok(await crashing.waitExit(60_000), "the failpoint never fired");
    assert.equal(crashing.proc.signalCode, "SIGKILL");
  });
});

test("a watch resumes after the server's connection drops, every change in order, each once", async () => {
  const bus = await connect(server.url, { agent: "watcher", timeout: 5000 });
  const writer = bus.session({ agent: "watched-writer" });
  const watch = bus.watch("wr/");
  await watch.start();
  const seen = [];
  let expected = Infinity;
  let allSeen;
  const done = new Promise((resolve) => { allSeen = resolve; });
  const collect = (async () => {
    for await (const ch of watch) {
      seen.push(ch);
      if (seen.length >= expected) allSeen();
    }
  })();
  let commits = 0;
  const write = async (n) => {
    for (let i = 0; i < n; i++) {
      await writer.run(async (tx) => {
        const key = `wr/${i % 4}`;
        const cur = await tx.get(key);
        tx.put(key, (cur.value ?? 0) + 1);
      }, PATIENT);
      commits += 1;
    }
  };
  await write(40);
  await server.kill9(); // the watch's connection drops with it, some changes maybe not yet sent
  await sleep(300);
  await server.start();
  await write(40);
  expected = commits;
  if (seen.length >= expected) allSeen();
  const timer = setTimeout(allSeen, 30_000);
  await done;
  clearTimeout(timer);
  await sleep(500); // nothing more may come: a change delivered twice would show here
  watch.close();
  await collect;
  assert.ok(watch.reconnects >= 1, "the watch never had to reconnect");
  assert.equal(seen.length, 80);
  const byKey = new Map();
  for (const ch of seen) byKey.set(ch.key, [...(byKey.get(ch.key) ?? []), ch.version]);
  for (const [key, versions] of byKey) {
    assert.deepEqual(versions, versions.map((_, i) => i + 1), key);
    assert.equal(versions.at(-1), (await writer.get(key)).version);
  }
  await bus.close();
});
