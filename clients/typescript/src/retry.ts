/** Retry policy (as `oribus/client/retry.py`): which errors, how long to wait. */
import { Conflict, OribusError, SessionExpired } from "./errors.js";

export interface RetryPolicy {
  /** Attempts after the first. */
  retries: number;
  /** First backoff, milliseconds. */
  baseDelay: number;
  /** Cap of the exponential backoff, milliseconds. */
  maxDelay: number;
}

export const DEFAULT_RETRY: RetryPolicy = { retries: 20, baseDelay: 1, maxDelay: 100 };

export function retryPolicy(options: Partial<RetryPolicy> = {}, base: RetryPolicy = DEFAULT_RETRY): RetryPolicy {
  const p = { ...base };
  for (const k of ["retries", "baseDelay", "maxDelay"] as const) {
    if (options[k] !== undefined) p[k] = options[k];
  }
  return p;
}

/** Full jitter: uniform in [0, min(maxDelay, baseDelay * 2**attempt)] milliseconds. */
export function backoff(policy: RetryPolicy, attempt: number): number {
  return Math.random() * Math.min(policy.maxDelay, policy.baseDelay * 2 ** Math.min(attempt, 16));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** May a fresh transaction (which re-reads everything) succeed after `error`? */
export function retryTransaction(error: unknown): boolean {
  if (error instanceof Conflict || error instanceof SessionExpired) return true;
  return error instanceof OribusError && error.retryable;
}
