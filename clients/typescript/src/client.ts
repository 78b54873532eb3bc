/**
 * The client API: a session of one agent on a bus, and its transactions — the Python SDK's
 * (`oribus/client/session.py`) over the bus's /v1 HTTP API.
 *
 * Over HTTP the bus keeps each session's tokens itself (specs/http.md, "Sessions of clients
 * without tokens"), so a session here is its name — (agent, session id) — and the
 * `session_token` the bus handed out when it was opened, which proves ownership to reset or
 * forget.
 */
import { InvalidRequest, OribusError, SessionExpired, Unavailable } from "./errors.js";
import { Http, keyPath, type HttpOptions } from "./http.js";
import type * as api from "./openapi.js";
import { backoff, retryPolicy, retryTransaction, sleep, type RetryPolicy } from "./retry.js";
import { fromWire, toWire, type Value } from "./values.js";
import { WatchStream, type WatchEvent, type WatchOptions } from "./watch.js";

/** Write it as a value to delete the key. */
export const DELETE: unique symbol = Symbol("oribus.DELETE");
export type Write = Value | typeof DELETE;

/** A key as read: version 0 and value null when it is absent. */
export interface Item {
  key: string;
  value: Value;
  version: number;
}

/** One past version of a key (`history`). */
export interface Version {
  version: number;
  value: Value;
  agent: string;
  session: string;
  commitId: string;
  committedAt: number;
  deleted: boolean;
}

export interface ConnectOptions extends HttpOptions {
  /** The agent's name (required). */
  agent: string;
  /** The session's id (default: a new random one). */
  session?: string;
  /**
   * The `sessionToken` of an earlier connection of this session: it resumes that session
   * (its reads stay) and proves it is its owner when it resets or forgets.
   */
  sessionToken?: string;
  /**
   * The agent's credential, sent as `Authorization: Bearer <token>` with every request
   * (default: `$ORIBUS_TOKEN` where the runtime has an environment). A bus without agent
   * authentication ignores it.
   */
  token?: string;
  /** Refuse blind writes (keys neither read nor expected). */
  strict?: boolean;
  /** Backoff of `run` and of a commit whose outcome is unknown (default: 20 retries, 1..100 ms). */
  retry?: Partial<RetryPolicy>;
}

export interface CommitOptions {
  /** key -> the version it must have at the commit point. */
  expect?: Record<string, number>;
  /** Explicit read entries: checked in addition to the session's logged reads, never instead. */
  readSet?: Record<string, number>;
  /** The idempotency key (default: a new one); a retry with the same id never applies twice. */
  commitId?: string;
}

// Commit ids: a random per-process prefix and a counter, as the Python SDK makes them.
const ID_PREFIX = Array.from(crypto.getRandomValues(new Uint8Array(10)), (b) => b.toString(16).padStart(2, "0")).join("");
let idCounter = 0;

export function newCommitId(): string {
  idCounter += 1;
  return `${ID_PREFIX}-${idCounter.toString(16)}`;
}

function newSessionId(): string {
  return Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// How often a commit whose outcome is unknown (Unavailable) is resent with the same id.
const SAME_ID_RETRIES = 3;

function checkKey(key: unknown, what = "key"): string {
  if (typeof key !== "string" || key === "") {
    throw new InvalidRequest(`${what} must be a non-empty string, not ${JSON.stringify(key) ?? String(key)}`);
  }
  return key;
}

function checkVersions(m: unknown, name: string): Record<string, number> {
  if (m === undefined || m === null) return {};
  if (typeof m !== "object" || Array.isArray(m)) throw new InvalidRequest(`${name} must map keys to versions`);
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(m)) {
    checkKey(k);
    if (!Number.isSafeInteger(v) || (v as number) < 0) throw new InvalidRequest(`${name}[${JSON.stringify(k)}] must be an integer >= 0, not ${String(v)}`);
    out[k] = v as number;
  }
  return out;
}

function splitWrites(writes: unknown): { writes: Record<string, unknown>; deletes: string[] } {
  if (writes === null || typeof writes !== "object" || Array.isArray(writes) || writes instanceof Map) {
    throw new InvalidRequest("writes must be an object of key -> value");
  }
  const out: Record<string, unknown> = {};
  const deletes: string[] = [];
  for (const key of Reflect.ownKeys(writes)) {
    if (typeof key !== "string") throw new InvalidRequest("keys are strings");
    checkKey(key);
    const v = (writes as Record<string, unknown>)[key];
    if (v === DELETE) deletes.push(key);
    else out[key] = toWire(v, `writes[${JSON.stringify(key)}]`);
  }
  return { writes: out, deletes };
}

function item(i: api.Item): Item {
  return { key: i.key, value: fromWire(i.value), version: i.version };
}

/** What a Session shares with the sessions made from it: the connection and its options. */
interface Bus {
  http: Http;
  retry: RetryPolicy;
  strict: boolean;
  watches: Set<WatchStream>;
  closed: boolean;
}

/**
 * One agent's session on a bus: reads are deliveries, commits are checked against them.
 *
 *     const bus = await connect("http://127.0.0.1:7780", { agent: "planner" });
 *     const plan = await bus.get("plan");
 *     await bus.commit({ plan: { steps: 3 } });              // refused if "plan" changed since
 *     await bus.run(async (tx) => {                          // only its own reads count; retried
 *       const a = await tx.get("a");
 *       tx.put("b", ((a.value as number) ?? 0) + 1);
 *     });
 *     const reviewer = bus.session({ agent: "reviewer" });   // another agent, same connection
 *
 * By default (session scope) everything this session ever read is checked at each commit;
 * `forget(keys)` or `resetSession()` drops reads that no longer matter.
 */
export class Session {
  readonly agent: string;
  readonly sessionId: string;
  private token: string | undefined;
  private opening: Promise<void> | undefined;
  private readonly bus: Bus;

  /** @internal use `connect` or `session.session()` */
  constructor(bus: Bus, agent: string, sessionId: string | undefined, token: string | undefined) {
    this.bus = bus;
    this.agent = checkKey(agent, "agent");
    if (sessionId !== undefined) checkKey(sessionId, "session");
    this.sessionId = sessionId ?? newSessionId();
    this.token = token;
    if (token !== undefined) this.opening = Promise.resolve();
  }

  /** @internal refuse blind writes (connect's `strict`) */
  get strict(): boolean {
    return this.bus.strict;
  }

  /** What the bus gave when this session was opened: keep it to resume the session (`connect`'s `sessionToken`). */
  get sessionToken(): string | undefined {
    return this.token;
  }

  /** Open the session on the bus (once, before its first read): the bus hands out its token. */
  open(): Promise<void> {
    this.opening ??= (async () => {
      const reply = await this.bus.http.call<api.SessionReply>("POST", "/v1/session", this.ref());
      this.token = reply.session_token ?? undefined;
    })().catch((e) => {
      this.opening = undefined;
      throw e;
    });
    return this.opening;
  }

  private ref(): { agent: string; session: string } {
    return { agent: this.agent, session: this.sessionId };
  }

  private async call<T>(method: "GET" | "POST", path: string, body?: Record<string, unknown>): Promise<T> {
    if (this.bus.closed) throw new InvalidRequest("the connection is closed");
    await this.open();
    return this.bus.http.call<T>(method, path, body);
  }

  /** Another session on the same bus (another agent, or another run of this one). */
  session(options: { agent?: string; session?: string; sessionToken?: string } = {}): Session {
    return new Session(this.bus, options.agent ?? this.agent, options.session, options.sessionToken);
  }

  // ---- reads ---------------------------------------------------------------------------

  /** @internal */
  async read(keys: string[]): Promise<api.GetReply> {
    if (!Array.isArray(keys)) throw new InvalidRequest("keys must be an array of strings");
    keys.forEach((k) => checkKey(k));
    return this.call<api.GetReply>("POST", "/v1/get", { ...this.ref(), keys });
  }

  /** Read one key (recorded as a delivery). An absent key reads as version 0, value null. */
  async get(key: string): Promise<Item> {
    const reply = await this.read([key]);
    return item(reply.items![0]!);
  }

  /** Read several keys at once; each read is a delivery. */
  async getMany(keys: Iterable<string>): Promise<Record<string, Item>> {
    const reply = await this.read([...new Set(keys)]);
    return Object.fromEntries(reply.items!.map((i) => [i.key, item(i)]));
  }

  // ---- commits -------------------------------------------------------------------------

  /**
   * Send a commit; one whose outcome is unknown (no answer, or Unavailable) is sent again
   * with the same commit id, which the bus never applies twice.
   * @internal
   */
  async send(path: "/v1/commit" | "/v1/rollback", body: Record<string, unknown>): Promise<Record<string, number>> {
    for (let attempt = 0; ; attempt++) {
      try {
        const reply = await this.call<api.CommitReply>("POST", path, { ...this.ref(), ...body });
        return reply.versions ?? {};
      } catch (e) {
        if (!(e instanceof Unavailable) || attempt >= SAME_ID_RETRIES) {
          if (e instanceof Unavailable) {
            throw new Unavailable(`${e.message}; the outcome of commit ${String(body.commit_id)} is unknown: retry it with the same commit id`,
              { code: e.code, details: { ...e.details, commit_id: body.commit_id }, status: e.status, cause: e });
          }
          throw e;
        }
        await sleep(backoff(this.bus.retry, attempt + 3));
      }
    }
  }

  /**
   * Atomically write keys (`DELETE` deletes) if nothing this session read has changed.
   * Returns key -> new version; Conflict (`.stale` lists the offending keys) writes nothing.
   */
  async commit(writes: Record<string, Write>, options: CommitOptions = {}): Promise<Record<string, number>> {
    const w = splitWrites(writes);
    return this.send("/v1/commit", {
      commit_id: options.commitId ?? newCommitId(),
      writes: w.writes,
      deletes: w.deletes,
      expect: checkVersions(options.expect, "expect"),
      read_set: checkVersions(options.readSet, "readSet"),
      strict: this.bus.strict,
    });
  }

  /** Commit a single key; returns its new version. */
  async put(key: string, value: Write, options: { expect?: number } = {}): Promise<number> {
    checkKey(key);
    const versions = await this.commit({ [key]: value }, options.expect === undefined ? {} : { expect: { [key]: options.expect } });
    return versions[key]!;
  }

  /** Commit a delete of one key; returns its new version. */
  async delete(key: string, options: { expect?: number } = {}): Promise<number> {
    return this.put(key, DELETE, options);
  }

  /**
   * Atomically restore each key to its value at the given version (0 deletes it): an
   * ordinary commit, checked like any other. Returns key -> new version.
   */
  async rollback(targets: Record<string, number>, options: { commitId?: string } = {}): Promise<Record<string, number>> {
    const versions = checkVersions(targets, "rollback");
    if (Object.keys(versions).length === 0) throw new InvalidRequest("rollback takes a non-empty object of key -> version");
    return this.send("/v1/rollback", { commit_id: options.commitId ?? newCommitId(), versions });
  }

  /**
   * A transaction whose read set is only the reads made through it. With `fn`: run it, then
   * commit (once, no retry; see `run`) and return what it returned; an exception discards
   * the transaction. Without: the Transaction, to commit yourself.
   */
  transaction(): Transaction;
  transaction<T>(fn: (tx: Transaction) => Promise<T>): Promise<T>;
  transaction<T>(fn?: (tx: Transaction) => Promise<T>): Transaction | Promise<T> {
    const tx = new Transaction(this);
    if (fn === undefined) return tx;
    return (async () => {
      try {
        const result = await fn(tx);
        await tx.commit();
        return result;
      } finally {
        tx.discard();
      }
    })();
  }

  /**
   * Call `fn(tx)` in a fresh transaction and commit, retrying on Conflict, SessionExpired
   * and Unavailable with jittered exponential backoff, at most `retries` times; then the last
   * error is thrown. A commit whose outcome is unknown is settled first (resent with its
   * commit id), so the work is never applied twice.
   */
  async run<T>(fn: (tx: Transaction) => Promise<T>, options: Partial<RetryPolicy> = {}): Promise<T> {
    const policy = retryPolicy(options, this.bus.retry);
    for (let attempt = 0; ; attempt++) {
      const tx = new Transaction(this);
      let result: T;
      try {
        result = await fn(tx);
        await tx.commit();
        return result;
      } catch (e) {
        tx.discard();
        if (e instanceof Unavailable && tx.sent && (await this.settle(tx, policy))) {
          return result!; // the commit did apply; only its answer was lost
        }
        if (attempt >= policy.retries || !retryTransaction(e)) throw e;
        if (e instanceof SessionExpired) {
          await this.resetSession().catch(() => undefined); // the bus keeps the lost token until a reset
        }
      }
      await sleep(backoff(policy, attempt));
    }
  }

  /**
   * Find out whether `tx`'s commit applied by resending it (same commit id). True: it
   * committed (now or earlier). False: it was refused, so it never applied and a fresh
   * transaction may start over; starting over while the outcome is unknown could apply
   * the same work twice.
   */
  private async settle(tx: Transaction, policy: RetryPolicy): Promise<boolean> {
    for (let attempt = 0; attempt <= policy.retries; attempt++) {
      await sleep(backoff(policy, attempt + 3));
      try {
        await tx.resend();
        return true;
      } catch (e) {
        if (e instanceof Unavailable) continue;
        if (e instanceof OribusError && retryTransaction(e)) {
          if (e instanceof SessionExpired) await this.resetSession().catch(() => undefined);
          return false;
        }
        throw e;
      }
    }
    throw new Unavailable(`the outcome of commit ${tx.commitId} is still unknown; retry it with the same commit id`,
      { details: { commit_id: tx.commitId } });
  }

  // ---- history and session upkeep ------------------------------------------------------

  /** Past versions of `key`, newest first (reading history is not a delivery). */
  async history(key: string, options: { limit?: number } = {}): Promise<Version[]> {
    checkKey(key);
    const query = options.limit === undefined ? "" : `?limit=${encodeURIComponent(String(options.limit))}`;
    const reply = await this.call<api.HistoryReply>("GET", `/v1/history/${keyPath(key)}${query}`);
    return (reply.versions ?? []).map((v) => ({
      version: v.version!, value: fromWire(v.value ?? null), agent: v.agent ?? "", session: v.session ?? "",
      commitId: v.commit_id ?? "", committedAt: v.committed_at ?? 0, deleted: v.deleted ?? false,
    }));
  }

  /** Drop these keys from the session's read set (later commits no longer depend on them). */
  async forget(keys: Iterable<string>): Promise<void> {
    const list = [...keys];
    list.forEach((k) => checkKey(k));
    await this.call<api.ForgetReply>("POST", "/v1/forget", { ...this.ref(), keys: list, session_token: this.token });
  }

  /** Drop every delivery of this session; also clears a SessionExpired state. */
  async resetSession(): Promise<void> {
    await this.call<api.ResetReply>("POST", "/v1/reset", { ...this.ref(), session_token: this.token });
  }

  /**
   * Changes of keys under `prefix` as they become visible: an async iterator of WatchEvent
   * that resumes by itself after a break. `fromVersion` undefined watches live changes only;
   * a number first replays every kept version after it. Watching records no delivery.
   *
   *     for await (const ch of bus.watch("team-a/", { fromVersion: 0 })) console.log(ch.key, ch.version, ch.value);
   */
  watch(prefix = "", options: WatchOptions = {}): WatchStream {
    if (this.bus.closed) throw new InvalidRequest("the connection is closed");
    const stream = new WatchStream(this.bus.http, prefix, options, () => this.bus.watches.delete(stream));
    this.bus.watches.add(stream);
    return stream;
  }

  /** The bus's counters (`GET /v1/stats`). */
  async stats(): Promise<Record<string, api.JsonValue>> {
    if (this.bus.closed) throw new InvalidRequest("the connection is closed");
    return this.bus.http.call("GET", "/v1/stats");
  }

  /** End the watches of this connection; later calls raise InvalidRequest. Idempotent. */
  async close(): Promise<void> {
    this.bus.closed = true;
    for (const w of [...this.bus.watches]) w.close();
  }
}

/**
 * Reads and buffered writes committed together; only its own reads are its read set.
 * Reads see committed state, not the transaction's own buffered writes.
 */
export class Transaction {
  readonly commitId = newCommitId();
  /** Key -> new version, once committed. */
  versions: Record<string, number> | undefined;
  private readonly session: Session;
  private readonly writes: Record<string, Write> = {};
  private readonly rollbacks: Record<string, number> = {};
  private readonly expects: Record<string, number> = {};
  private readonly since: Record<string, number> = {};
  // What this transaction itself was given (first read per key), sent as explicit read
  // entries: checked in addition to the session's delivery log, which holds only its latest
  // delivery per key and so cannot tell two concurrent transactions of one session apart.
  private readonly reads: Record<string, number> = {};
  private body: Record<string, unknown> | undefined;
  private done = false;

  /** @internal use `session.transaction()` */
  constructor(session: Session) {
    this.session = session;
  }

  private checkOpen(): void {
    if (this.done) throw new InvalidRequest("the transaction is already committed or discarded");
  }

  private async read(keys: string[]): Promise<api.GetReply> {
    this.checkOpen();
    const reply = await this.session.read(keys);
    for (const [shard, seq] of Object.entries(reply.seqs ?? {})) {
      if (!(shard in this.since)) this.since[shard] = seq;
    }
    for (const i of reply.items ?? []) {
      if (!(i.key in this.reads)) this.reads[i.key] = i.version;
    }
    return reply;
  }

  async get(key: string): Promise<Item> {
    return item((await this.read([checkKey(key)])).items![0]!);
  }

  async getMany(keys: Iterable<string>): Promise<Record<string, Item>> {
    const reply = await this.read([...new Set(keys)]);
    return Object.fromEntries(reply.items!.map((i) => [i.key, item(i)]));
  }

  put(key: string, value: Write): void {
    this.checkOpen();
    checkKey(key);
    if (value !== DELETE) toWire(value, `value of ${JSON.stringify(key)}`); // refused now, not at commit
    delete this.rollbacks[key];
    this.writes[key] = value;
  }

  delete(key: string): void {
    this.put(key, DELETE);
  }

  /** Also require `key` to be at `version` at commit. */
  expect(key: string, version: number): void {
    this.checkOpen();
    Object.assign(this.expects, checkVersions({ [checkKey(key)]: version }, "expect"));
  }

  /** Restore `key` to its value at `version` as part of this transaction. */
  rollback(key: string, version: number): void {
    this.checkOpen();
    Object.assign(this.rollbacks, checkVersions({ [checkKey(key)]: version }, "rollback"));
    delete this.writes[key];
  }

  async commit(): Promise<Record<string, number>> {
    this.checkOpen();
    this.done = true;
    const w = splitWrites(this.writes);
    this.body = {
      commit_id: this.commitId, scope: "transaction", writes: w.writes, deletes: w.deletes,
      rollback: { ...this.rollbacks }, expect: { ...this.expects }, read_set: { ...this.reads },
      since: { ...this.since }, strict: this.session.strict,
    };
    this.versions = await this.session.send("/v1/commit", this.body);
    return this.versions;
  }

  /** End the transaction without committing (nothing was sent, nothing is written). */
  discard(): void {
    this.done = true;
  }

  /** The commit was sent (its outcome may be unknown if it raised Unavailable). */
  get sent(): boolean {
    return this.body !== undefined;
  }

  /** Send the same commit again (same commit id: never applied twice). */
  async resend(): Promise<Record<string, number>> {
    if (this.body === undefined) throw new InvalidRequest("the transaction was never committed");
    this.versions = await this.session.send("/v1/commit", this.body);
    return this.versions;
  }
}

/**
 * Connect to a bus's HTTP gateway (`oribus up` serves it on 127.0.0.1:7780) as `agent`;
 * resolves once the session is open (Unavailable if the bus does not answer).
 */
export async function connect(url: string, options: ConnectOptions): Promise<Session> {
  if (!options || typeof options !== "object") throw new InvalidRequest("connect needs options with an agent");
  const token = options.token ?? envToken();
  const headers = token === undefined ? options.headers : { ...options.headers, authorization: `Bearer ${token}` };
  const bus: Bus = {
    http: new Http(url, { ...options, headers }),
    retry: retryPolicy(options.retry ?? {}),
    strict: options.strict ?? false,
    watches: new Set(),
    closed: false,
  };
  const session = new Session(bus, options.agent, options.session, options.sessionToken);
  await session.open();
  return session;
}

/** `$ORIBUS_TOKEN`, where the runtime has an environment (Node, Bun, Deno with --allow-env). */
function envToken(): string | undefined {
  const proc = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  const value = proc?.env?.ORIBUS_TOKEN;
  return value ? value : undefined;
}

export type { WatchEvent, WatchOptions };
