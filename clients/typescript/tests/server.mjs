// A real `oribus up` for the tests: free ports, a temp data directory, stopped by pid.
//
// The server is $ORIBUS_BIN if set, else `oribus` on PATH, else the repository's .venv/bin/oribus.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync, closeSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { delimiter, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

export function oribusBin() {
  if (process.env.ORIBUS_BIN) return process.env.ORIBUS_BIN;
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    if (dir && existsSync(join(dir, "oribus"))) return join(dir, "oribus");
  }
  const venv = join(REPO, ".venv", "bin", "oribus");
  if (existsSync(venv)) return venv;
  throw new Error("no oribus server: set ORIBUS_BIN, put oribus on PATH, or create the repository's .venv");
}

const handedOut = new Set();

function bindable(port) {
  return new Promise((resolve) => {
    const s = createServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

// A port nobody listens on, below the kernel's ephemeral range (which starts at 32768 or
// higher), so that no connection or port-0 bind is handed it before the server binds it.
export async function freePort() {
  for (let i = 0; i < 2000; i++) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    if (handedOut.has(port)) continue;
    if (await bindable(port)) {
      handedOut.add(port);
      return port;
    }
  }
  throw new Error("no free port");
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Servers still running when this process exits (a test failed before its `after`): SIGKILL by pid.
const live = new Set();
process.on("exit", () => {
  for (const proc of live) {
    try {
      process.kill(proc.pid, "SIGKILL");
    } catch { /* already gone */ }
  }
});

export class Server {
  constructor({ shards = 1, dataDir, extra = [], env = {} } = {}) {
    this.shards = shards;
    this.env = env; // extra environment of the next start (e.g. ORIBUS_FAILPOINTS), then cleared
    this.extra = extra;
    this.dataDir = dataDir ?? mkdtempSync(join(tmpdir(), "oribus-ts-"));
    this.ownDir = dataDir === undefined;
    this.logPath = join(this.dataDir, "..", `${this.dataDir.split("/").pop()}.log`);
    this.proc = undefined;
  }

  get url() {
    return `http://${this.http}`;
  }

  // Start (or restart, on the same ports and data directory) and wait until /readyz is 200.
  async start(timeout = 60_000) {
    this.grpc ??= `127.0.0.1:${await freePort()}`;
    this.http ??= `127.0.0.1:${await freePort()}`;
    const log = openSync(this.logPath, "a");
    const args = ["up", "--data-dir", join(this.dataDir, "data"), "--listen", this.grpc, "--http", this.http,
      "--shards", String(this.shards), ...this.extra];
    this.proc = spawn(oribusBin(), args, { stdio: ["ignore", log, log], env: { ...process.env, ...this.env } });
    this.env = {};
    closeSync(log);
    const proc = this.proc;
    live.add(proc);
    proc.once("exit", () => live.delete(proc));
    const deadline = Date.now() + timeout;
    while (Date.now() < deadline) {
      if (proc.exitCode !== null || proc.signalCode !== null) {
        throw new Error(`oribus up exited (${proc.exitCode ?? proc.signalCode}) before serving:\n${this.logTail()}`);
      }
      try {
        const r = await fetch(`${this.url}/readyz`, { signal: AbortSignal.timeout(2000) });
        await r.arrayBuffer();
        if (r.status === 200) return this;
      } catch { /* not listening yet */ }
      await sleep(100);
    }
    throw new Error(`oribus up not ready on ${this.http} after ${timeout} ms:\n${this.logTail()}`);
  }

  logTail(lines = 40) {
    try {
      return readFileSync(this.logPath, "utf8").split("\n").slice(-lines).join("\n");
    } catch {
      return "(no log)";
    }
  }

  get running() {
    return this.proc !== undefined && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  async waitExit(timeout) {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return true;
    return new Promise((resolve) => {
      const t = setTimeout(() => resolve(false), timeout);
      proc.once("exit", () => {
        clearTimeout(t);
        resolve(true);
      });
    });
  }

  // Crash it: SIGKILL by pid, no chance to flush or drain.
  async kill9() {
    if (!this.running) return;
    process.kill(this.proc.pid, "SIGKILL");
    await this.waitExit(10_000);
  }

  // SIGTERM by pid, SIGKILL after `grace` ms; then the temp directory goes. Idempotent.
  async stop(grace = 10_000) {
    if (this.running) {
      process.kill(this.proc.pid, "SIGTERM");
      if (!(await this.waitExit(grace))) {
        process.kill(this.proc.pid, "SIGKILL");
        await this.waitExit(10_000);
      }
    }
    if (this.ownDir) {
      rmSync(this.dataDir, { recursive: true, force: true });
      rmSync(this.logPath, { force: true });
    }
  }
}

export async function startServer(options) {
  const server = new Server(options);
  try {
    return await server.start();
  } catch (e) {
    await server.stop();
    throw e;
  }
}
