/**
 * The bus's /v1 HTTP API over `fetch`: one request, its JSON answer, or the typed error it
 * stands for (`errorFromResponse`); a request that got no answer is Unavailable.
 */
import { InvalidRequest, OribusError, Unavailable, errorFromResponse } from "./errors.js";

export const DEFAULT_TIMEOUT_MS = 30_000;

export interface HttpOptions {
  /** Milliseconds a request may take before it is abandoned (Unavailable). */
  timeout?: number;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof fetch;
  /** Headers sent with every request (an authenticating proxy's, for instance). */
  headers?: Record<string, string>;
}

/** A key in a URL path: each segment escaped, the slashes kept (the route takes the rest of the path). */
export function keyPath(key: string): string {
  return key.split("/").map(encodeURIComponent).join("/");
}

export class Http {
  readonly base: string;
  private readonly timeout: number;
  private readonly fetchImpl: typeof fetch;
  private readonly headers: Record<string, string>;

  constructor(url: string, options: HttpOptions = {}) {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new InvalidRequest(`not a URL: ${JSON.stringify(url)} (the bus's HTTP address, e.g. http://127.0.0.1:7780)`);
    }
    if (parsed.protocol !== "http:" && parsed.protocol !== "https:") {
      throw new InvalidRequest(`the bus's URL must be http:// or https://, not ${JSON.stringify(url)}`);
    }
    this.base = parsed.href.replace(/\/+$/, "");
    this.timeout = options.timeout ?? DEFAULT_TIMEOUT_MS;
    this.fetchImpl = options.fetch ?? globalThis.fetch;
    this.headers = options.headers ?? {};
  }

  /** Send one request; its response, whatever its status. No answer at all: Unavailable. */
  async send(method: "GET" | "POST", path: string, init: { body?: unknown; headers?: Record<string, string>; signal?: AbortSignal; timeout?: number | null } = {}): Promise<Response> {
    const headers: Record<string, string> = { accept: "application/json", ...this.headers, ...init.headers };
    let body: string | undefined;
    if (init.body !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(init.body);
    }
    const signals: AbortSignal[] = [];
    if (init.signal) signals.push(init.signal);
    const timeout = init.timeout === undefined ? this.timeout : init.timeout;
    if (timeout !== null) signals.push(AbortSignal.timeout(timeout));
    try {
      return await this.fetchImpl(this.base + path, {
        method, headers, body, signal: signals.length === 1 ? signals[0] : anySignal(signals),
      });
    } catch (e) {
      if (init.signal?.aborted) throw e; // the caller's own abort, not a failure of the bus
      throw new Unavailable(`${method} ${path}: no answer from the bus at ${this.base} (${describe(e)})`, { cause: e });
    }
  }

  /** One request and its JSON answer; an error answer is thrown as its typed error. */
  async call<T>(method: "GET" | "POST", path: string, body?: unknown): Promise<T> {
    const response = await this.send(method, path, { body });
    let text: string;
    try {
      text = await response.text();
    } catch (e) {
      throw new Unavailable(`${method} ${path}: the answer was cut off (${describe(e)})`, { cause: e });
    }
    let parsed: unknown = undefined;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      if (response.ok) throw new OribusError(`${method} ${path}: the answer is not JSON: ${text.slice(0, 200)}`, { status: response.status });
    }
    if (!response.ok) throw errorFromResponse(response.status, parsed ?? { message: text.slice(0, 500) || `HTTP ${response.status}` });
    return parsed as T;
  }
}

/** Aborted when any of `signals` is (AbortSignal.any, which Node has from 20.3 only). */
function anySignal(signals: AbortSignal[]): AbortSignal {
  if (typeof AbortSignal.any === "function") return AbortSignal.any(signals);
  const controller = new AbortController();
  for (const s of signals) {
    if (s.aborted) {
      controller.abort(s.reason);
      break;
    }
    s.addEventListener("abort", () => controller.abort(s.reason), { once: true });
  }
  return controller.signal;
}

export function describe(e: unknown): string {
  if (e instanceof Error) {
    const cause = (e as { cause?: unknown }).cause;
    const inner = cause instanceof Error ? `: ${(cause as { code?: string }).code ?? cause.message}` : "";
    return `${e.name === "Error" ? "" : `${e.name}: `}${e.message}${inner}`;
  }
  return String(e);
}
