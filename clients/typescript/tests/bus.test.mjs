// Against a real `oribus up --shards 2`: concurrent run() increments, cross-shard stale reads,
// watch order, typed errors for bad input.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  connect, Conflict, DELETE, HistoryTruncated, InvalidRequest, SessionExpired, Unavailable, ValueTooLarge,
} from "../dist/index.js";
import { freePort, startServer } from "./server.mjs";

let server;
let bus;

before(async () => {
  server = await startServer({ shards: 2 });
  bus = await connect(server.url, { agent: "ts-test" });
});

after(async () => {
  await bus?.close();
  await server?.stop();
});

// Two keys on different shards: a read's `seqs` names the shards it was delivered from.
async function keysOnTwoShards(prefix) {
  const reader = bus.session({ agent: "locator" });
  const byShard = new Map();
  for (let i = 0; byShard.size < 2; i++) {
    const key = `${prefix}${i}`;
    const reply = await reader.read([key]);
    const [shard] = Object.keys(reply.seqs);
    if (!byShard.has(shard)) byShard.set(shard, key);
  }
  return [...byShard.values()];
}

test("16 concurrent run() increments x 50 end at 800", async () => {
  const agents = Array.from({ length: 16 }, (_, i) => bus.session({ agent: `inc-${i}` }));
  await Promise.all(agents.map(async (agent) => {
    for (let n = 0; n < 50; n++) {
      await agent.run(async (tx) => {
        const c = await tx.get("counter");
        tx.put("counter", (c.value ?? 0) + 1);
      }, { retries: 200, maxDelay: 50 });
    }
  }));
  const final = await bus.get("counter");
  assert.equal(final.value, 800);
  assert.equal(final.version, 800);
  // the kept history (the last 100 versions): each increment of the one before, by its own commit
  const history = await bus.history("counter");
  assert.equal(history.length, 100);
  assert.deepEqual(history.map((v) => v.value), history.map((_, i) => 800 - i));
  assert.equal(new Set(history.map((v) => v.commitId)).size, 100);
});

test("a stale read on another shard refuses the commit, in session and transaction scope", async () => {
  const [a, b] = await keysOnTwoShards("xs-");
  const writer = bus.session({ agent: "writer" });
  await writer.commit({ [a]: "a0", [b]: "b0" });

  const planner = bus.session({ agent: "planner" });
  const seen = await planner.getMany([a, b]);
  assert.deepEqual([seen[a].version, seen[b].version], [1, 1]);
  await writer.put(b, "b1"); // b changes on the other shard
  await assert.rejects(planner.commit({ [a]: "from a stale b" }), (e) => {
    assert.ok(e instanceof Conflict, String(e));
    assert.deepEqual(e.stale, [{ key: b, version: 1, current: 2, reason: "stale_read" }]);
    assert.equal(e.status, 409);
    return true;
  });
  assert.equal((await writer.get(a)).value, "a0", "the refused commit wrote nothing");

  const tx = planner.transaction();
  await tx.get(a);
  await tx.get(b);
  await writer.put(b, "b2");
  tx.put(a, "from a stale b again");
  await assert.rejects(tx.commit(), (e) => e instanceof Conflict && e.stale.some((s) => s.key === b));
  assert.equal((await writer.get(a)).version, 1);

  // once it re-reads, the same work commits
  await planner.forget([a, b]);
  const ok = await planner.transaction(async (t) => {
    const got = await t.getMany([a, b]);
    t.put(a, `${got[b].value} seen`);
    return got[b].version;
  });
  assert.equal(ok, 3);
  assert.equal((await writer.get(a)).value, "b2 seen");
});

test("commit with expect, delete, rollback and history", async () => {
  const s = bus.session({ agent: "versions" });
  const v1 = await s.put("doc", { title: "one" });
  const v2 = await s.put("doc", { title: "two" }, { expect: v1 });
  assert.equal(v2, v1 + 1);
  await assert.rejects(s.put("doc", { title: "three" }, { expect: v1 }), (e) =>
    e instanceof Conflict && e.stale[0].reason === "expected_version");
  const back = await s.rollback({ doc: v1 });
  assert.equal(back.doc, v2 + 1);
  assert.deepEqual((await s.get("doc")).value, { title: "one" });
  await s.delete("doc");
  const gone = await s.get("doc");
  assert.equal(gone.value, null);
  const history = await s.history("doc");
  assert.deepEqual(history.map((v) => v.version), [4, 3, 2, 1]);
  assert.equal(history[0].deleted, true);
  assert.deepEqual(history[2].value, { title: "two" });
  assert.equal(history[1].agent, "versions");
  await s.commit({ "doc": DELETE, "doc2": new Uint8Array([1, 2]) });
  assert.deepEqual((await s.get("doc2")).value, new Uint8Array([1, 2]));
});

test("watch delivers every change in order, each once", async () => {
  const watch = bus.watch("w/");
  await watch.start();
  const writers = Array.from({ length: 4 }, (_, i) => bus.session({ agent: `w-${i}` }));
  const total = 4 * 25;
  const seen = [];
  const collect = (async () => {
    for await (const ch of watch) {
      seen.push(ch);
      if (seen.length === total) break;
    }
  })();
  await Promise.all(writers.map(async (w) => {
    for (let n = 0; n < 25; n++) {
      await w.run(async (tx) => {
        const key = `w/${n % 3}`;
        const cur = await tx.get(key);
        tx.put(key, [...(cur.value ?? []), `${w.agent}:${n}`]);
      }, { retries: 200, maxDelay: 50 });
    }
  }));
  await collect;
  const byKey = new Map();
  for (const ch of seen) byKey.set(ch.key, [...(byKey.get(ch.key) ?? []), ch]);
  for (const [key, changes] of byKey) {
    assert.deepEqual(changes.map((c) => c.version), changes.map((_, i) => i + 1), key);
    const current = await bus.get(key);
    assert.equal(changes.length, current.version);
    assert.deepEqual(changes.at(-1).value, current.value);
    for (let i = 1; i < changes.length; i++) {
      assert.deepEqual(changes[i].value.slice(0, -1), changes[i - 1].value, "each change appends to the one before");
    }
  }
  // a replay from version 0 gives the same changes
  const replay = [];
  for await (const ch of bus.watch("w/", { fromVersion: 0 })) {
    replay.push(ch);
    if (replay.length === total) break;
  }
  const order = (l) => l.map((c) => `${c.key}@${c.version}`).sort();
  assert.deepEqual(order(replay), order(seen));
});

test("bad input gets the typed error and changes nothing", async () => {
  await assert.rejects(connect("not a url", { agent: "x" }), InvalidRequest);
  await assert.rejects(connect(server.url, { agent: "" }), InvalidRequest);
  await assert.rejects(connect(server.url, {}), InvalidRequest);
  await assert.rejects(bus.put("", 1), InvalidRequest);
  await assert.rejects(bus.put("k", undefined), InvalidRequest);
  await assert.rejects(bus.commit({ k: NaN }), InvalidRequest);
  await assert.rejects(bus.commit("k=1"), InvalidRequest);
  await assert.rejects(bus.commit({ k: 1 }, { expect: { k: -1 } }), InvalidRequest);
  await assert.rejects(bus.rollback({}), InvalidRequest);
  await assert.rejects(bus.get(42), InvalidRequest);
  assert.throws(() => bus.watch("", { fromVersion: -1 }), InvalidRequest);
  // refused by the bus itself
  await assert.rejects(bus.put(".sbus/k", 1), (e) => e instanceof InvalidRequest && e.status === 400 && /\.sbus/.test(e.message));
  await assert.rejects(bus.put("big", "x".repeat(2 << 20)), (e) => e instanceof ValueTooLarge && e.status === 413);
  await bus.put("small", 1);
  await assert.rejects(bus.rollback({ small: 99 }), (e) => e instanceof InvalidRequest && e.status === 400);
  await assert.rejects(bus.history("small", { limit: "many" }), InvalidRequest);
  const tx = bus.transaction();
  assert.throws(() => tx.put("k", Symbol("s")), InvalidRequest);
  await tx.commit();
  await assert.rejects(tx.commit(), InvalidRequest);
  assert.equal((await bus.get("small")).version, 1);
  assert.equal((await bus.get("k")).version, 0);
  assert.equal((await bus.get(".sbus/k")).version, 0);
  assert.equal((await bus.get("big")).version, 0);

  // a session reset by someone without its token: its next commit fails closed, once
  const owner = bus.session({ agent: "owned" });
  await owner.get("small");
  const intruder = owner.session({ session: owner.sessionId }); // same session, no token
  await intruder.resetSession();
  await assert.rejects(owner.put("small", 2), (e) => e instanceof SessionExpired && e.status === 410);
  assert.equal(await owner.put("small", 2), 2);

  // a watch from a version older than the kept history (the last 100 versions)
  const long = bus.session({ agent: "long" });
  for (let i = 0; i < 102; i++) await long.put("long/history", i);
  const truncated = bus.watch("long/", { fromVersion: 0 });
  await assert.rejects(truncated.start(), (e) => e instanceof HistoryTruncated && e.status === 410);
  const stats = await bus.stats();
  assert.ok(stats.shards);

  // strict: a blind write (a key neither read nor expected) is refused
  const strict = await connect(server.url, { agent: "strict", strict: true });
  const blind = (e) => e instanceof Conflict && e.stale[0].key === "blind" && e.stale[0].reason === "blind_write";
  await assert.rejects(strict.put("blind", 1), blind);
  await assert.rejects(strict.transaction(async (tx) => tx.put("blind", 1)), blind);
  await strict.get("blind");
  assert.equal(await strict.put("blind", 1), 1);

  // nobody listening
  const nowhere = `http://127.0.0.1:${await freePort()}`;
  await assert.rejects(connect(nowhere, { agent: "x", timeout: 2000 }), Unavailable);
  const closed = await connect(server.url, { agent: "closing" });
  await closed.close();
  await assert.rejects(closed.get("small"), InvalidRequest);
});

test("a commit whose answer is lost is sent again with its commit id and applied once", async () => {
  const sent = [];
  let lose = 1; // the first commit reaches the bus, which applies it; its answer never arrives
  const lossy = async (url, init) => {
    const response = await fetch(url, init);
    if (String(url).endsWith("/v1/commit")) {
      sent.push(JSON.parse(init.body).commit_id);
      if (lose-- > 0) {
        await response.arrayBuffer();
        throw new TypeError("fetch failed (the connection dropped after the request was sent)");
      }
    }
    return response;
  };
  const agent = await connect(server.url, { agent: "lossy", fetch: lossy });
  assert.equal(await agent.put("lossy/once", "v"), 1);
  assert.equal(sent.length, 2);
  assert.equal(sent[0], sent[1], "the retry used another commit id");
  const history = await agent.history("lossy/once");
  assert.deepEqual(history.map((v) => [v.version, v.commitId]), [[1, sent[0]]]);

  // run(): the answer of its transaction's commit is lost on every resend of the same-id
  // retries, then settles: still applied once, and run returns fn's result
  lose = 4;
  sent.length = 0;
  const result = await agent.run(async (tx) => {
    const cur = await tx.get("lossy/counter");
    tx.put("lossy/counter", (cur.value ?? 0) + 1);
    return "ran";
  });
  assert.equal(result, "ran");
  assert.ok(sent.length >= 5 && sent.every((id) => id === sent[0]), sent.join(" "));
  assert.deepEqual(await agent.get("lossy/counter"), { key: "lossy/counter", value: 1, version: 1 });
});

test("close() or an aborted signal ends a watch that waits for changes", async () => {
  const watch = bus.watch("quiet/");
  await watch.start();
  const ended = (async () => {
    for await (const ch of watch) assert.fail(`no change was made: ${ch.key}`);
    return "ended";
  })();
  setTimeout(() => watch.close(), 50);
  assert.equal(await ended, "ended");

  const controller = new AbortController();
  const aborted = bus.watch("quiet/", { signal: controller.signal });
  const seen = [];
  const done = (async () => {
    for await (const ch of aborted) {
      seen.push(ch.version);
      controller.abort();
    }
  })();
  await aborted.start();
  await bus.session({ agent: "quiet" }).put("quiet/k", 1);
  await done;
  assert.deepEqual(seen, [1]);
});
