/**
 * oribus for TypeScript: the state bus for agent fleets over its /v1 HTTP API.
 *
 *     import { connect, Conflict } from "oribus";
 *     const bus = await connect("http://127.0.0.1:7780", { agent: "planner" });
 *     await bus.run(async (tx) => {
 *       const n = await tx.get("counter");
 *       tx.put("counter", ((n.value as number) ?? 0) + 1);
 *     });
 */
export { connect, DELETE, newCommitId, Session, Transaction } from "./client.js";
export type { CommitOptions, ConnectOptions, Item, Version, Write } from "./client.js";
export {
  Aborted, Conflict, DataCorrupted, DataDirLocked, errorFromResponse, HistoryTruncated, InvalidRequest,
  LimitExceeded, OribusError, PermissionDenied, SessionExpired, Unauthenticated, Unavailable, ValueTooLarge,
  WatchLagged,
} from "./errors.js";
export type { Stale } from "./errors.js";
export { DEFAULT_RETRY, type RetryPolicy } from "./retry.js";
export type { Value } from "./values.js";
export { RESUME_MARGIN_SECONDS, WatchStream, type WatchEvent, type WatchOptions } from "./watch.js";
export { API_VERSION, OPENAPI_SHA256 } from "./openapi.js";
export type * as api from "./openapi.js";
