// Two agents share a plan through oribus, offline (no model, no network beyond the bus):
// a planner writes the plan and revises it as results come in; a worker claims steps, does
// them and reports. The worker "thinks" between reading the plan and claiming a step, as an
// LLM call would; when the planner revised the plan meanwhile, the bus refuses the claim
// (Conflict: the worker's context is stale) and the worker reads the plan again.
//
//   oribus up                                   # in another terminal (HTTP on 127.0.0.1:7780)
//   node examples/plan-agents.mjs [URL [THINK_MS]]   # after `npm run build` in clients/typescript
//
// The last line printed is a JSON summary: {"steps", "done", "conflicts"}.
import { connect, Conflict } from "../dist/index.js";

const url = process.argv[2] ?? process.env.ORIBUS_URL ?? "http://127.0.0.1:7780";
// how long the worker thinks about a step (default 200 ms): the planner's revision lands in
// that window, which is what makes the bus refuse the worker's stale claim
const THINK_MS = Number(process.argv[3] ?? 200);
const run = Date.now().toString(36); // keys of this run: the example can run again on the same bus
const PLAN = `demo/${run}/plan`;
const RESULTS = `demo/${run}/results/`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const planner = await connect(url, { agent: "planner" });
const worker = planner.session({ agent: "worker" });

function withStep(plan, id, change) {
  return { ...plan, steps: plan.steps.map((s) => (s.id === id ? { ...s, ...change } : s)) };
}

async function plannerAgent() {
  await planner.put(PLAN, {
    goal: "a short report on the bus",
    status: "open",
    steps: ["list the sources", "summarize each source", "draft the report", "check the numbers"]
      .map((text, i) => ({ id: i + 1, text, status: "todo" })),
  });
  console.log("planner: plan written, 4 steps");
  let revised = false;
  for await (const change of planner.watch(RESULTS, { fromVersion: 0 })) {
    console.log(`planner: saw ${change.key.slice(RESULTS.length)} = ${JSON.stringify(change.value)}`);
    if (!revised) {
      revised = true; // the first result changes the plan: a review step goes at the end
      // the planner considers the result first (a model call of its own), half as long as the
      // worker thinks: its revision then lands while the worker thinks about its next step,
      // after the worker read the plan, however quickly either side gets its answers
      await sleep(THINK_MS / 2);
      await planner.run(async (tx) => {
        const plan = (await tx.get(PLAN)).value;
        const id = plan.steps.length + 1;
        tx.put(PLAN, { ...plan, steps: [...plan.steps, { id, text: "review the report", status: "todo" }] });
      });
      console.log("planner: added step 5, review the report");
    }
    const finished = await planner.run(async (tx) => {
      const plan = (await tx.get(PLAN)).value;
      if (!plan.steps.every((s) => s.status === "done")) return false;
      tx.put(PLAN, { ...plan, status: "final" });
      return true;
    });
    if (finished) {
      console.log("planner: every step done, plan final");
      break;
    }
  }
}

async function workerAgent() {
  let conflicts = 0;
  for (;;) {
    const read = await worker.get(PLAN); // a read is a delivery: the worker's commits depend on it
    const plan = read.value;
    if (plan === null || plan.status === "final") {
      if (plan?.status === "final") return conflicts;
      await sleep(20);
      continue;
    }
    const step = plan.steps.find((s) => s.status === "todo");
    if (step === undefined) {
      await sleep(20); // nothing to do until the planner adds a step or closes the plan
      continue;
    }
    await sleep(THINK_MS); // thinking about the step, as a model call would
    try {
      await worker.commit({ [PLAN]: withStep(plan, step.id, { status: "doing", owner: "worker" }) });
    } catch (e) {
      if (!(e instanceof Conflict)) throw e;
      conflicts += 1;
      const [stale] = e.stale;
      console.log(`worker: the plan changed while I was thinking (read v${stale.version}, now v${stale.current}): reading it again`);
      continue;
    }
    const result = `${step.text}: done`;
    await worker.run(async (tx) => {
      const current = (await tx.get(PLAN)).value;
      tx.put(PLAN, withStep(current, step.id, { status: "done", result }));
      tx.put(`${RESULTS}${step.id}`, result);
    });
    console.log(`worker: step ${step.id} done`);
  }
}

const [, conflicts] = await Promise.all([plannerAgent(), workerAgent()]);
const final = (await planner.get(PLAN)).value;
await planner.close();
console.log(JSON.stringify({
  steps: final.steps.length, done: final.steps.filter((s) => s.status === "done").length, conflicts,
}));
