/**
 * Resumable watches over the bus's Server-Sent Events (`GET /v1/watch`).
 *
 * The stream can break: the bus restarts, the connection drops, a watcher that falls behind
 * is cut off (WatchLagged). The stream remembers the last version it delivered of each key
 * and opens the watch again, skipping what it already delivered, so each key's changes
 * arrive in version order, each once:
 *
 * - a watch with `fromVersion` asks again from `fromVersion` (every kept version after it);
 * - a live watch asks for the changes committed since the later of its start and its last
 *   change's commit time, minus RESUME_MARGIN_SECONDS (commits in flight, clock skew): it
 *   may be sent a change again, which it skips, but a change is never lost.
 */
import { InvalidRequest, OribusError, Unavailable, errorFromResponse } from "./errors.js";
import { describe, type Http } from "./http.js";
import { backoff, retryPolicy, sleep, type RetryPolicy } from "./retry.js";
import { fromWire, type Value } from "./values.js";

export const RESUME_MARGIN_SECONDS = 10;

// Re-subscribing: a few quick attempts (a cut-off watcher resumes at once), then up to a
// couple of seconds apart (a bus restarting), as the Python SDK's watch.
export const DEFAULT_WATCH_RETRY: RetryPolicy = { retries: 20, baseDelay: 20, maxDelay: 2000 };

export interface WatchOptions {
  /** Replay every kept version after this one first (undefined: live changes only). */
  fromVersion?: number;
  /** Reconnection backoff: `retries` failed attempts in a row, then the error is thrown. */
  retry?: Partial<RetryPolicy>;
  /** Ends the watch when aborted. */
  signal?: AbortSignal;
}

export interface WatchEvent {
  key: string;
  version: number;
  value: Value;
  deleted: boolean;
  agent: string;
  session: string;
  commitId: string;
  committedAt: number;
}

interface SseEvent {
  event: string;
  data: string;
  comment: string;
}

export class WatchStream implements AsyncIterable<WatchEvent> {
  readonly prefix: string;
  private readonly fromVersion: number | undefined;
  private readonly policy: RetryPolicy;
  private readonly abort = new AbortController();
  private readonly lastVersion = new Map<string, number>();
  private lastCommittedAt: number | undefined;
  private startedAt: number | undefined;
  private reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
  private buffer = "";
  private readonly decoder = new TextDecoder();
  private subscribing: Promise<void> | undefined;
  private closed = false;
  /** How many times the stream was opened again after a break. */
  reconnects = 0;

  /** @internal use `session.watch()` */
  constructor(private readonly http: Http, prefix: string, options: WatchOptions, private readonly onClose: () => void) {
    if (typeof prefix !== "string") throw new InvalidRequest("prefix must be a string");
    if (options.fromVersion !== undefined && (!Number.isSafeInteger(options.fromVersion) || options.fromVersion < 0)) {
      throw new InvalidRequest(`fromVersion must be an integer >= 0, not ${String(options.fromVersion)}`);
    }
    this.prefix = prefix;
    this.fromVersion = options.fromVersion;
    this.policy = retryPolicy(options.retry ?? {}, DEFAULT_WATCH_RETRY);
    if (options.signal) {
      if (options.signal.aborted) this.close();
      else options.signal.addEventListener("abort", () => this.close(), { once: true });
    }
  }

  /** Subscribe now: every change made visible after this resolves is delivered. */
  start(): Promise<void> {
    this.subscribing ??= this.subscribe();
    return this.subscribing;
  }

  /** Stop watching; a pending iteration ends. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.abort.abort();
    this.onClose();
  }

  private query(): string {
    const q = new URLSearchParams({ prefix: this.prefix });
    if (this.fromVersion !== undefined) {
      q.set("from_version", String(this.fromVersion));
    } else if (this.startedAt !== undefined) {
      const since = Math.max(this.startedAt, this.lastCommittedAt ?? 0) - RESUME_MARGIN_SECONDS;
      q.set("since", String(since));
    }
    return q.toString();
  }

  // Open the stream (again), retrying retryable failures; resolves once the bus says it subscribed.
  private async subscribe(): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      if (this.closed) return;
      try {
        const response = await this.http.send("GET", `/v1/watch?${this.query()}`, {
          headers: { accept: "text/event-stream" }, signal: this.abort.signal, timeout: null,
        });
        if (!response.ok || !response.body) {
          const text = await response.text().catch(() => "");
          let body: unknown = { message: text };
          try {
            body = JSON.parse(text);
          } catch { /* not JSON: the text is the message */ }
          throw errorFromResponse(response.status, body);
        }
        this.startedAt ??= Date.now() / 1000;
        this.reader = response.body.getReader();
        this.buffer = "";
        const first = await this.nextEvent();
        if (first === undefined || first.comment !== "subscribed") {
          throw new Unavailable("the watch stream ended before the bus subscribed it");
        }
        return;
      } catch (e) {
        if (this.closed) return;
        const error = e instanceof OribusError ? e : new Unavailable(`watch: ${describe(e)}`, { cause: e });
        if (!error.retryable || attempt >= this.policy.retries) throw error;
        await sleep(backoff(this.policy, attempt));
      }
    }
  }

  // The next event of the open stream; undefined when it ended. Network errors are thrown.
  private async nextEvent(): Promise<SseEvent | undefined> {
    for (;;) {
      const end = this.buffer.search(/\r?\n\r?\n/);
      if (end >= 0) {
        const block = this.buffer.slice(0, end);
        this.buffer = this.buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const ev: SseEvent = { event: "message", data: "", comment: "" };
        const data: string[] = [];
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith(":")) ev.comment = line.slice(1).trim();
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") ev.event = value;
          else if (field === "data") data.push(value);
        }
        ev.data = data.join("\n");
        return ev;
      }
      const chunk = await this.reader!.read();
      if (chunk.done) return undefined;
      this.buffer += this.decoder.decode(chunk.value, { stream: true });
    }
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<WatchEvent, void, undefined> {
    try {
      await this.start();
      let failures = 0;
      while (!this.closed) {
        let ev: SseEvent | undefined;
        let broken: OribusError | undefined;
        try {
          ev = await this.nextEvent();
          if (ev === undefined) broken = new Unavailable("the watch stream ended");
        } catch (e) {
          if (this.closed) return;
          broken = new Unavailable(`the watch stream broke: ${describe(e)}`, { cause: e });
        }
        if (ev?.event === "error") {
          let body: unknown = {};
          try {
            body = JSON.parse(ev.data);
          } catch { /* a malformed error event: an Internal error */ }
          broken = errorFromResponse(503, body);
          if (!broken.retryable) throw broken;
        }
        if (broken !== undefined) {
          if (failures >= this.policy.retries) throw broken;
          await this.reader?.cancel().catch(() => undefined);
          if (failures > 0) await sleep(backoff(this.policy, failures));
          failures += 1;
          this.reconnects += 1;
          this.subscribing = this.subscribe();
          await this.subscribing;
          continue;
        }
        if (ev?.event !== "change") continue; // comments (keep-alives) and unknown events
        failures = 0;
        const d = JSON.parse(ev.data) as Record<string, unknown>;
        const key = String(d.key);
        const version = Number(d.version);
        if (version <= (this.lastVersion.get(key) ?? -1)) continue; // delivered before the break
        this.lastVersion.set(key, version);
        const committedAt = Number(d.committed_at);
        if (!(committedAt <= (this.lastCommittedAt ?? -Infinity))) this.lastCommittedAt = committedAt;
        yield {
          key, version, value: fromWire(d.value ?? null), deleted: Boolean(d.deleted),
          agent: String(d.agent ?? ""), session: String(d.session ?? ""),
          commitId: String(d.commit_id ?? ""), committedAt,
        };
      }
    } finally {
      this.close();
    }
  }
}
